"""Training-side pieces of SegMamba-Retina: patch boxes, mirror consistency, the patch stream, loss ramp and
pooled validation metrics."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from detection.boxes import FILE_FORMAT, INTERNAL_FORMAT, convert_boxes, mask_to_boxes
from detection.metrics import CaseDetections
from detection.retina_training import (RetinaPatchStream, RetinaTrainer, boxes_in_patch, flip_boxes,
                                       pooled_validation_metrics)
from light_training.dataloading import CaseDataset
from light_training.io import save_case


def test_boxes_in_patch_shift_clip_and_drop_slivers():
    case_boxes = np.array([[10, 10, 10, 20, 20, 20],    # fully inside the patch at (8, 8, 8)
                           [30, 0, 0, 45, 12, 12],      # partly inside: z 30..40 visible
                           [39, 9, 9, 45, 12, 12]])     # only z 39..40 visible: a 1-voxel sliver
    boxes = boxes_in_patch(case_boxes, (8, 8, 8), (32, 32, 32), min_box_side=2)
    assert boxes.tolist() == [[2, 2, 2, 12, 12, 12], [22, 0, 0, 32, 4, 4]]


def test_flip_boxes_matches_the_boxes_of_the_flipped_mask():
    mask = np.zeros((12, 10, 8), dtype=np.uint8)
    mask[1:4, 2:9, 5:8] = 1
    mask[7:12, 0:3, 0:2] = 1
    boxes = mask_to_boxes(mask)[0].astype(np.float32)
    for axis in range(3):
        flipped = np.flip(mask, axis)
        expected = sorted(mask_to_boxes(flipped)[0].tolist())
        assert sorted(flip_boxes(boxes, axis, mask.shape[axis]).tolist()) == expected


@pytest.fixture()
def tiny_dataset(tmp_path):
    rng = np.random.default_rng(0)
    for index in range(2):
        data = rng.normal(size=(1, 40, 48, 44)).astype(np.float32)
        seg = np.zeros((1, 40, 48, 44), dtype=np.int8)
        seg[0, 5 + index:15, 6:16, 8:20] = 1          # cuboid lesions: their boxes are exact
        seg[0, 25:33, 30:44, 20 + index:30] = 1
        seg[0, :, :, 40:] = -1                        # outside-the-image label is background
        save_case(tmp_path, f"ABUS_{index:03d}", data, seg, {"class_locations": {}})
    return CaseDataset.from_folder(tmp_path, cache_arrays=True)


def test_patch_stream_boxes_equal_the_lesions_visible_in_each_patch_also_after_mirroring(tiny_dataset):
    stream = RetinaPatchStream(tiny_dataset, (32, 32, 32), batch_size=4, fg_ratio=0.5, mirror=True, seed=7)
    for batch_index in range(4):
        batch = stream.make_batch(batch_index)
        assert batch["data"].shape == (4, 1, 32, 32, 32) and batch["seg"].shape == (4, 1, 32, 32, 32)
        assert set(torch.unique(batch["seg"]).tolist()) <= {0, 1}
        for sample in range(4):
            visible = mask_to_boxes(batch["seg"][sample, 0].numpy())[0]
            big_enough = [b for b in visible.tolist() if min(np.subtract(b[3:], b[:3])) >= 2]
            produced = convert_boxes(batch["boxes"][sample], INTERNAL_FORMAT, FILE_FORMAT).numpy()
            assert sorted(produced.astype(int).tolist()) == sorted(big_enough)


def test_patch_stream_is_reproducible_and_fg_ratio_one_always_shows_a_lesion(tiny_dataset):
    stream = RetinaPatchStream(tiny_dataset, (32, 32, 32), batch_size=3, fg_ratio=1.0, mirror=True, seed=1)
    first, again = stream.make_batch(11), stream.make_batch(11)
    assert torch.equal(first["data"], again["data"]) and torch.equal(first["seg"], again["seg"])
    for batch_index in range(5):
        batch = stream.make_batch(batch_index)
        assert all(int(batch["seg"][i].sum()) > 0 and batch["boxes"][i].shape[0] > 0 for i in range(3))


def test_detection_loss_ramp_is_linear_over_the_warmup_epochs():
    ramp = lambda warmup, epoch: RetinaTrainer.detection_scale(SimpleNamespace(det_warmup_epochs=warmup), epoch)  # noqa: E731
    assert ramp(50, 0) == pytest.approx(1 / 50)
    assert ramp(50, 24) == pytest.approx(0.5)
    assert ramp(50, 49) == 1.0 and ramp(50, 300) == 1.0
    assert ramp(0, 0) == 1.0


def test_pooled_validation_metrics_of_perfect_and_of_useless_detections():
    gt = [[0, 0, 0, 10, 10, 10]]
    perfect = [CaseDetections("a", gt, [0.9], gt), CaseDetections("b", [[5, 5, 5, 9, 9, 9]], [0.8], [[5, 5, 5, 9, 9, 9]])]
    metrics = pooled_validation_metrics([0.6, 0.8], perfect)
    assert metrics["froc_iou0.3"] == pytest.approx(1.0) and metrics["ap_iou0.5"] == pytest.approx(1.0)
    assert metrics["dice"] == pytest.approx(0.7) and metrics["combined"] == pytest.approx(0.85)
    useless = [CaseDetections("a", [[50, 50, 50, 60, 60, 60]], [0.9], gt)]
    metrics = pooled_validation_metrics([0.5], useless)
    assert metrics["froc_iou0.3"] == 0.0 and metrics["recall_iou0.25"] == 0.0 and metrics["combined"] == 0.25
