"""Segmentation metrics: Dice and HD95 (medpy, real voxel spacing) with explicit empty-mask conventions.

Two conventions for empty masks are supported and reported side by side:

* ``"reference"`` — what the reference SegMamba ``5_compute_metrics.py`` does: if the prediction OR the
  ground truth is empty, Dice = 0 and HD95 = 50 (also when both are empty).
* ``"brats"`` — the BraTS challenge convention: both empty → Dice 1, HD95 0 (a correct "nothing there");
  exactly one empty → Dice 0, HD95 = 373.13 mm (the diagonal of the 240 x 240 x 155 mm BraTS volume, the
  penalty used by the BraTS evaluation).

When both masks are non-empty the two conventions agree: Dice = 2|P∩G| / (|P| + |G|) and HD95 = the 95th
percentile of the symmetric surface distances (medpy's definition: surface voxels by 6-connected erosion,
distances in mm using the voxel spacing, percentile over the union of both directed distance sets).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["REGION_NAMES", "CONVENTIONS", "REFERENCE_HD95_PENALTY", "BRATS_HD95_PENALTY", "brats_regions",
           "dice", "hd95", "region_metrics", "brats_case_metrics", "binary_case_metrics", "summarize",
           "format_summary", "brats_validation_dice"]

REGION_NAMES = ("TC", "WT", "ET")
CONVENTIONS = ("reference", "brats")
REFERENCE_HD95_PENALTY = 50.0
BRATS_HD95_PENALTY = 373.13  # sqrt(240² + 240² + 155²) mm


def brats_regions(label: np.ndarray) -> np.ndarray:
    """BraTS evaluation regions of a label map (0 bg, 1 NCR, 2 ED, 3 ET).

    Returns bool ``(3, *label.shape)``: [TC = 1|3, WT = 1|2|3, ET = 3].
    """
    label = np.asarray(label)
    return np.stack([(label == 1) | (label == 3), (label == 1) | (label == 2) | (label == 3), label == 3])


def _check_convention(empty: str) -> None:
    if empty not in CONVENTIONS:
        raise ValueError(f"empty-mask convention must be one of {CONVENTIONS}, got {empty!r}")


def _as_bool_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    return pred, gt


def dice(pred: np.ndarray, gt: np.ndarray, empty: str = "reference") -> float:
    """Dice of two binary masks with the ``empty`` convention (see module docstring)."""
    _check_convention(empty)
    pred, gt = _as_bool_pair(pred, gt)
    n_pred, n_gt = int(pred.sum()), int(gt.sum())
    if n_pred == 0 or n_gt == 0:
        return 1.0 if (empty == "brats" and n_pred == 0 and n_gt == 0) else 0.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / (n_pred + n_gt)


def _crop_to_union(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus one voxel.

    Surface voxels and surface-to-surface distances do not change (all surfaces lie inside the box, and the
    one-voxel margin keeps the erosion at the box edge identical), but medpy's distance transform then runs
    on a small array instead of the whole volume.
    """
    union = pred | gt
    index = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        present = np.flatnonzero(union.any(axis=other))
        index.append(slice(max(0, present[0] - 1), min(union.shape[axis], present[-1] + 2)))
    return pred[tuple(index)], gt[tuple(index)]


def hd95(pred: np.ndarray, gt: np.ndarray, spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0),
         empty: str = "reference", penalty: float | None = None) -> float:
    """95th-percentile Hausdorff distance in mm (medpy) with the ``empty`` convention.

    Args:
        spacing_zyx: voxel size per array axis (Z, Y, X) in mm.
        penalty: HD95 when exactly one mask is empty (and, for "reference", both); default 50 for
            "reference", 373.13 for "brats".
    """
    from medpy.metric.binary import hd95 as medpy_hd95
    _check_convention(empty)
    pred, gt = _as_bool_pair(pred, gt)
    if penalty is None:
        penalty = REFERENCE_HD95_PENALTY if empty == "reference" else BRATS_HD95_PENALTY
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred or not has_gt:
        if empty == "brats" and not has_pred and not has_gt:
            return 0.0
        return float(penalty)
    if len(spacing_zyx) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing_zyx)} does not match a {pred.ndim}D mask")
    pred, gt = _crop_to_union(pred, gt)
    return float(medpy_hd95(pred, gt, voxelspacing=[float(s) for s in spacing_zyx], connectivity=1))


