"""Axis-aligned 3D boxes: formats, IoU, GIoU, NMS, clipping and mask → box conversion.

This module is the single home of box geometry in the project. Every other module (matcher, losses,
inference, metrics, scripts) calls these functions instead of re-implementing them.

Box formats (corner format, voxel units, half-open: a box ``[lo, hi)`` covers voxels ``lo … hi-1``)
--------------------------------------------------------------------------------------------------
``"xyxyzz"`` — *internal* format of the ``detection`` package and the SegMamba-Retina model:
    ``[x1, y1, x2, y2, z1, z2]`` with x along W (last array axis), y along H, z along D (first array axis).
    Kept from the reference so anchors, box-delta channels and checkpoints stay compatible.
``"zyxzyx"`` — *file* format used in ``detections.json`` and by every metric:
    ``[z1, y1, x1, z2, y2, x2]``, i.e. lower corner then upper corner in array-axis order (z, y, x).
``"xyzxyz"`` — MONAI's ``StandardMode`` ``[x1, y1, z1, x2, y2, z2]``; used only to talk to MONAI (tests).

Conversion happens only through :func:`convert_boxes`. Boxes with a negative extent along an axis have zero
volume (they are never silently re-sorted).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

BoxArray = Union[torch.Tensor, np.ndarray]

INTERNAL_FORMAT = "xyxyzz"
FILE_FORMAT = "zyxzyx"
MONAI_FORMAT = "xyzxyz"

# Index of (lower corner, upper corner) coordinates per format, both listed in (x, y, z) order.
_LOW_HIGH_XYZ = {
    "xyxyzz": ((0, 1, 4), (2, 3, 5)),
    "zyxzyx": ((2, 1, 0), (5, 4, 3)),
    "xyzxyz": ((0, 1, 2), (3, 4, 5)),
}
_EPS = 1e-7


def _check_format(fmt: str) -> None:
    if fmt not in _LOW_HIGH_XYZ:
        raise ValueError(f"unknown box format {fmt!r}; expected one of {sorted(_LOW_HIGH_XYZ)}")


def _check_boxes(boxes: BoxArray, name: str = "boxes") -> None:
    if boxes.ndim < 1 or boxes.shape[-1] != 6:
        raise ValueError(f"{name} must have shape (..., 6), got {tuple(boxes.shape)}")


def convert_boxes(boxes: BoxArray, src: str, dst: str) -> BoxArray:
    """Reorder box coordinates from format ``src`` to ``dst`` (a pure permutation of the last axis).

    Args:
        boxes: ``(..., 6)`` tensor or array.
        src, dst: one of ``"xyxyzz"`` (internal), ``"zyxzyx"`` (file), ``"xyzxyz"`` (MONAI).
    Returns:
        ``(..., 6)`` of the same type and dtype.
    """
    _check_format(src)
    _check_format(dst)
    _check_boxes(boxes)
    if src == dst:
        return boxes
    src_lo, src_hi = _LOW_HIGH_XYZ[src]
    dst_lo, dst_hi = _LOW_HIGH_XYZ[dst]
    perm = [0] * 6
    for axis in range(3):
        perm[dst_lo[axis]] = src_lo[axis]
        perm[dst_hi[axis]] = src_hi[axis]
    return boxes[..., perm]


def lows_highs_xyz(boxes: torch.Tensor, fmt: str = INTERNAL_FORMAT) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split ``(..., 6)`` boxes into lower and upper corners, each ``(..., 3)`` in (x, y, z) order."""
    _check_format(fmt)
    lo, hi = _LOW_HIGH_XYZ[fmt]
    return boxes[..., list(lo)], boxes[..., list(hi)]


def boxes_from_lows_highs_xyz(lows: torch.Tensor, highs: torch.Tensor, fmt: str = INTERNAL_FORMAT) -> torch.Tensor:
    """Inverse of :func:`lows_highs_xyz`: ``(..., 3)`` corners in (x, y, z) order → ``(..., 6)`` boxes."""
    _check_format(fmt)
    lo, hi = _LOW_HIGH_XYZ[fmt]
    out = torch.empty(lows.shape[:-1] + (6,), dtype=lows.dtype, device=lows.device)
    out[..., list(lo)] = lows
    out[..., list(hi)] = highs
    return out


