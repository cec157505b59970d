"""Metrics: BraTS regions, Dice against MONAI's DiceMetric, HD95 against MONAI's compute_hausdorff_distance,
an independent brute-force float64 surface-distance reference and hand-computed cases, both empty-mask
conventions, and the summary statistics."""
import warnings

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion, generate_binary_structure

from light_training.evaluation import (BRATS_HD95_PENALTY, REFERENCE_HD95_PENALTY, brats_case_metrics,
                                       brats_regions, brats_validation_dice, dice, format_summary, hd95,
                                       region_metrics, summarize)


def _cube(shape, lower, upper):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(lo, hi) for lo, hi in zip(lower, upper))] = True
    return mask


def _brute_force_hd95(pred, gt, spacing):
    """medpy's definition written out: 6-connected surface voxels, all pairwise distances in mm (float64),
    95th percentile over both directed nearest-distance sets together."""
    footprint = generate_binary_structure(3, 1)
    surfaces = [m & ~binary_erosion(m, structure=footprint, border_value=0) for m in (pred, gt)]
    points = [np.argwhere(s) * np.asarray(spacing, np.float64) for s in surfaces]
    distances = np.sqrt(((points[0][:, None, :] - points[1][None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([distances.min(1), distances.min(0)]), 95))


def _monai_hd95(pred, gt, spacing):
    from monai.metrics import compute_hausdorff_distance
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = compute_hausdorff_distance(torch.tensor(pred)[None, None].float(), torch.tensor(gt)[None, None].float(),
                                           include_background=True, percentile=95,
                                           spacing=[float(s) for s in spacing])
    return float(value)


def test_brats_regions_follow_tc_wt_et_definitions():
    label = np.array([0, 1, 2, 3]).reshape(1, 1, 4)
    regions = brats_regions(label)
    assert regions.shape == (3, 1, 1, 4) and regions.dtype == bool
    np.testing.assert_array_equal(regions[0, 0, 0], [False, True, False, True])  # TC = NCR | ET
    np.testing.assert_array_equal(regions[1, 0, 0], [False, True, True, True])   # WT = NCR | ED | ET
    np.testing.assert_array_equal(regions[2, 0, 0], [False, False, False, True])  # ET


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_matches_monai_dice_metric(seed):
    from monai.metrics import DiceMetric
    rng = np.random.default_rng(seed)
    pred = rng.random((12, 13, 14)) > 0.6
    gt = rng.random((12, 13, 14)) > 0.5
    metric = DiceMetric(include_background=True, reduction="none")
    expected = float(metric(torch.tensor(pred)[None, None].float(), torch.tensor(gt)[None, None].float()))
    assert dice(pred, gt) == pytest.approx(expected, abs=1e-6)
    assert dice(pred, gt, empty="brats") == pytest.approx(expected, abs=1e-6)


def test_dice_of_two_shifted_cubes_is_hand_computed():
    a = _cube((20, 20, 20), (5, 5, 5), (10, 10, 10))
    b = _cube((20, 20, 20), (5, 5, 7), (10, 10, 12))
    assert dice(a, b) == pytest.approx(2 * 75 / 250)  # overlap 5 x 5 x 3


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.0, 0.5), (1.5, 0.7, 1.2)])
@pytest.mark.parametrize("shift", [(0, 0, 2), (2, 0, 0), (1, 1, 1)])
def test_hd95_of_translated_cubes_matches_monai_with_spacing(spacing, shift):
    a = _cube((16, 16, 16), (4, 4, 3), (10, 10, 9))
    b = _cube((16, 16, 16), np.add((4, 4, 3), shift), np.add((10, 10, 9), shift))
    assert hd95(a, b, spacing) == pytest.approx(_monai_hd95(a, b, spacing), rel=1e-5)


def test_hd95_of_cubes_shifted_along_one_axis_is_the_shift_in_mm():
    a = _cube((16, 16, 16), (4, 4, 3), (10, 10, 9))
    b = _cube((16, 16, 16), (4, 4, 5), (10, 10, 11))   # 2 voxels along x
    c = _cube((16, 16, 16), (6, 4, 3), (12, 10, 9))    # 2 voxels along z
    assert hd95(a, b, (1.5, 0.7, 1.2)) == pytest.approx(2 * 1.2)
    assert hd95(a, c, (2.0, 1.0, 0.5)) == pytest.approx(2 * 2.0)


def test_hd95_of_two_single_voxels_is_their_distance_in_mm():
    a, b = np.zeros((8, 8, 8), bool), np.zeros((8, 8, 8), bool)
    a[2, 3, 4], b[5, 3, 0] = True, True
    assert hd95(a, b, (2.0, 1.0, 0.5)) == pytest.approx(np.sqrt((3 * 2.0) ** 2 + (4 * 0.5) ** 2))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_hd95_matches_a_brute_force_float64_reference_also_for_masks_touching_the_border(seed):
    from scipy.ndimage import gaussian_filter
    rng = np.random.default_rng(seed)
    pred = gaussian_filter(rng.random((14, 15, 16)), 2) > 0.52
    gt = gaussian_filter(rng.random((14, 15, 16)), 2) > 0.5
    pred[0, :3, :3] = True  # touches the volume border
    spacing = (1.3, 0.8, 1.1)
    assert pred.any() and gt.any()
    assert hd95(pred, gt, spacing) == pytest.approx(_brute_force_hd95(pred, gt, spacing), rel=1e-9)


