"""Box geometry of detection.boxes against MONAI's independent implementations and hand-computed cases."""
import numpy as np
import pytest
import torch
from monai.data.box_utils import box_iou as monai_box_iou
from monai.data.box_utils import box_pair_giou as monai_box_pair_giou
from monai.data.box_utils import non_max_suppression as monai_nms

from detection.boxes import (FILE_FORMAT, INTERNAL_FORMAT, MONAI_FORMAT, box_iou, box_volume, clip_boxes_to_shape,
                             convert_boxes, generalized_box_iou_pairwise, mask_to_boxes, nms_3d, shift_boxes)


def clustered_internal_boxes(n_clusters, copies, generator):
    """Clusters of jittered copies of random boxes, so that every NMS threshold suppresses something."""
    base = random_internal_boxes(n_clusters, generator, extent=60.0, max_size=15.0, min_size=4.0).repeat_interleave(copies, 0)
    jitter = (torch.rand(base.shape, generator=generator, dtype=torch.float64) - 0.5) * 3.0
    return base + jitter


def random_internal_boxes(n, generator, extent=40.0, max_size=20.0, min_size=0.5):
    """(n, 6) float64 boxes [x1, y1, x2, y2, z1, z2] with sizes in [min_size, min_size + max_size)."""
    lo = torch.rand(n, 3, generator=generator, dtype=torch.float64) * extent
    size = torch.rand(n, 3, generator=generator, dtype=torch.float64) * max_size + min_size
    hi = lo + size
    return torch.stack([lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1], lo[:, 2], hi[:, 2]], dim=1)


def test_convert_boxes_maps_coordinates_by_hand_example_and_round_trips():
    internal = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])  # x1 y1 x2 y2 z1 z2
    file_fmt = convert_boxes(internal, INTERNAL_FORMAT, FILE_FORMAT)
    monai_fmt = convert_boxes(internal, INTERNAL_FORMAT, MONAI_FORMAT)
    assert file_fmt.tolist() == [[5.0, 2.0, 1.0, 6.0, 4.0, 3.0]]  # z1 y1 x1 z2 y2 x2
    assert monai_fmt.tolist() == [[1.0, 2.0, 5.0, 3.0, 4.0, 6.0]]  # x1 y1 z1 x2 y2 z2
    assert torch.equal(convert_boxes(file_fmt, FILE_FORMAT, INTERNAL_FORMAT), internal)
    assert torch.equal(convert_boxes(monai_fmt, MONAI_FORMAT, INTERNAL_FORMAT), internal)
    as_numpy = convert_boxes(internal.numpy(), INTERNAL_FORMAT, FILE_FORMAT)
    assert isinstance(as_numpy, np.ndarray) and as_numpy.tolist() == file_fmt.tolist()


def test_convert_boxes_rejects_unknown_format_and_bad_shape():
    with pytest.raises(ValueError, match="unknown box format"):
        convert_boxes(torch.zeros(1, 6), "xyz", FILE_FORMAT)
    with pytest.raises(ValueError, match=r"\(\.\.\., 6\)"):
        convert_boxes(torch.zeros(1, 4), INTERNAL_FORMAT, FILE_FORMAT)


def test_box_iou_of_two_offset_cubes_is_one_fifteenth():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0, 0.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0, 1.0, 3.0]])
    # intersection 1, union 8 + 8 - 1 = 15
    assert box_iou(a, b).item() == pytest.approx(1 / 15)
    assert box_volume(a).item() == 8.0


def test_box_iou_matches_monai_box_iou_on_random_boxes():
    g = torch.Generator().manual_seed(1)
    boxes1, boxes2 = random_internal_boxes(50, g), random_internal_boxes(40, g)
    ours = box_iou(boxes1, boxes2)
    theirs = monai_box_iou(convert_boxes(boxes1, INTERNAL_FORMAT, MONAI_FORMAT),
                           convert_boxes(boxes2, INTERNAL_FORMAT, MONAI_FORMAT))
    assert ours.shape == (50, 40)
    assert (ours > 0).sum() > 20  # the random sets overlap often enough to make the comparison meaningful
    # MONAI computes in float32; ours in float64 here.
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-4, atol=1e-6)


def test_box_iou_is_the_same_in_file_format_and_accepts_numpy():
    g = torch.Generator().manual_seed(2)
    boxes1, boxes2 = random_internal_boxes(10, g), random_internal_boxes(12, g)
    internal = box_iou(boxes1, boxes2)
    in_file = box_iou(convert_boxes(boxes1, INTERNAL_FORMAT, FILE_FORMAT).numpy(),
                      convert_boxes(boxes2, INTERNAL_FORMAT, FILE_FORMAT).numpy(), fmt=FILE_FORMAT)
    assert isinstance(in_file, np.ndarray)
    np.testing.assert_allclose(in_file, internal.numpy(), rtol=1e-12)


def test_inverted_box_has_zero_volume_and_zero_iou():
    inverted = torch.tensor([[5.0, 0.0, 1.0, 4.0, 0.0, 4.0]])  # x2 < x1
    normal = torch.tensor([[0.0, 0.0, 6.0, 4.0, 0.0, 4.0]])
    assert box_volume(inverted).item() == 0.0
    assert box_iou(inverted, normal).item() == 0.0


