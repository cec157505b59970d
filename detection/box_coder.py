"""Box ↔ regression-delta encoding relative to anchors (internal box format ``[x1, y1, x2, y2, z1, z2]``).

Deltas are ordered ``[dx, dy, dw, dh, dz, dd]`` (the reference's channel order, kept for checkpoints):

    dx = wx (gx - ax) / aw    dy = wy (gy - ay) / ah    dz = wz (gz - az) / ad
    dw = ww ln(gw / aw)       dh = wh ln(gh / ah)       dd = wd ln(gd / ad)

with centres (gx, gy, gz), (ax, ay, az) and sizes (gw, gh, gd), (aw, ah, ad) of the box and the anchor. The
``weights`` tuple is given **in that same delta order** (the reference indexed its weights in a different order
from its output vector). Sizes are floored at ``min_size`` voxels; decoding clamps the log-size deltas at
``clip`` (= ln(1000/16)) before ``exp`` so a wild prediction cannot overflow.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

DEFAULT_CLIP = math.log(1000.0 / 16)


def _centre_size(boxes: torch.Tensor, min_size: float):
    x1, y1, x2, y2, z1, z2 = boxes.unbind(-1)
    w = (x2 - x1).clamp(min=min_size)
    h = (y2 - y1).clamp(min=min_size)
    d = (z2 - z1).clamp(min=min_size)
    return (x1 + x2) * 0.5, (y1 + y2) * 0.5, (z1 + z2) * 0.5, w, h, d


class BoxCoder3D:
    """Encode boxes as deltas w.r.t. anchors and back.

    Args:
        weights: ``(wx, wy, ww, wh, wz, wd)`` multipliers, in delta order.
        clip: upper bound applied to the log-size deltas before ``exp`` in :meth:`decode`.
        min_size: sizes below this (voxels) are treated as this size.
    """

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0), clip: float = DEFAULT_CLIP,
                 min_size: float = 1.0) -> None:
        if len(weights) != 6:
            raise ValueError(f"weights must have 6 entries (dx, dy, dw, dh, dz, dd), got {len(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.clip = float(clip)
        self.min_size = float(min_size)

    def encode(self, boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """``(..., 6)`` boxes and broadcastable ``(..., 6)`` anchors → ``(..., 6)`` deltas."""
        gx, gy, gz, gw, gh, gd = _centre_size(boxes, self.min_size)
        ax, ay, az, aw, ah, ad = _centre_size(anchors.to(boxes.dtype), self.min_size)
        wx, wy, ww, wh, wz, wd = self.weights
        return torch.stack([wx * (gx - ax) / aw, wy * (gy - ay) / ah,
                            ww * torch.log(gw / aw), wh * torch.log(gh / ah),
                            wz * (gz - az) / ad, wd * torch.log(gd / ad)], dim=-1)

    def decode(self, deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """``(..., 6)`` deltas and broadcastable ``(..., 6)`` anchors → ``(..., 6)`` boxes (internal format)."""
        ax, ay, az, aw, ah, ad = _centre_size(anchors.to(deltas.dtype), self.min_size)
        wx, wy, ww, wh, wz, wd = self.weights
        dx, dy, dw, dh, dz, dd = deltas.unbind(-1)
        cx = dx / wx * aw + ax
        cy = dy / wy * ah + ay
        cz = dz / wz * ad + az
        w = torch.exp((dw / ww).clamp(max=self.clip)) * aw
        h = torch.exp((dh / wh).clamp(max=self.clip)) * ah
        d = torch.exp((dd / wd).clamp(max=self.clip)) * ad
        return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, cz - d / 2, cz + d / 2], dim=-1)