def test_empty_mask_conventions_reference_and_brats():
    empty = np.zeros((6, 6, 6), bool)
    full = _cube((6, 6, 6), (1, 1, 1), (4, 4, 4))
    # reference: either empty -> (0, 50), including both empty.
    assert dice(empty, empty, "reference") == 0.0 and hd95(empty, empty, empty="reference") == REFERENCE_HD95_PENALTY
    assert dice(full, empty, "reference") == 0.0 and hd95(full, empty, empty="reference") == 50.0
    assert dice(empty, full, "reference") == 0.0 and hd95(empty, full, empty="reference") == 50.0
    # brats: both empty -> (1, 0); one empty -> (0, 373.13).
    assert dice(empty, empty, "brats") == 1.0 and hd95(empty, empty, empty="brats") == 0.0
    assert dice(full, empty, "brats") == 0.0 and hd95(full, empty, empty="brats") == BRATS_HD95_PENALTY
    assert hd95(empty, full, empty="brats", penalty=99.0) == 99.0
    assert BRATS_HD95_PENALTY == pytest.approx(np.sqrt(240 ** 2 + 240 ** 2 + 155 ** 2), abs=0.01)
    with pytest.raises(ValueError, match="convention"):
        dice(full, full, "nnunet")


def test_case_metrics_report_both_conventions_per_region():
    gt = np.zeros((10, 10, 10), np.uint8)
    gt[2:8, 2:8, 2:8] = 2
    gt[4:6, 4:6, 4:6] = 1          # no ET in the ground truth
    pred = gt.copy()
    metrics = brats_case_metrics(pred, gt, (1.0, 1.0, 1.0))
    assert set(metrics) == {"TC", "WT", "ET"}
    assert metrics["WT"]["dice_reference"] == metrics["WT"]["dice_brats"] == 1.0
    assert metrics["WT"]["hd95_reference"] == metrics["WT"]["hd95_brats"] == 0.0
    assert (metrics["ET"]["dice_reference"], metrics["ET"]["hd95_reference"]) == (0.0, 50.0)
    assert (metrics["ET"]["dice_brats"], metrics["ET"]["hd95_brats"]) == (1.0, 0.0)
    assert metrics["TC"]["gt_voxels"] == 8 and metrics["WT"]["pred_voxels"] == 216
    with pytest.raises(ValueError, match="shape"):
        brats_case_metrics(pred[:-1], gt, (1.0, 1.0, 1.0))


def test_region_metrics_with_only_one_convention():
    a = _cube((8, 8, 8), (1, 1, 1), (5, 5, 5))
    assert set(region_metrics(a, a, (1, 1, 1), conventions=("brats",))) == {"gt_voxels", "pred_voxels",
                                                                             "dice_brats", "hd95_brats"}


def test_summary_mean_and_std_over_cases_match_numpy():
    cases = {
        "a": {r: {"dice_reference": d, "hd95_reference": h, "dice_brats": d, "hd95_brats": h}
              for r, d, h in [("TC", 0.5, 4.0), ("WT", 0.9, 2.0), ("ET", 0.0, 50.0)]},
        "b": {r: {"dice_reference": d, "hd95_reference": h, "dice_brats": d, "hd95_brats": h}
              for r, d, h in [("TC", 0.7, 6.0), ("WT", 0.8, 1.0), ("ET", 0.4, 10.0)]},
    }
    summary = summarize(cases)
    assert summary["n_cases"] == 2
    assert summary["reference"]["TC"]["dice"]["mean"] == pytest.approx(0.6)
    assert summary["reference"]["TC"]["dice"]["std"] == pytest.approx(np.std([0.5, 0.7]))
    assert summary["brats"]["ET"]["hd95"]["mean"] == pytest.approx(30.0)
    assert summary["reference"]["mean_dice"] == pytest.approx(np.mean([0.6, 0.85, 0.2]))
    table = format_summary(summary)
    assert "TC" in table and "0.6000 ± 0.1000" in table


def test_validation_dice_ignores_the_outside_marker_and_averages_regions():
    gt = np.full((6, 6, 6), -1, np.int16)
    gt[1:5, 1:5, 1:5] = 2
    gt[2:4, 2:4, 2:4] = 3
    pred = np.maximum(gt, 0)
    scores = brats_validation_dice(pred, gt)
    assert scores == {"tc": 1.0, "wt": 1.0, "et": 1.0, "mean_dice": 1.0}
    pred_no_et = np.where(pred == 3, 2, pred)
    scores = brats_validation_dice(pred_no_et, gt)
    assert scores["et"] == 0.0 and scores["tc"] == 0.0 and scores["wt"] == 1.0
    assert scores["mean_dice"] == pytest.approx(1 / 3)
