"""Whole-volume prediction: Gaussian-weighted sliding window, mirror test-time augmentation, and the way
back from the preprocessed grid to the raw image grid.

Pipeline for one preprocessed case ``data`` ``(C, Z, Y, X)`` with its properties (see ARCHITECTURE.md):

1. :meth:`SlidingWindowPredictor.predict_probabilities` — MONAI's sliding-window inference (windows of
   ``roi_size`` that always reach the last voxel of every axis, Gaussian blending of the logits), softmax,
   and with mirror TTA the mean of the softmax **probabilities** of every flip combination (each flipped back).
2. :func:`resize_probabilities` — trilinear back to ``shape_after_cropping_before_resample``.
3. argmax → label map, :func:`paste_into_original` → ``shape_before_cropping`` at ``bbox_used_for_cropping``.

Nothing here knows about BraTS: any channel count, any number of classes (ABUS: 1 channel, 2 classes).
"""
from __future__ import annotations

import itertools
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from light_training.cuda_graphs import GraphedForward

ModelFunction = Callable[[torch.Tensor], torch.Tensor]
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}


@dataclass
class SlidingWindowConfig:
    """Settings of whole-volume inference (defaults: the reference's BraTS settings)."""

    roi_size: Tuple[int, int, int] = (128, 128, 128)
    overlap: float = 0.5
    sw_batch_size: int = 2
    blend_mode: str = "gaussian"          # MONAI BlendMode: "gaussian" or "constant"
    sigma_scale: float = 0.125            # Gaussian sigma as a fraction of the ROI (MONAI's default)
    mirror_axes: Tuple[int, ...] = field(default_factory=tuple)  # spatial axes 0=z, 1=y, 2=x to flip for TTA
    amp_dtype: str = "fp16"               # autocast dtype on CUDA: fp16, bf16 or none (CPU always fp32)
    progress: bool = False                # MONAI's per-window tqdm bar
    cuda_graphs: bool = False             # CUDA: replay a captured forward per window shape (cuda_graphs.py)

    def __post_init__(self) -> None:
        self.roi_size = tuple(int(s) for s in self.roi_size)
        self.mirror_axes = tuple(sorted(set(int(a) for a in self.mirror_axes)))
        if len(self.roi_size) != 3 or min(self.roi_size) < 1:
            raise ValueError(f"roi_size must be three positive ints, got {self.roi_size}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if any(a not in (0, 1, 2) for a in self.mirror_axes):
            raise ValueError(f"mirror_axes are spatial axes 0, 1, 2; got {self.mirror_axes}")
        if self.amp_dtype not in AMP_DTYPES:
            raise ValueError(f"amp_dtype must be one of {sorted(AMP_DTYPES)}, got {self.amp_dtype!r}")


def mirror_combinations(mirror_axes: Sequence[int]) -> List[Tuple[int, ...]]:
    """All subsets of ``mirror_axes``, the empty one (no flip) first: 2**len(axes) entries."""
    axes = tuple(mirror_axes)
    return [combo for size in range(len(axes) + 1) for combo in itertools.combinations(axes, size)]


class SlidingWindowPredictor:
    """Probabilities for whole volumes from any segmentation network.

    Args:
        config: window size, overlap, blending, TTA axes, AMP dtype.
        device: where the network runs; the input is moved there window by window.
        activation: ``"softmax"`` over the class channel (default) or ``"sigmoid"`` per channel.
    """

    def __init__(self, config: SlidingWindowConfig, device: Union[str, torch.device] = "cpu",
                 activation: str = "softmax") -> None:
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be softmax or sigmoid, got {activation!r}")
        self.config = config
        self.device = torch.device(device)
        self.activation = activation
        self._graphed: Optional[GraphedForward] = None

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether windows are replayed from CUDA graphs (``config.cuda_graphs`` on a CUDA device)."""
        return self.config.cuda_graphs and self.device.type == "cuda"

    def _autocast(self):
        dtype = AMP_DTYPES[self.config.amp_dtype]
        if self.device.type == "cuda" and dtype is not None:
            # a CUDA graph must not capture autocast's weight-cast cache (it would outlive the capture)
            return torch.autocast("cuda", dtype=dtype, cache_enabled=not self.uses_cuda_graphs)
        return nullcontext()

    def _runner(self, model: ModelFunction) -> ModelFunction:
        """``model``, or with ``cuda_graphs`` its graph-replaying wrapper (kept while the model is the same)."""
        if not self.uses_cuda_graphs:
            return model
        if self._graphed is None or self._graphed.model is not model:
            self._graphed = GraphedForward(model)
        return self._graphed

    def predict_logits(self, model: ModelFunction, image: torch.Tensor) -> torch.Tensor:
        """Gaussian-blended sliding-window logits, ``(B, C, Z, Y, X)`` → ``(B, K, Z, Y, X)`` float32."""
        config = self.config
        with torch.no_grad(), self._autocast():
            logits = sliding_window_inference(
                image.to(self.device), roi_size=config.roi_size, sw_batch_size=config.sw_batch_size,
                predictor=self._runner(model), overlap=config.overlap, mode=config.blend_mode,
                sigma_scale=config.sigma_scale,
                padding_mode="constant", cval=0.0, sw_device=self.device, device=self.device,
                progress=config.progress)
        return logits.float()

    def _to_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=1) if self.activation == "softmax" else torch.sigmoid(logits)

    def predict_probabilities(self, model: ModelFunction, image: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
        """Class probabilities for a whole volume, on the CPU, float32.

        ``image``: ``(C, Z, Y, X)`` or ``(B, C, Z, Y, X)``; the result has the same layout with ``K`` classes
        instead of ``C`` channels. With mirror axes, the probabilities of the ``2**n`` flipped inputs (each
        flipped back) are averaged.
        """
        tensor = torch.as_tensor(image, dtype=torch.float32)
        unbatched = tensor.ndim == 4
        if unbatched:
            tensor = tensor[None]
        if tensor.ndim != 5:
            raise ValueError(f"expected (C, Z, Y, X) or (B, C, Z, Y, X), got shape {tuple(tensor.shape)}")
        combos = mirror_combinations(self.config.mirror_axes)
        # inference needs eval mode (dropout off, norms frozen); the caller's mode is restored afterwards
        was_training = isinstance(model, torch.nn.Module) and model.training
        if was_training:
            model.eval()
        try:
            total: Optional[torch.Tensor] = None
            for combo in combos:
                dims = [axis + 2 for axis in combo]  # spatial axis -> tensor dim after (B, C)
                flipped = torch.flip(tensor, dims) if dims else tensor
                probabilities = self._to_probabilities(self.predict_logits(model, flipped))
                if dims:
                    probabilities = torch.flip(probabilities, dims)
                total = probabilities if total is None else total + probabilities
        finally:
            if was_training:
                model.train()
        result = (total / len(combos)).cpu()
        return result[0] if unbatched else result


# --------------------------------------------------------------------------------------- geometry helpers
def resize_probabilities(probabilities: torch.Tensor, target_shape: Sequence[int]) -> torch.Tensor:
    """Trilinear resize of ``(K, Z, Y, X)`` probabilities to ``(K, *target_shape)`` (identity if equal).

    Channels are resized one at a time to bound the peak memory on large volumes.
    """
    target = tuple(int(s) for s in target_shape)
    if probabilities.ndim != 4 or len(target) != 3:
        raise ValueError(f"expected (K, Z, Y, X) probabilities and a 3-D shape, got {tuple(probabilities.shape)} "
                         f"and {target}")
    if tuple(probabilities.shape[1:]) == target:
        return probabilities
    channels = [F.interpolate(probabilities[k][None, None].float(), size=target, mode="trilinear",
                              align_corners=False)[0, 0] for k in range(probabilities.shape[0])]
    return torch.stack(channels)


def paste_into_original(cropped: np.ndarray, shape_before_cropping: Sequence[int],
                        bbox: Sequence[Sequence[int]], fill_value: Union[int, float] = 0) -> np.ndarray:
    """Put ``cropped`` ``(..., z, y, x)`` back at ``bbox`` (half-open ``[[z0, z1], [y0, y1], [x0, x1]]``)
    inside an array of spatial shape ``shape_before_cropping`` filled with ``fill_value``."""
    spatial = tuple(int(s) for s in shape_before_cropping)
    bounds = [(int(lo), int(hi)) for lo, hi in bbox]
    box_shape = tuple(hi - lo for lo, hi in bounds)
    if tuple(cropped.shape[-3:]) != box_shape:
        raise ValueError(f"cropped array has spatial shape {tuple(cropped.shape[-3:])} but the crop box "
                         f"{bounds} spans {box_shape}")
    if any(lo < 0 or hi > size for (lo, hi), size in zip(bounds, spatial)):
        raise ValueError(f"crop box {bounds} lies outside the original shape {spatial}")
    full = np.full(cropped.shape[:-3] + spatial, fill_value, dtype=cropped.dtype)
    full[(...,) + tuple(slice(lo, hi) for lo, hi in bounds)] = cropped
    return full


def labels_from_probabilities(probabilities: torch.Tensor) -> np.ndarray:
    """Argmax over the class axis of ``(K, Z, Y, X)`` → ``(Z, Y, X)`` uint8 label map."""
    if probabilities.shape[0] > 256:
        raise ValueError("more than 256 classes do not fit a uint8 label map")
    return probabilities.argmax(dim=0).to(torch.uint8).numpy()


@dataclass
class CasePrediction:
    """Result of :func:`predict_case`.

    ``labels_original``: ``(Z, Y, X)`` uint8 on the raw image grid; ``labels_preprocessed``: ``(Z, Y, X)``
    uint8 on the preprocessed grid (to compare with the preprocessed ``seg``).
    """

    labels_original: np.ndarray
    labels_preprocessed: np.ndarray


def predict_case(predictor: SlidingWindowPredictor, model: ModelFunction, data: np.ndarray,
                 properties: Mapping) -> CasePrediction:
    """Whole-case prediction from a preprocessed ``data`` ``(C, Z, Y, X)`` back to the raw image grid.

    Needs ``properties['shape_after_cropping_before_resample']``, ``['shape_before_cropping']`` and
    ``['bbox_used_for_cropping']``.
    """
    missing = [key for key in ("shape_after_cropping_before_resample", "shape_before_cropping",
                               "bbox_used_for_cropping") if key not in properties]
    if missing:
        raise KeyError(f"case properties lack {missing} (was the case written by the preprocessing script?)")
    probabilities = predictor.predict_probabilities(model, data)
    labels_preprocessed = labels_from_probabilities(probabilities)
    resized = resize_probabilities(probabilities, properties["shape_after_cropping_before_resample"])
    del probabilities
    labels_cropped = labels_from_probabilities(resized)
    labels_original = paste_into_original(labels_cropped, properties["shape_before_cropping"],
                                          properties["bbox_used_for_cropping"], fill_value=0)
    return CasePrediction(labels_original=labels_original, labels_preprocessed=labels_preprocessed)
