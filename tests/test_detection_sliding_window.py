"""Sliding-window placement, box mapping to the raw volume, and whole-volume inference with a stub model."""
import numpy as np
import pytest
import torch

from detection.anchors import AnchorGenerator3D
from detection.box_coder import BoxCoder3D
from detection.boxes import boxes_to_original_volume
from detection.sliding_window import (RetinaInferenceConfig, gaussian_importance, predict_volume, window_grid,
                                      window_starts)


@pytest.mark.parametrize("size,patch,overlap", [(200, 128, 0.5), (300, 128, 0.5), (129, 128, 0.5), (128, 128, 0.5),
                                                (500, 128, 0.25), (47, 32, 0.5), (1000, 96, 0.0)])
def test_window_starts_cover_every_voxel_and_end_at_the_edge(size, patch, overlap):
    starts = window_starts(size, patch, overlap)
    assert starts[0] == 0 and starts[-1] == size - patch
    covered = np.zeros(size, dtype=bool)
    for start in starts:
        covered[start:start + patch] = True
    assert covered.all()
    assert all(b - a <= int(patch * (1 - overlap)) for a, b in zip(starts, starts[1:]))


def test_window_grid_covers_the_reference_coverage_hole_example():
    # reference bug: z extent 200 with y extent 300 left z in [192, 200), y in [128, 172) without a window
    shape, patch = (200, 300, 128), (128, 128, 128)
    covered = np.zeros(shape, dtype=bool)
    for z, y, x in window_grid(shape, patch, 0.5):
        covered[z:z + 128, y:y + 128, x:x + 128] = True
    assert covered.all()
    assert covered[192:200, 128:172].all()


def test_short_axis_gets_a_single_window_and_gaussian_weights_peak_in_the_centre():
    assert window_starts(20, 32, 0.5) == [0]
    weights = gaussian_importance((8, 8, 8))
    assert weights.shape == (8, 8, 8) and weights.max().item() == pytest.approx(1.0, abs=1e-6)
    assert weights[3, 3, 3] > weights[0, 3, 3] > 0


def test_boxes_map_back_through_resampling_and_crop_to_raw_voxels():
    # preprocessed grid (10, 20, 40) is the crop [[5, 25], [0, 20], [10, 30]] resampled by (0.5, 1, 2) per axis
    box_internal = torch.tensor([[4.0, 2.0, 8.0, 6.0, 1.0, 3.0]])  # x 4..8, y 2..6, z 1..3
    raw = boxes_to_original_volume(box_internal, shape_preprocessed_zyx=(10, 20, 40), shape_cropped_zyx=(20, 20, 20),
                                   crop_bbox_zyx=[[5, 25], [0, 20], [10, 30]], shape_original_zyx=(30, 20, 40))
    # z: 1..3 * 2 + 5 = 7..11; y: 2..6 * 1 + 0; x: 4..8 * 0.5 + 10 = 12..14
    assert raw.tolist() == [[7.0, 2.0, 12.0, 11.0, 6.0, 14.0]]
    clipped = boxes_to_original_volume(torch.tensor([[-5.0, 0.0, 50.0, 30.0, 0.0, 1.0]]), (10, 20, 40),
                                       (10, 20, 40), [[0, 10], [0, 20], [0, 40]], (10, 20, 40))
    assert clipped.tolist() == [[0.0, 0.0, 0.0, 1.0, 20.0, 40.0]]


class StubRetina(torch.nn.Module):
    """Retina-like stub: seg logits (-x, x); class logit per location = 20 * max of the input in the location's
    cell minus 10 (11 on the coarse level), so only cells holding the bright cube score high; zero box deltas
    (boxes = anchors)."""

    num_classes = 1

    def __init__(self):
        super().__init__()
        self.anchor_generator = AnchorGenerator3D(sizes=((8,), (16,)), aspect_ratios=(1.0,), z_ratios=(1.0,),
                                                  strides=(4, 8))
        self.box_coder = BoxCoder3D()
        self.num_anchors = 1

    def forward(self, x, return_seg=True, return_det=True):
        out = {}
        if return_seg:
            out["seg_logits"] = torch.cat([-x, x], dim=1)
        # the coarse level scores a little lower, so the best box is the stride-4 cell of the cube
        levels = [torch.nn.functional.max_pool3d(x, s) * 20 - offset for s, offset in ((4, 10), (8, 11))]
        anchors, per_level = self.anchor_generator(levels)
        out.update(cls_logits=levels, box_deltas=[torch.zeros(x.shape[0], 6, *l.shape[2:]) for l in levels],
                   centerness=[torch.zeros_like(l) for l in levels], anchors=anchors, num_anchors_per_level=per_level)
        return out


def test_predict_volume_blends_segmentation_exactly_and_reports_the_cube_in_volume_coordinates():
    volume = torch.zeros(1, 40, 44, 52)
    volume[0, 28:32, 20:24, 40:44] = 1.0  # bright 4^3 cube: one stride-4 cell, z 28..32, y 20..24, x 40..44
    config = RetinaInferenceConfig(patch_size=(32, 32, 32), overlap=0.5, batch_size=3, score_threshold=0.5,
                                   nms_threshold=0.1, max_detections=10)
    result = predict_volume(StubRetina(), volume, config)
    expected = torch.softmax(torch.cat([-volume, volume], dim=0), dim=0)
    torch.testing.assert_close(result.probabilities, expected)  # identical windows blend to the same value
    assert result.scores.numel() >= 1 and result.scores[0] > 0.99
    # the best box is an 8-voxel anchor of a window cell holding the cube: it contains the cube's centre
    x1, y1, x2, y2, z1, z2 = result.boxes[0].tolist()
    assert x2 - x1 == pytest.approx(8) and z2 - z1 == pytest.approx(8)
    assert x1 <= 42 <= x2 and y1 <= 22 <= y2 and z1 <= 30 <= z2
    assert torch.all(result.scores[:-1] >= result.scores[1:])
