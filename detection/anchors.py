"""Multi-scale 3D anchors on the FPN grid (internal box format ``[x1, y1, x2, y2, z1, z2]``).

Per level ``l`` with stride ``s_l`` the base anchors are enumerated size-major, then aspect ratio, then z ratio
(anchor index ``a = (size_i * n_ar + ar_i) * n_zr + zr_i``): width ``w = size / sqrt(ar)``, height
``h = size * sqrt(ar)`` (so ``ar = h / w``), depth ``d = size * zr``, centred at the origin. Feature-map
locations ``(k, j, i)`` (z, y, x) have centres ``((i + .5) s, (j + .5) s, (k + .5) s)``; locations are enumerated
in C order over (z, y, x) and the anchors of one location are consecutive, so the global anchor index is
``level_offset + location * A + a`` — the order in which :class:`~detection.retina_head.Retina3DHead`
flattens its outputs.

With the defaults and a 128³ patch (feature maps 32³, 16³, 8³, 4³) there are 18 anchors per location and
673,920 anchors in all. The grid always follows the actual feature-map sizes, so other patch sizes work.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

DEFAULT_SIZES: Tuple[Tuple[float, ...], ...] = ((8, 16, 32), (16, 32, 64), (32, 64, 128), (64, 128, 256))
DEFAULT_ASPECT_RATIOS: Tuple[float, ...] = (0.5, 1.0, 2.0)
DEFAULT_Z_RATIOS: Tuple[float, ...] = (0.5, 1.0)
DEFAULT_STRIDES: Tuple[int, ...] = (4, 8, 16, 32)


class AnchorGenerator3D(nn.Module):
    """Anchors for a list of feature maps.

    Args:
        sizes: per level, the base sizes (voxels).
        aspect_ratios: h / w ratios shared by all levels.
        z_ratios: d / size ratios shared by all levels.
        strides: per level, the feature-map stride in voxels.
    """

    def __init__(self, sizes: Sequence[Sequence[float]] = DEFAULT_SIZES,
                 aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS,
                 z_ratios: Sequence[float] = DEFAULT_Z_RATIOS,
                 strides: Sequence[int] = DEFAULT_STRIDES) -> None:
        super().__init__()
        if len(sizes) != len(strides):
            raise ValueError(f"need one size tuple per stride, got {len(sizes)} sizes and {len(strides)} strides")
        counts = {len(s) for s in sizes}
        if len(counts) != 1:
            raise ValueError("every level must have the same number of sizes")
        self.sizes = tuple(tuple(float(v) for v in s) for s in sizes)
        self.aspect_ratios = tuple(float(v) for v in aspect_ratios)
        self.z_ratios = tuple(float(v) for v in z_ratios)
        self.strides = tuple(int(s) for s in strides)
        # Empty persistent buffer: carries the module's device and keeps the reference key
        # ``anchor_generator._dummy`` in the state dict so reference checkpoints load strictly.
        self.register_buffer("_dummy", torch.empty(0), persistent=True)
        self._cache: Dict[Tuple, Tuple[torch.Tensor, List[int]]] = {}

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.sizes[0]) * len(self.aspect_ratios) * len(self.z_ratios)

    def base_anchors(self, level: int, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> torch.Tensor:
        """Origin-centred anchors of one level → ``(A, 6)`` internal format."""
        rows = []
        for size in self.sizes[level]:
            for ratio in self.aspect_ratios:
                w = size / math.sqrt(ratio)
                h = size * math.sqrt(ratio)
                for z_ratio in self.z_ratios:
                    d = size * z_ratio
                    rows.append([-w / 2, -h / 2, w / 2, h / 2, -d / 2, d / 2])
        return torch.tensor(rows, dtype=dtype, device=device)

    def grid_anchors(self, feature_shapes: Sequence[Sequence[int]], dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> Tuple[torch.Tensor, List[int]]:
        """Anchors for feature maps of the given spatial shapes ``(D', H', W')``, one per level.

        Returns:
            anchors ``(N, 6)`` internal format, and the number of anchors per level.
        """
        if len(feature_shapes) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature maps, got {len(feature_shapes)}")
        key = (tuple(tuple(int(v) for v in s) for s in feature_shapes), dtype, str(device))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        all_anchors = []
        per_level = []
        for level, (shape, stride) in enumerate(zip(feature_shapes, self.strides)):
            depth, height, width = (int(v) for v in shape)
            zs = (torch.arange(depth, dtype=torch.float64, device=device) + 0.5) * stride
            ys = (torch.arange(height, dtype=torch.float64, device=device) + 0.5) * stride
            xs = (torch.arange(width, dtype=torch.float64, device=device) + 0.5) * stride
            cz, cy, cx = torch.meshgrid(zs, ys, xs, indexing="ij")
            cz, cy, cx = cz.reshape(-1), cy.reshape(-1), cx.reshape(-1)
            shifts = torch.stack([cx, cy, cx, cy, cz, cz], dim=1)  # (L, 6)
            base = self.base_anchors(level, torch.float64, device)  # (A, 6)
            level_anchors = (shifts[:, None, :] + base[None, :, :]).reshape(-1, 6)
            all_anchors.append(level_anchors.to(dtype))
            per_level.append(level_anchors.shape[0])
        result = (torch.cat(all_anchors, dim=0), per_level)
        self._cache[key] = result
        return result

    def forward(self, feature_maps: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[int]]:
        """Anchors for feature maps ``(B, C, D', H', W')``; see :meth:`grid_anchors`."""
        shapes = [tuple(f.shape[-3:]) for f in feature_maps]
        return self.grid_anchors(shapes, dtype=torch.float32, device=feature_maps[0].device)