def region_metrics(pred: np.ndarray, gt: np.ndarray, spacing_zyx: Sequence[float],
                   conventions: Iterable[str] = CONVENTIONS) -> dict[str, float]:
    """Dice and HD95 of one binary region under each convention, plus voxel counts.

    Keys: ``dice_<convention>``, ``hd95_<convention>``, ``gt_voxels``, ``pred_voxels``. HD95 is computed
    once (the conventions only differ for empty masks).
    """
    pred, gt = _as_bool_pair(pred, gt)
    result: dict[str, float] = {"gt_voxels": int(gt.sum()), "pred_voxels": int(pred.sum())}
    both_present = result["gt_voxels"] > 0 and result["pred_voxels"] > 0
    distance = hd95(pred, gt, spacing_zyx) if both_present else None
    for convention in conventions:
        result[f"dice_{convention}"] = dice(pred, gt, convention)
        result[f"hd95_{convention}"] = distance if both_present else hd95(pred, gt, spacing_zyx, convention)
    return result


def brats_case_metrics(pred_label: np.ndarray, gt_label: np.ndarray, spacing_zyx: Sequence[float],
                       conventions: Iterable[str] = CONVENTIONS) -> dict[str, dict[str, float]]:
    """``{"TC": region_metrics, "WT": ..., "ET": ...}`` for two BraTS label maps (Z, Y, X)."""
    conventions = tuple(conventions)
    pred_regions, gt_regions = brats_regions(pred_label), brats_regions(gt_label)
    if pred_regions.shape != gt_regions.shape:
        raise ValueError(f"prediction shape {np.shape(pred_label)} differs from ground truth {np.shape(gt_label)}")
    return {name: region_metrics(pred_regions[i], gt_regions[i], spacing_zyx, conventions)
            for i, name in enumerate(REGION_NAMES)}


def binary_case_metrics(pred: np.ndarray, gt: np.ndarray, spacing_zyx: Sequence[float],
                        conventions: Iterable[str] = CONVENTIONS) -> dict[str, float]:
    """Metrics of a binary task (e.g. ABUS lesion vs background): label > 0 is foreground."""
    return region_metrics(np.asarray(pred) > 0, np.asarray(gt) > 0, spacing_zyx, tuple(conventions))


def brats_validation_dice(pred_label: np.ndarray, gt_label: np.ndarray, empty: str = "brats") -> dict[str, float]:
    """Dice of TC, WT, ET and their mean (``mean_dice``) for validation/model selection (no HD95)."""
    pred_regions, gt_regions = brats_regions(pred_label), brats_regions(np.maximum(gt_label, 0))
    scores = {name.lower(): dice(pred_regions[i], gt_regions[i], empty) for i, name in enumerate(REGION_NAMES)}
    scores["mean_dice"] = float(np.mean(list(scores.values())))
    return scores


def summarize(case_metrics: Mapping[str, Mapping[str, Mapping[str, float]]], regions: Sequence[str] = REGION_NAMES,
              conventions: Sequence[str] = CONVENTIONS) -> dict[str, Any]:
    """Mean and (population) std over cases: ``{convention: {region: {"dice": {mean, std}, "hd95": {...}}}}``.

    Args:
        case_metrics: ``{case: {region: region_metrics}}``.
    """
    summary: dict[str, Any] = {}
    for convention in conventions:
        per_region = {}
        for region in regions:
            entry = {}
            for metric in ("dice", "hd95"):
                values = np.array([m[region][f"{metric}_{convention}"] for m in case_metrics.values()], np.float64)
                entry[metric] = {"mean": float(values.mean()) if values.size else math.nan,
                                 "std": float(values.std()) if values.size else math.nan}
            per_region[region] = entry
        per_region["mean_dice"] = float(np.mean([per_region[r]["dice"]["mean"] for r in regions])) if regions else math.nan
        summary[convention] = per_region
    summary["n_cases"] = len(case_metrics)
    return summary


def format_summary(summary: Mapping[str, Any], regions: Sequence[str] = REGION_NAMES,
                   conventions: Sequence[str] = CONVENTIONS) -> str:
    """Text table: one row per region, mean ± std of Dice and HD95 (mm) for each convention."""
    header = f"{'region':<8}" + "".join(f"{'Dice (' + c + ')':>22}{'HD95 mm (' + c + ')':>24}" for c in conventions)
    lines = [header]
    for region in regions:
        row = f"{region:<8}"
        for convention in conventions:
            d, h = summary[convention][region]["dice"], summary[convention][region]["hd95"]
            row += f"{d['mean']:>14.4f} ± {d['std']:<6.4f}{h['mean']:>15.2f} ± {h['std']:<7.2f}"
        lines.append(row)
    lines.append(f"{'mean':<8}" + "".join(f"{summary[c]['mean_dice']:>14.4f}{'':<8}{'':>24}" for c in conventions))
    return "\n".join(lines)