def _as_tensor(boxes: BoxArray) -> torch.Tensor:
    if isinstance(boxes, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float64))
    if not boxes.is_floating_point():
        return boxes.double()
    return boxes


def box_volume(boxes: BoxArray, fmt: str = INTERNAL_FORMAT) -> BoxArray:
    """Volume of ``(..., 6)`` boxes → ``(...)``; negative extents count as zero."""
    _check_boxes(boxes)
    t = _as_tensor(boxes)
    lo, hi = lows_highs_xyz(t, fmt)
    vol = (hi - lo).clamp(min=0).prod(dim=-1)
    return vol.numpy() if isinstance(boxes, np.ndarray) else vol


def box_centers(boxes: torch.Tensor, fmt: str = INTERNAL_FORMAT) -> torch.Tensor:
    """Centres of ``(..., 6)`` boxes → ``(..., 3)`` in (x, y, z) order."""
    _check_boxes(boxes)
    lo, hi = lows_highs_xyz(boxes, fmt)
    return (lo + hi) * 0.5


def _inter_union(lo1, hi1, lo2, hi2):
    """Intersection and union volumes for corners that broadcast against each other."""
    inter = (torch.minimum(hi1, hi2) - torch.maximum(lo1, lo2)).clamp(min=0).prod(dim=-1)
    vol1 = (hi1 - lo1).clamp(min=0).prod(dim=-1)
    vol2 = (hi2 - lo2).clamp(min=0).prod(dim=-1)
    return inter, vol1 + vol2 - inter


def box_iou(boxes1: BoxArray, boxes2: BoxArray, fmt: str = INTERNAL_FORMAT) -> BoxArray:
    """Pairwise IoU matrix.

    Args:
        boxes1: ``(N, 6)``; boxes2: ``(M, 6)``, both in format ``fmt``.
    Returns:
        ``(N, M)`` IoU in [0, 1] (0 where both boxes are empty); numpy if ``boxes1`` is numpy.
    """
    _check_boxes(boxes1, "boxes1")
    _check_boxes(boxes2, "boxes2")
    t1, t2 = _as_tensor(boxes1), _as_tensor(boxes2)
    dtype = torch.promote_types(t1.dtype, t2.dtype)
    t1, t2 = t1.to(dtype), t2.to(dtype)
    lo1, hi1 = lows_highs_xyz(t1, fmt)
    lo2, hi2 = lows_highs_xyz(t2, fmt)
    inter, union = _inter_union(lo1[:, None], hi1[:, None], lo2[None], hi2[None])
    iou = inter / union.clamp(min=_EPS)
    return iou.numpy() if isinstance(boxes1, np.ndarray) else iou


def box_iou_pairwise(boxes1: torch.Tensor, boxes2: torch.Tensor, fmt: str = INTERNAL_FORMAT) -> torch.Tensor:
    """Element-wise IoU of two aligned sets ``(..., 6)`` → ``(...)``."""
    lo1, hi1 = lows_highs_xyz(boxes1, fmt)
    lo2, hi2 = lows_highs_xyz(boxes2, fmt)
    inter, union = _inter_union(lo1, hi1, lo2, hi2)
    return inter / union.clamp(min=_EPS)


def generalized_box_iou_pairwise(boxes1: torch.Tensor, boxes2: torch.Tensor,
                                 fmt: str = INTERNAL_FORMAT) -> torch.Tensor:
    """Element-wise generalised IoU (Rezatofighi et al., 2019) of aligned ``(..., 6)`` boxes → ``(...)``.

    GIoU = IoU − (E − U) / E with E the volume of the smallest enclosing box and U the union. Differentiable;
    values in (−1, 1].
    """
    lo1, hi1 = lows_highs_xyz(boxes1, fmt)
    lo2, hi2 = lows_highs_xyz(boxes2, fmt)
    inter, union = _inter_union(lo1, hi1, lo2, hi2)
    union = union.clamp(min=_EPS)
    enclosing = (torch.maximum(hi1, hi2) - torch.minimum(lo1, lo2)).clamp(min=0).prod(dim=-1).clamp(min=_EPS)
    return inter / union - (enclosing - union) / enclosing


