"""ATSS matching (vs MONAI's ATSSMatcher) and hard-negative sampling."""
import pytest
import torch
from monai.apps.detection.utils.ATSS_matcher import ATSSMatcher as MonaiATSSMatcher
from monai.data.box_utils import box_iou as monai_box_iou

from detection.anchors import AnchorGenerator3D
from detection.atss_matcher import ATSSMatcher
from detection.boxes import INTERNAL_FORMAT, MONAI_FORMAT, convert_boxes
from detection.sampler import HardNegativeSampler


def small_anchor_setup():
    """4 anchors per location on an 8^3 (stride 4) and a 4^3 (stride 8) grid: a 32^3 patch."""
    generator = AnchorGenerator3D(sizes=((6, 12), (12, 24)), aspect_ratios=(1.0,), z_ratios=(0.5, 1.0),
                                  strides=(4, 8))
    anchors, per_level = generator.grid_anchors([(8, 8, 8), (4, 4, 4)], dtype=torch.float64)
    return anchors, per_level, generator.num_anchors_per_location


def random_gt(num, generator):
    lo = torch.rand(num, 3, generator=generator, dtype=torch.float64) * 20
    size = torch.rand(num, 3, generator=generator, dtype=torch.float64) * 12 + 4
    hi = lo + size
    return torch.stack([lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1], lo[:, 2], hi[:, 2]], dim=1)


@pytest.mark.parametrize("seed", range(6))
def test_atss_assignment_matches_monai_atss_matcher(seed):
    anchors, per_level, per_location = small_anchor_setup()
    g = torch.Generator().manual_seed(seed)
    gt = random_gt(3, g)
    ours = ATSSMatcher(num_candidates=3, center_in_gt=True, ensure_positive=False)(
        gt, anchors, per_level, per_location)
    # MONAI counts *locations* per level and takes num_candidates * anchors-per-location nearest anchors.
    monai_matcher = MonaiATSSMatcher(num_candidates=3, center_in_gt=True)
    _, monai_matches = monai_matcher.compute_matches(
        convert_boxes(gt, INTERNAL_FORMAT, MONAI_FORMAT), convert_boxes(anchors, INTERNAL_FORMAT, MONAI_FORMAT),
        num_anchors_per_level=[n // per_location for n in per_level], num_anchors_per_loc=per_location)
    assert ours.num_positives > 0
    assert ours.matched_gt.tolist() == monai_matches.tolist()
    assert torch.equal(ours.labels, (monai_matches >= 0).long())


def test_atss_candidates_are_all_anchors_of_the_k_nearest_locations():
    generator = AnchorGenerator3D(sizes=((4, 8),), aspect_ratios=(1.0,), z_ratios=(1.0,), strides=(4,))
    anchors, per_level = generator.grid_anchors([(4, 4, 4)], dtype=torch.float64)
    matcher = ATSSMatcher(num_candidates=1)
    # centre (x, y, z) = (13.2, 9.1, 5.3): nearest location z=1, y=2, x=3 -> location 27 -> anchors 54, 55
    centre = torch.tensor([[13.2, 9.1, 5.3]], dtype=torch.float64)
    candidates = matcher._candidates(centre, anchors, per_level, 2)
    assert candidates.tolist() == [[54, 55]]
    matcher2 = ATSSMatcher(num_candidates=2)
    # second nearest: x=2 (centre 10) at distance 3.2 vs y=1 (centre 6) at 3.1 -> location z=1, y=1, x=3 = 23
    assert sorted(matcher2._candidates(centre, anchors, per_level, 2)[0].tolist()) == [46, 47, 54, 55]


def test_tiny_box_without_anchor_centre_inside_gets_exactly_one_positive_through_the_fallback():
    anchors, per_level, per_location = small_anchor_setup()
    tiny = torch.tensor([[2.5, 2.5, 4.0, 4.0, 2.5, 4.0]], dtype=torch.float64)  # no grid centre (2, 6, …) inside
    strict = ATSSMatcher(num_candidates=3, ensure_positive=False)(tiny, anchors, per_level, per_location)
    assert strict.num_positives == 0
    result = ATSSMatcher(num_candidates=3, ensure_positive=True)(tiny, anchors, per_level, per_location)
    assert result.num_positives == 1
    positive = int(torch.nonzero(result.labels)[0])
    assert result.matched_gt[positive].item() == 0
    ious = monai_box_iou(convert_boxes(tiny, INTERNAL_FORMAT, MONAI_FORMAT),
                         convert_boxes(anchors, INTERNAL_FORMAT, MONAI_FORMAT))[0]
    assert result.matched_iou[positive].item() == pytest.approx(ious.max().item(), rel=1e-5)


def test_atss_with_no_gt_returns_all_background():
    anchors, per_level, per_location = small_anchor_setup()
    result = ATSSMatcher()(torch.zeros(0, 6, dtype=torch.float64), anchors, per_level, per_location)
    assert result.num_positives == 0 and bool((result.matched_gt == -1).all())


def test_sampler_caps_positives_and_fills_the_batch_with_the_hardest_negatives():
    labels = torch.zeros(5000, dtype=torch.long)
    labels[:100] = 1
    scores = torch.linspace(0, 1, 5000)  # later anchors look more like foreground
    g = torch.Generator().manual_seed(0)
    pos, neg = HardNegativeSampler(256, 0.25, pool_size_factor=10)(labels, scores, g)
    assert int(pos.sum()) == 64 and bool(labels[pos].eq(1).all())
    assert int(neg.sum()) == 192 and bool(labels[neg].eq(0).all())
    # negatives come from the 1920 highest-scoring negatives: indices >= 5000 - 1920
    assert int(torch.nonzero(neg).min()) >= 5000 - 1920


def test_sampler_uses_every_negative_when_there_are_fewer_than_needed_and_ignores_label_minus_one():
    labels = torch.tensor([1, 0, 0, -1, 1, 0])
    pos, neg = HardNegativeSampler(256, 0.25)(labels, torch.rand(6))
    assert pos.tolist() == [True, False, False, False, True, False]
    assert neg.tolist() == [False, True, True, False, False, True]


def test_sampler_without_scores_draws_random_negatives_of_the_right_count():
    labels = torch.zeros(1000, dtype=torch.long)
    labels[5] = 1
    pos, neg = HardNegativeSampler(32, 0.5)(labels, None, torch.Generator().manual_seed(1))
    assert int(pos.sum()) == 1 and int(neg.sum()) == 31 and not bool((pos & neg).any())
