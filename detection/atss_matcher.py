"""Adaptive Training Sample Selection (Zhang et al., CVPR 2020) for 3D anchors.

For each ground-truth box and each pyramid level the ``k`` anchor *locations* whose centres are nearest to the
box centre are chosen, and **all** anchors at those locations become candidates (``k * A`` per level; the
reference took ``k`` anchors, i.e. half of one location's co-centred anchors). With the candidates' IoUs the
threshold is ``mean + std`` (unbiased std), floored at ``min_iou``. A candidate is positive when its IoU reaches
the threshold and (with ``center_in_gt``) its centre lies inside the box by more than ``center_margin`` voxels.
An anchor claimed by several boxes keeps the box with the higher IoU.

Fallback (``ensure_positive``): a box left without any positive (very small lesions, where every candidate
centre can fall outside the box) gets its highest-IoU candidate as a positive, provided that IoU is > 0 and the
anchor is not already positive for another box.

All boxes in the internal format ``[x1, y1, x2, y2, z1, z2]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .boxes import box_centers, box_iou_pairwise, points_in_boxes


@dataclass
class MatchResult:
    """Per-anchor assignment for one image.

    Attributes:
        matched_gt: ``(N,)`` long, index of the matched GT box, ``-1`` for background.
        matched_iou: ``(N,)`` IoU with the matched box (0 for background).
        labels: ``(N,)`` long, 1 for positives, 0 for negatives.
    """
    matched_gt: torch.Tensor
    matched_iou: torch.Tensor
    labels: torch.Tensor

    @property
    def num_positives(self) -> int:
        return int(self.labels.sum())


class ATSSMatcher:
    """ATSS anchor assignment.

    Args:
        num_candidates: ``k``, candidate locations per level and GT box.
        center_in_gt: require candidate anchor centres inside the GT box.
        min_iou: floor of the adaptive threshold.
        center_margin: distance (voxels) a centre must keep from the box faces to count as inside.
        ensure_positive: guarantee at least one positive anchor per GT box (see module docstring).
    """

    def __init__(self, num_candidates: int = 9, center_in_gt: bool = True, min_iou: float = 0.0,
                 center_margin: float = 0.01, ensure_positive: bool = True) -> None:
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        self.num_candidates = num_candidates
        self.center_in_gt = center_in_gt
        self.min_iou = min_iou
        self.center_margin = center_margin
        self.ensure_positive = ensure_positive

    def _candidates(self, gt_centres: torch.Tensor, anchors: torch.Tensor, num_anchors_per_level: Sequence[int],
                    num_anchors_per_location: int) -> torch.Tensor:
        """``(M, C)`` long indices of candidate anchors (k nearest locations per level, all their anchors)."""
        per_anchor = torch.arange(num_anchors_per_location, device=anchors.device)
        candidates = []
        start = 0
        for count in num_anchors_per_level:
            if count % num_anchors_per_location != 0:
                raise ValueError(f"level with {count} anchors is not a multiple of {num_anchors_per_location} "
                                 "anchors per location")
            level_anchors = anchors[start:start + count].view(-1, num_anchors_per_location, 6)
            # All anchors of one location share a centre; the first anchor represents it.
            location_centres = box_centers(level_anchors[:, 0, :])
            distances = torch.cdist(gt_centres.to(location_centres.dtype), location_centres)  # (M, L)
            k = min(self.num_candidates, location_centres.shape[0])
            nearest = distances.topk(k, dim=1, largest=False).indices  # (M, k)
            anchor_idx = start + nearest[:, :, None] * num_anchors_per_location + per_anchor
            candidates.append(anchor_idx.reshape(gt_centres.shape[0], -1))
            start += count
        if start != anchors.shape[0]:
            raise ValueError(f"num_anchors_per_level sums to {start} but there are {anchors.shape[0]} anchors")
        return torch.cat(candidates, dim=1)

    def __call__(self, gt_boxes: torch.Tensor, anchors: torch.Tensor, num_anchors_per_level: Sequence[int],
                 num_anchors_per_location: int) -> MatchResult:
        """Match one image.

        Args:
            gt_boxes: ``(M, 6)``; anchors: ``(N, 6)``; num_anchors_per_level: anchors (not locations) per level;
            num_anchors_per_location: A.
        """
        num_anchors = anchors.shape[0]
        device = anchors.device
        matched_gt = torch.full((num_anchors,), -1, dtype=torch.long, device=device)
        matched_iou = torch.zeros(num_anchors, dtype=anchors.dtype, device=device)
        if gt_boxes.numel() == 0:
            return MatchResult(matched_gt, matched_iou, torch.zeros_like(matched_gt))
        gt_boxes = gt_boxes.to(anchors.dtype)
        num_gt = gt_boxes.shape[0]
        candidates = self._candidates(box_centers(gt_boxes), anchors, num_anchors_per_level,
                                      num_anchors_per_location)  # (M, C)
        candidate_boxes = anchors[candidates]  # (M, C, 6)
        ious = box_iou_pairwise(candidate_boxes, gt_boxes[:, None, :])  # (M, C)
        if ious.shape[1] > 1:
            threshold = ious.mean(dim=1) + ious.std(dim=1)
        else:
            threshold = ious[:, 0]
        threshold = threshold.clamp(min=self.min_iou)
        positive = ious >= threshold[:, None]
        if self.center_in_gt:
            inside = points_in_boxes(box_centers(candidate_boxes), gt_boxes[:, None, :], margin=self.center_margin)
            positive &= inside
        # Resolve anchors claimed by several boxes: the higher IoU wins (M is small, loop over boxes).
        best_iou = torch.full((num_anchors,), -1.0, dtype=anchors.dtype, device=device)
        for gt_index in range(num_gt):
            idx = candidates[gt_index][positive[gt_index]]
            vals = ious[gt_index][positive[gt_index]]
            better = vals > best_iou[idx]
            best_iou[idx[better]] = vals[better]
            matched_gt[idx[better]] = gt_index
        if self.ensure_positive:
            for gt_index in range(num_gt):
                if bool((matched_gt == gt_index).any()):
                    continue
                order = torch.argsort(ious[gt_index], descending=True)
                for j in order.tolist():
                    if float(ious[gt_index, j]) <= 0:
                        break
                    anchor_index = int(candidates[gt_index, j])
                    if matched_gt[anchor_index] < 0:
                        matched_gt[anchor_index] = gt_index
                        best_iou[anchor_index] = ious[gt_index, j]
                        break
        positive_mask = matched_gt >= 0
        matched_iou[positive_mask] = best_iou[positive_mask]
        return MatchResult(matched_gt, matched_iou, positive_mask.long())