def points_in_boxes(points_xyz: torch.Tensor, boxes: torch.Tensor, margin: float = 0.0,
                    fmt: str = INTERNAL_FORMAT) -> torch.Tensor:
    """Whether each point lies inside the matching box, at least ``margin`` from every face.

    Args:
        points_xyz: ``(..., 3)`` points in (x, y, z) order; boxes: ``(..., 6)`` broadcastable to the points.
    Returns:
        bool ``(...)``.
    """
    lo, hi = lows_highs_xyz(boxes, fmt)
    dist_to_faces = torch.cat([points_xyz - lo, hi - points_xyz], dim=-1)
    return dist_to_faces.min(dim=-1).values > margin


def clip_boxes_to_shape(boxes: torch.Tensor, shape_zyx: Sequence[int], fmt: str = INTERNAL_FORMAT) -> torch.Tensor:
    """Clamp ``(..., 6)`` boxes to a volume of array shape ``(Z, Y, X)``: every coordinate in [0, size]."""
    lo, hi = lows_highs_xyz(boxes, fmt)
    size_xyz = torch.tensor([shape_zyx[2], shape_zyx[1], shape_zyx[0]], dtype=boxes.dtype, device=boxes.device)
    zero = torch.zeros_like(size_xyz)
    lo = torch.maximum(torch.minimum(lo, size_xyz), zero)
    hi = torch.maximum(torch.minimum(hi, size_xyz), zero)
    return boxes_from_lows_highs_xyz(lo, hi, fmt)


def shift_boxes(boxes: torch.Tensor, offset_zyx: Sequence[float], fmt: str = INTERNAL_FORMAT) -> torch.Tensor:
    """Translate ``(..., 6)`` boxes by an offset given in array-axis order (z, y, x)."""
    lo, hi = lows_highs_xyz(boxes, fmt)
    shift = torch.tensor([offset_zyx[2], offset_zyx[1], offset_zyx[0]], dtype=boxes.dtype, device=boxes.device)
    return boxes_from_lows_highs_xyz(lo + shift, hi + shift, fmt)


def nms_3d(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
           max_detections: Optional[int] = None, pre_nms_top_k: Optional[int] = None,
           fmt: str = INTERNAL_FORMAT) -> torch.Tensor:
    """Greedy non-maximum suppression.

    Boxes are visited by descending score (stable for ties); a box is dropped when its IoU with an already kept
    box is strictly greater than ``iou_threshold``. Each step compares one kept box with all remaining boxes in
    one tensor operation, so the Python loop runs once per *kept* box (at most ``max_detections`` times).

    Args:
        boxes: ``(N, 6)``; scores: ``(N,)``.
        iou_threshold: suppression threshold in [0, 1].
        max_detections: stop after this many kept boxes (None = no cap).
        pre_nms_top_k: only the ``k`` best-scoring boxes enter NMS (None = all).
    Returns:
        ``(K,)`` long indices into ``boxes``, ordered by descending score.
    """
    _check_boxes(boxes)
    if scores.ndim != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"scores must have shape ({boxes.shape[0]},), got {tuple(scores.shape)}")
    if boxes.shape[0] == 0 or (max_detections is not None and max_detections <= 0):
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True, stable=True)
    if pre_nms_top_k is not None and pre_nms_top_k > 0:
        order = order[:pre_nms_top_k]
    lo, hi = lows_highs_xyz(boxes[order], fmt)
    remaining = torch.arange(order.shape[0], device=boxes.device)
    kept = []
    while remaining.numel() > 0:
        first = remaining[0]
        kept.append(first)
        if max_detections is not None and len(kept) >= max_detections:
            break
        rest = remaining[1:]
        inter, union = _inter_union(lo[first][None], hi[first][None], lo[rest], hi[rest])
        remaining = rest[inter / union.clamp(min=_EPS) <= iou_threshold]
    return order[torch.stack(kept)]


