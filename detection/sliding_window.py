"""Whole-volume inference of SegMamba-Retina: one forward pass per window gives both the segmentation
probabilities (Gaussian-blended across windows) and the window's boxes (merged by a global NMS).

Window placement (nnU-Net style, fixing the reference's coverage hole): along every axis the starts are spread
evenly from 0 to ``size - patch`` with a step of at most ``patch * (1 - overlap)``, so the last window always
ends at the volume's edge and every voxel is covered; an axis shorter than the patch gets one window and the
volume is zero-padded at its far end.

Per window, anchors scoring above ``score_threshold`` (at most ``pre_nms_top_k``) are decoded, suppressed by NMS
within the window and shifted by the window's start. After the last window all boxes are clipped to the volume
and one global NMS keeps at most ``max_detections`` boxes (scores sorted descending).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import product
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .boxes import clip_boxes_to_shape, box_volume, nms_3d, shift_boxes
from .postprocess import PostProcessConfig, postprocess_detections
from .retina_head import flatten_level_outputs


def window_starts(size: int, patch: int, overlap: float) -> List[int]:
    """Window starts along one axis (see module docstring); always includes 0 and ``size - patch``."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if size <= patch:
        return [0]
    target_step = max(1, int(patch * (1.0 - overlap)))
    count = math.ceil((size - patch) / target_step) + 1
    return sorted({int(round(i * (size - patch) / (count - 1))) for i in range(count)})


def window_grid(shape_zyx: Sequence[int], patch_zyx: Sequence[int], overlap: float) -> List[Tuple[int, int, int]]:
    """All window starts ``(z, y, x)`` of a volume, in C order."""
    axes = [window_starts(int(s), int(p), overlap) for s, p in zip(shape_zyx, patch_zyx)]
    return [tuple(start) for start in product(*axes)]


