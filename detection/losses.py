"""Detection losses: sigmoid focal loss, smooth-L1 on box deltas, GIoU loss, and the RetinaNet loss that ties
matcher, sampler and box coder together.

Loss of one batch (as in the reference training script, with the focal parameters actually taken from flags):

* anchors are assigned by :class:`~detection.atss_matcher.ATSSMatcher` and sampled by
  :class:`~detection.sampler.HardNegativeSampler` per image;
* ``cls`` = Σ focal(sampled positives and negatives);
* ``reg`` = ``l1_weight`` · Σ smoothL1(pred deltas − target deltas) + ``giou_weight`` · Σ (1 − GIoU(decoded
  prediction, GT)) over sampled positives;
* both sums are divided by max(1, number of sampled positives in the batch).

The centerness output is not trained (see :mod:`detection.retina_head`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .atss_matcher import ATSSMatcher
from .box_coder import BoxCoder3D
from .boxes import generalized_box_iou_pairwise
from .sampler import HardNegativeSampler


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "sum") -> torch.Tensor:
    """Binary focal loss (Lin et al., 2017) on logits.

    FL = α_t (1 − p_t)^γ · BCE(logit, target) with p_t = p for targets 1 and 1 − p for targets 0,
    α_t = α for targets 1 and 1 − α for targets 0 (``alpha < 0`` disables the weighting).

    Args:
        logits, targets: same shape; targets in {0, 1} (soft targets also work).
        reduction: ``"sum"``, ``"mean"`` or ``"none"``.
    """
    targets = targets.to(logits.dtype)
    prob = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = bce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    if reduction == "none":
        return loss
    raise ValueError(f"unknown reduction {reduction!r}")


def giou_loss(pred_boxes: torch.Tensor, target_boxes: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """1 − GIoU of aligned ``(..., 6)`` internal-format boxes."""
    loss = 1.0 - generalized_box_iou_pairwise(pred_boxes, target_boxes)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    if reduction == "none":
        return loss
    raise ValueError(f"unknown reduction {reduction!r}")


@dataclass
class DetectionLossOutput:
    """Normalised loss terms of one batch; ``total = cls + reg``."""
    cls: torch.Tensor
    reg: torch.Tensor
    l1: torch.Tensor
    giou: torch.Tensor
    num_positives: int

    @property
    def total(self) -> torch.Tensor:
        return self.cls + self.reg


class RetinaDetectionLoss:
    """Focal + smooth-L1 + GIoU loss with ATSS matching and hard-negative mining.

    Args:
        matcher, sampler, box_coder: the components (defaults: ATSS k=9, 256 anchors / 25 % positives, unit weights).
        focal_alpha, focal_gamma: focal-loss parameters.
        smooth_l1_beta: transition point of the smooth-L1 (1.0 as the reference training script).
        l1_weight, giou_weight: weights of the two regression terms.
    """

    def __init__(self, matcher: Optional[ATSSMatcher] = None, sampler: Optional[HardNegativeSampler] = None,
                 box_coder: Optional[BoxCoder3D] = None, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 smooth_l1_beta: float = 1.0, l1_weight: float = 1.0, giou_weight: float = 2.0) -> None:
        self.matcher = matcher or ATSSMatcher()
        self.sampler = sampler or HardNegativeSampler()
        self.box_coder = box_coder or BoxCoder3D()
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.smooth_l1_beta = smooth_l1_beta
        self.l1_weight = l1_weight
        self.giou_weight = giou_weight

    def __call__(self, cls_logits: torch.Tensor, box_deltas: torch.Tensor, anchors: torch.Tensor,
                 num_anchors_per_level: Sequence[int], num_anchors_per_location: int,
                 gt_boxes: Sequence[torch.Tensor], generator: Optional[torch.Generator] = None
                 ) -> DetectionLossOutput:
        """Args:
            cls_logits: ``(B, N, K)``; box_deltas: ``(B, N, 6)``; anchors: ``(N, 6)``;
            gt_boxes: per image a ``(M_b, 6)`` tensor of internal-format boxes (may be empty).
        """
        batch = cls_logits.shape[0]
        if len(gt_boxes) != batch:
            raise ValueError(f"got {len(gt_boxes)} GT box sets for a batch of {batch}")
        anchors = anchors.to(box_deltas.device)
        zero = cls_logits.sum() * 0.0
        cls_total, l1_total, giou_total = zero, zero, zero
        num_positives = 0
        for b in range(batch):
            gt = gt_boxes[b].to(device=anchors.device, dtype=anchors.dtype).reshape(-1, 6)
            match = self.matcher(gt, anchors, num_anchors_per_level, num_anchors_per_location)
            scores = torch.sigmoid(cls_logits[b].detach().float()).max(dim=1).values
            pos_mask, neg_mask = self.sampler(match.labels, scores, generator)
            sampled = pos_mask | neg_mask
            targets = torch.zeros_like(cls_logits[b])
            targets[pos_mask, 0] = 1.0
            cls_total = cls_total + sigmoid_focal_loss(cls_logits[b][sampled].float(), targets[sampled].float(),
                                                       self.focal_alpha, self.focal_gamma)
            if pos_mask.any():
                pos_anchors = anchors[pos_mask]
                pos_gt = gt[match.matched_gt[pos_mask]]
                pred = box_deltas[b][pos_mask].float()
                target_deltas = self.box_coder.encode(pos_gt.float(), pos_anchors.float())
                l1_total = l1_total + F.smooth_l1_loss(pred, target_deltas, beta=self.smooth_l1_beta,
                                                       reduction="sum")
                decoded = self.box_coder.decode(pred, pos_anchors.float())
                giou_total = giou_total + giou_loss(decoded, pos_gt.float())
                num_positives += int(pos_mask.sum())
        norm = float(max(1, num_positives))
        l1 = l1_total / norm
        giou = giou_total / norm
        return DetectionLossOutput(cls=cls_total / norm, reg=self.l1_weight * l1 + self.giou_weight * giou,
                                   l1=l1, giou=giou, num_positives=num_positives)