def mask_to_boxes(mask: np.ndarray, connectivity: int = 6, min_voxels: int = 1
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """Boxes of the connected components of a binary 3D mask, in *file* format.

    Args:
        mask: ``(Z, Y, X)`` array; voxels ``> 0`` are foreground (so the ``-1`` outside-image label is background).
        connectivity: 6, 18 or 26 (face, face+edge, face+edge+corner neighbours).
        min_voxels: components with fewer voxels are dropped.
    Returns:
        ``boxes`` int64 ``(K, 6)`` as ``[z1, y1, x1, z2, y2, x2]`` half-open, sorted by (z1, y1, x1), and
        ``volumes`` int64 ``(K,)`` voxel counts of the components.
    """
    from scipy import ndimage

    if mask.ndim != 3:
        raise ValueError(f"mask must be 3-D (Z, Y, X), got shape {mask.shape}")
    rank = {6: 1, 18: 2, 26: 3}.get(connectivity)
    if rank is None:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    labels, count = ndimage.label(mask > 0, structure=ndimage.generate_binary_structure(3, rank))
    if count == 0:
        return np.zeros((0, 6), dtype=np.int64), np.zeros((0,), dtype=np.int64)
    volumes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    boxes = []
    vols = []
    for index, slices in enumerate(ndimage.find_objects(labels)):
        if slices is None or volumes[index] < min_voxels:
            continue
        boxes.append([slices[0].start, slices[1].start, slices[2].start,
                      slices[0].stop, slices[1].stop, slices[2].stop])
        vols.append(volumes[index])
    if not boxes:
        return np.zeros((0, 6), dtype=np.int64), np.zeros((0,), dtype=np.int64)
    boxes_arr = np.asarray(boxes, dtype=np.int64)
    vols_arr = np.asarray(vols, dtype=np.int64)
    order = np.lexsort((boxes_arr[:, 2], boxes_arr[:, 1], boxes_arr[:, 0]))
    return boxes_arr[order], vols_arr[order]


def boxes_to_original_volume(boxes: BoxArray, shape_preprocessed_zyx: Sequence[int],
                             shape_cropped_zyx: Sequence[int], crop_bbox_zyx: Sequence[Sequence[int]],
                             shape_original_zyx: Sequence[int], fmt: str = INTERNAL_FORMAT) -> np.ndarray:
    """Map boxes from the preprocessed grid back to voxel coordinates of the original (uncropped) volume.

    The preprocessed grid is the crop ``crop_bbox_zyx`` (``[[z0, z1], [y0, y1], [x0, x1]]``, half-open) of the
    original volume, resampled from ``shape_cropped_zyx`` to ``shape_preprocessed_zyx`` (identical when no
    resampling happened). Coordinates are scaled per axis, shifted by the crop origin and clipped to the volume.

    Returns:
        float64 ``(N, 6)`` boxes in the *file* format ``[z1, y1, x1, z2, y2, x2]``.
    """
    t = _as_tensor(boxes).double().reshape(-1, 6)
    lo, hi = lows_highs_xyz(t, fmt)  # (x, y, z) order
    scale_xyz = torch.tensor([shape_cropped_zyx[2] / shape_preprocessed_zyx[2],
                              shape_cropped_zyx[1] / shape_preprocessed_zyx[1],
                              shape_cropped_zyx[0] / shape_preprocessed_zyx[0]], dtype=torch.float64)
    offset_xyz = torch.tensor([crop_bbox_zyx[2][0], crop_bbox_zyx[1][0], crop_bbox_zyx[0][0]], dtype=torch.float64)
    lo = lo * scale_xyz + offset_xyz
    hi = hi * scale_xyz + offset_xyz
    file_boxes = boxes_from_lows_highs_xyz(lo, hi, FILE_FORMAT)
    return clip_boxes_to_shape(file_boxes, shape_original_zyx, FILE_FORMAT).numpy()