def gaussian_importance(patch_zyx: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """``(Z, Y, X)`` Gaussian window weights (sigma = ``sigma_scale`` × patch size per axis), maximum 1,
    floored at 1e-3 so window borders still count a little."""
    profiles = []
    for size in patch_zyx:
        coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
        sigma = max(sigma_scale * size, 1e-6)
        profiles.append(torch.exp(-0.5 * (coords / sigma) ** 2))
    weights = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    weights = weights / weights.max()
    return weights.clamp(min=1e-3).float()


@dataclass
class RetinaInferenceConfig:
    """Settings of :func:`predict_volume`."""
    patch_size: Tuple[int, int, int] = (128, 128, 128)
    overlap: float = 0.5
    batch_size: int = 2
    score_threshold: float = 0.05
    nms_threshold: float = 0.5
    pre_nms_top_k: int = 1000
    max_detections_per_window: int = 100
    max_detections: int = 100
    sigma_scale: float = 0.125
    amp: bool = True  # autocast (fp16) on CUDA; the CPU always runs fp32
    segmentation: bool = True

    def window_postprocess(self) -> PostProcessConfig:
        return PostProcessConfig(score_threshold=self.score_threshold, pre_nms_top_k=self.pre_nms_top_k,
                                 nms_threshold=self.nms_threshold, max_detections=self.max_detections_per_window)


@dataclass
class VolumePrediction:
    """Result on the (preprocessed) input grid.

    Attributes:
        probabilities: ``(K, Z, Y, X)`` float32 class probabilities (None without segmentation).
        boxes: ``(M, 6)`` internal-format boxes in voxels of the input volume.
        scores: ``(M,)`` descending.
    """
    probabilities: Optional[torch.Tensor]
    boxes: torch.Tensor
    scores: torch.Tensor


def _crop_pad(volume: torch.Tensor, start: Sequence[int], patch: Sequence[int]) -> torch.Tensor:
    """``(C, Z, Y, X)`` → ``(C, *patch)`` window at ``start`` (zero-padded past the far end)."""
    window = volume[:, start[0]:start[0] + patch[0], start[1]:start[1] + patch[1], start[2]:start[2] + patch[2]]
    pads = [patch[2] - window.shape[3], patch[1] - window.shape[2], patch[0] - window.shape[1]]
    if any(pads):
        window = torch.nn.functional.pad(window, (0, pads[0], 0, pads[1], 0, pads[2]))
    return window


@torch.no_grad()
def predict_volume(model: torch.nn.Module, volume, config: RetinaInferenceConfig,
                   device: torch.device | str = "cpu", progress: bool = False) -> VolumePrediction:
    """Sliding-window segmentation + detection of one volume ``(C, Z, Y, X)`` with a SegMamba-Retina model.

    The model is put in eval mode for the call (its previous mode is restored).
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    image = torch.as_tensor(volume, dtype=torch.float32)
    if image.ndim != 4:
        raise ValueError(f"expected a (C, Z, Y, X) volume, got shape {tuple(image.shape)}")
    shape = tuple(int(s) for s in image.shape[1:])
    patch = tuple(int(p) for p in config.patch_size)
    windows = window_grid(shape, patch, config.overlap)
    importance = gaussian_importance(patch, config.sigma_scale) if config.segmentation else None
    probability_sum: Optional[torch.Tensor] = None
    weight_sum = torch.zeros(shape, dtype=torch.float32) if config.segmentation else None
    all_boxes: List[torch.Tensor] = []
    all_scores: List[torch.Tensor] = []
    window_pp = config.window_postprocess()
    use_amp = config.amp and device.type == "cuda"
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=len(windows), desc="windows", leave=False, disable=not progress)
        for first in range(0, len(windows), max(1, config.batch_size)):
            batch_starts = windows[first:first + max(1, config.batch_size)]
            batch = torch.stack([_crop_pad(image, s, patch) for s in batch_starts]).to(device)
            with (torch.autocast("cuda", dtype=torch.float16) if use_amp else nullcontext()):
                out = model(batch, return_seg=config.segmentation, return_det=True)
            cls = flatten_level_outputs(out["cls_logits"], model.num_classes)
            deltas = flatten_level_outputs(out["box_deltas"], 6)
            anchors = out["anchors"]
            if config.segmentation:
                probabilities = torch.softmax(out["seg_logits"].float(), dim=1).cpu()
                if probability_sum is None:
                    probability_sum = torch.zeros((probabilities.shape[1],) + shape, dtype=torch.float32)
            for j, start in enumerate(batch_starts):
                boxes, scores = postprocess_detections(cls[j], deltas[j], anchors, model.box_coder, window_pp)
                if boxes.numel():
                    all_boxes.append(shift_boxes(boxes.cpu(), start))
                    all_scores.append(scores.cpu())
                if config.segmentation:
                    extent = [min(p, s - st) for p, s, st in zip(patch, shape, start)]
                    region = tuple(slice(st, st + e) for st, e in zip(start, extent))
                    weight = importance[:extent[0], :extent[1], :extent[2]]
                    probability_sum[(slice(None),) + region] += probabilities[j][:, :extent[0], :extent[1], :extent[2]] * weight
                    weight_sum[region] += weight
            bar.update(len(batch_starts))
        bar.close()
    finally:
        if was_training:
            model.train()
    if all_boxes:
        boxes = clip_boxes_to_shape(torch.cat(all_boxes), shape)
        scores = torch.cat(all_scores)
        valid = box_volume(boxes) > 0
        boxes, scores = boxes[valid], scores[valid]
        keep = nms_3d(boxes, scores, config.nms_threshold, max_detections=config.max_detections)
        boxes, scores = boxes[keep], scores[keep]
    else:
        boxes, scores = torch.zeros(0, 6), torch.zeros(0)
    probabilities = None
    if config.segmentation:
        probabilities = probability_sum / weight_sum.clamp(min=1e-8)
    return VolumePrediction(probabilities, boxes, scores)


def boxes_in_original_volume(boxes: torch.Tensor, properties: dict) -> np.ndarray:
    """Internal-format boxes on the preprocessed grid → file-format boxes ``[z1, y1, x1, z2, y2, x2]`` in voxels
    of the raw volume, using the case properties written by the preprocessing."""
    from .boxes import boxes_to_original_volume

    return boxes_to_original_volume(boxes, properties["shape_after_resample"],
                                    properties["shape_after_cropping_before_resample"],
                                    properties["bbox_used_for_cropping"], properties["shape_before_cropping"])
