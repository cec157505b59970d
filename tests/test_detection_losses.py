"""Focal, GIoU and the combined RetinaNet loss against hand-computed values."""
import math

import pytest
import torch

from detection.anchors import AnchorGenerator3D
from detection.atss_matcher import ATSSMatcher
from detection.box_coder import BoxCoder3D
from detection.losses import RetinaDetectionLoss, giou_loss, sigmoid_focal_loss
from detection.sampler import HardNegativeSampler


def focal_by_hand(logit, target, alpha, gamma):
    p = 1 / (1 + math.exp(-logit))
    if target == 1:
        return alpha * (1 - p) ** gamma * -math.log(p)
    return (1 - alpha) * p ** gamma * -math.log(1 - p)


def test_focal_loss_matches_hand_computed_values_for_positive_and_negative_anchors():
    logits = torch.tensor([0.0, 2.0, -1.5, 3.0], dtype=torch.float64)
    targets = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    per_anchor = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="none")
    expected = [focal_by_hand(l, t, 0.25, 2.0) for l, t in zip(logits.tolist(), targets.tolist())]
    assert per_anchor.tolist() == pytest.approx(expected, rel=1e-10)
    # logit 0, target 1: 0.25 * 0.5^2 * ln 2
    assert per_anchor[0].item() == pytest.approx(0.25 * 0.25 * math.log(2))
    assert sigmoid_focal_loss(logits, targets).item() == pytest.approx(sum(expected), rel=1e-10)


def test_focal_loss_alpha_and_gamma_change_the_value_and_reduce_to_bce():
    logits = torch.tensor([0.3, -2.0, 1.0])
    targets = torch.tensor([1.0, 0.0, 0.0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
    assert sigmoid_focal_loss(logits, targets, alpha=-1, gamma=0.0).item() == pytest.approx(bce.item(), rel=1e-6)
    a = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0).item()
    b = sigmoid_focal_loss(logits, targets, alpha=0.5, gamma=2.0).item()
    c = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=1.0).item()
    expected_b = sum(focal_by_hand(l, t, 0.5, 2.0) for l, t in zip(logits.tolist(), targets.tolist()))
    assert b == pytest.approx(expected_b, rel=1e-5)
    assert len({round(a, 6), round(b, 6), round(c, 6)}) == 3


def test_giou_loss_is_zero_for_identical_boxes_and_hand_value_for_disjoint_cubes():
    box = torch.tensor([[1.0, 2.0, 5.0, 6.0, 0.0, 3.0]])
    assert giou_loss(box, box).item() == pytest.approx(0.0, abs=1e-6)
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 1.0]])
    b = torch.tensor([[2.0, 2.0, 3.0, 3.0, 2.0, 3.0]])
    assert giou_loss(a, b).item() == pytest.approx(1 + 25 / 27)
    # half-overlapping along x: inter 1, union 3, enclosing 3 -> GIoU = 1/3
    c = torch.tensor([[1.0, 0.0, 3.0, 1.0, 0.0, 1.0]])
    d = torch.tensor([[0.0, 0.0, 2.0, 1.0, 0.0, 1.0]])
    assert giou_loss(c, d).item() == pytest.approx(2 / 3)


def make_setup():
    generator = AnchorGenerator3D(sizes=((6, 12), (12, 24)), aspect_ratios=(1.0,), z_ratios=(0.5, 1.0),
                                  strides=(4, 8))
    anchors, per_level = generator.grid_anchors([(8, 8, 8), (4, 4, 4)])
    return anchors, per_level, generator.num_anchors_per_location


def test_retina_loss_with_perfect_regression_has_zero_reg_and_hand_computed_focal_sum():
    anchors, per_level, per_location = make_setup()
    gt = torch.tensor([[8.0, 9.0, 18.0, 17.0, 10.0, 20.0]])
    coder = BoxCoder3D()
    deltas = coder.encode(gt.expand(anchors.shape[0], 6), anchors)[None]  # every anchor regresses exactly gt
    logit = -1.0
    cls = torch.full((1, anchors.shape[0], 1), logit)
    loss_fn = RetinaDetectionLoss(ATSSMatcher(3), HardNegativeSampler(64, 0.25), coder, focal_alpha=0.3,
                                  focal_gamma=1.5)
    out = loss_fn(cls, deltas, anchors, per_level, per_location, [gt], torch.Generator().manual_seed(0))
    num_pos = min(ATSSMatcher(3)(gt, anchors, per_level, per_location).num_positives, 16)
    assert out.num_positives == num_pos > 0
    assert out.l1.item() == pytest.approx(0.0, abs=1e-5)
    assert out.giou.item() == pytest.approx(0.0, abs=1e-5)
    num_neg = 64 - num_pos
    expected_cls = (num_pos * focal_by_hand(logit, 1, 0.3, 1.5) + num_neg * focal_by_hand(logit, 0, 0.3, 1.5)) / num_pos
    assert out.cls.item() == pytest.approx(expected_cls, rel=1e-5)


def test_retina_loss_regression_terms_use_beta_one_smooth_l1_and_weights():
    anchors, per_level, per_location = make_setup()
    gt = torch.tensor([[8.0, 9.0, 18.0, 17.0, 10.0, 20.0]])
    coder = BoxCoder3D()
    targets = coder.encode(gt.expand(anchors.shape[0], 6), anchors)
    offset = torch.tensor([0.5, 0.0, 0.0, 2.0, 0.0, 0.0])  # |0.5| < 1: 0.5 * 0.25; |2| >= 1: 2 - 0.5
    deltas = (targets + offset)[None]
    loss_fn = RetinaDetectionLoss(ATSSMatcher(3), HardNegativeSampler(64, 0.25), coder, l1_weight=1.0,
                                  giou_weight=2.0)
    out = loss_fn(torch.zeros(1, anchors.shape[0], 1), deltas, anchors, per_level, per_location, [gt])
    assert out.l1.item() == pytest.approx(0.125 + 1.5, rel=1e-5)
    assert out.reg.item() == pytest.approx(out.l1.item() + 2.0 * out.giou.item(), rel=1e-6)
    assert out.giou.item() > 0


def test_retina_loss_without_gt_is_only_focal_on_negatives_and_gradients_flow():
    anchors, per_level, per_location = make_setup()
    cls = torch.zeros(2, anchors.shape[0], 1, requires_grad=True)
    deltas = torch.zeros(2, anchors.shape[0], 6, requires_grad=True)
    out = RetinaDetectionLoss(sampler=HardNegativeSampler(32, 0.25))(
        cls, deltas, anchors, per_level, per_location, [torch.zeros(0, 6), torch.zeros(0, 6)])
    assert out.num_positives == 0 and out.reg.item() == 0.0
    assert out.cls.item() == pytest.approx(2 * 32 * focal_by_hand(0.0, 0, 0.25, 2.0), rel=1e-5)
    out.total.backward()
    assert cls.grad.abs().sum() > 0