def test_generalized_iou_matches_monai_and_hand_value_for_disjoint_cubes():
    g = torch.Generator().manual_seed(3)
    boxes1, boxes2 = random_internal_boxes(30, g), random_internal_boxes(30, g)
    ours = generalized_box_iou_pairwise(boxes1, boxes2)
    theirs = monai_box_pair_giou(convert_boxes(boxes1, INTERNAL_FORMAT, MONAI_FORMAT),
                                 convert_boxes(boxes2, INTERNAL_FORMAT, MONAI_FORMAT))
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-4, atol=1e-6)
    a = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    b = torch.tensor([2.0, 2.0, 3.0, 3.0, 2.0, 3.0])
    # IoU 0, enclosing 3^3 = 27, union 2: GIoU = -(27 - 2) / 27
    assert generalized_box_iou_pairwise(a, b).item() == pytest.approx(-25 / 27)


@pytest.mark.parametrize("threshold", [0.1, 0.3, 0.5, 0.7])
def test_nms_keeps_the_same_boxes_as_monai_non_max_suppression(threshold):
    g = torch.Generator().manual_seed(4)
    boxes = clustered_internal_boxes(60, 5, g)
    scores = torch.rand(300, generator=g, dtype=torch.float64)
    ours = nms_3d(boxes, scores, threshold)
    theirs = monai_nms(convert_boxes(boxes, INTERNAL_FORMAT, MONAI_FORMAT), scores, threshold)
    assert 1 < ours.numel() < 300
    assert ours.tolist() == theirs.tolist()
    assert torch.all(scores[ours][:-1] >= scores[ours][1:])


def test_nms_max_detections_and_pre_nms_top_k_truncate_like_monai_on_the_top_k_subset():
    g = torch.Generator().manual_seed(5)
    boxes = clustered_internal_boxes(80, 5, g)
    scores = torch.rand(400, generator=g, dtype=torch.float64)
    full = monai_nms(convert_boxes(boxes, INTERNAL_FORMAT, MONAI_FORMAT), scores, 0.4)
    capped = nms_3d(boxes, scores, 0.4, max_detections=5)
    assert capped.tolist() == full[:5].tolist()
    top = torch.argsort(scores, descending=True)[:100]
    expected = top[monai_nms(convert_boxes(boxes[top], INTERNAL_FORMAT, MONAI_FORMAT), scores[top], 0.4)]
    assert nms_3d(boxes, scores, 0.4, pre_nms_top_k=100).tolist() == expected.tolist()


def test_nms_of_many_disjoint_boxes_with_cap_returns_best_scores_first():
    # 20,000 non-overlapping unit cubes: nothing is suppressed, the cap keeps the 100 best.
    idx = torch.arange(20000, dtype=torch.float64)
    boxes = torch.stack([idx * 2, idx * 0, idx * 2 + 1, idx * 0 + 1, idx * 0, idx * 0 + 1], dim=1)
    scores = torch.rand(20000, dtype=torch.float64)
    kept = nms_3d(boxes, scores, 0.5, max_detections=100)
    assert kept.tolist() == torch.argsort(scores, descending=True)[:100].tolist()


def test_nms_of_empty_input_returns_empty_index_tensor():
    kept = nms_3d(torch.zeros(0, 6), torch.zeros(0), 0.5)
    assert kept.shape == (0,) and kept.dtype == torch.long


def test_clip_and_shift_boxes_use_zyx_shapes_and_offsets():
    box = torch.tensor([[-2.0, 3.0, 50.0, 8.0, 1.0, 70.0]])  # x1 y1 x2 y2 z1 z2
    clipped = clip_boxes_to_shape(box, (60, 40, 30))  # Z=60, Y=40, X=30
    assert clipped.tolist() == [[0.0, 3.0, 30.0, 8.0, 1.0, 60.0]]
    shifted = shift_boxes(box, (100, 10, 1))  # dz, dy, dx
    assert shifted.tolist() == [[-1.0, 13.0, 51.0, 18.0, 101.0, 170.0]]


def test_mask_to_boxes_gives_half_open_file_format_boxes_and_respects_connectivity():
    mask = np.zeros((6, 7, 8), dtype=np.int8)
    mask[1:3, 2:5, 3:4] = 1  # component A: z 1..2, y 2..4, x 3
    mask[3, 5, 4] = 1  # touches A only diagonally (corner)
    mask[5, 0, 7] = 1
    mask[0, 6, 0] = -1  # outside-image label counts as background
    boxes6, volumes6 = mask_to_boxes(mask, connectivity=6)
    assert boxes6.tolist() == [[1, 2, 3, 3, 5, 4], [3, 5, 4, 4, 6, 5], [5, 0, 7, 6, 1, 8]]
    assert volumes6.tolist() == [6, 1, 1]
    boxes26, volumes26 = mask_to_boxes(mask, connectivity=26)
    assert boxes26.tolist() == [[1, 2, 3, 4, 6, 5], [5, 0, 7, 6, 1, 8]]
    assert volumes26.tolist() == [7, 1]
    boxes_big, _ = mask_to_boxes(mask, connectivity=6, min_voxels=2)
    assert boxes_big.tolist() == [[1, 2, 3, 3, 5, 4]]
    empty, _ = mask_to_boxes(np.zeros((3, 3, 3)), connectivity=6)
    assert empty.shape == (0, 6)
