"""Detection metrics on whole volumes: AP, mAP, lesion-level recall / precision, FROC.

All boxes here are in the *file* format ``[z1, y1, x1, z2, y2, x2]`` (half-open voxel coordinates of one volume).

Matching (the same for every metric): within a case, predictions are visited by descending score; each one is
matched to the *still unmatched* ground-truth box with which it has the highest IoU, provided that IoU is
``>= iou_threshold`` (COCO-style). A matched prediction is a true positive, every other prediction a false
positive (a second box on an already found lesion is a false positive). Because matching is greedy in score order,
the matching of the predictions above any score cut-off is a prefix of the full matching, so one matching per case
gives the whole precision-recall and FROC curve.

* **AP** at an IoU threshold: predictions of all cases pooled and sorted by score; precision/recall after each
  prediction; AP = area under the monotone precision envelope (all-point interpolation, VOC 2010+), over
  recall in [0, 1]. ``nan`` when there is no GT box at all.
* **mAP**: mean AP over IoU thresholds 0.10, 0.15, …, 0.50.
* **Lesion-level recall / precision** at an IoU threshold over all submitted predictions: recall = found lesions /
  all lesions; precision = true positives / predictions.
* **FROC** (as in the TDSC-ABUS 2023 challenge: IoU 0.3, FP rates 1/8 … 8 per volume): operating points at
  every distinct score (tied scores enter together); sensitivity at a FP rate ``f`` is the highest sensitivity of
  an operating point with at most ``f`` false positives per volume (volumes = all evaluated cases, including
  those without predictions); the FROC score is the mean over the FP rates.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np

from light_training.utils.files import atomic_path

from .boxes import FILE_FORMAT, box_iou

AP_IOU_THRESHOLDS: Tuple[float, ...] = (0.1, 0.25, 0.5)
MAP_IOU_THRESHOLDS: Tuple[float, ...] = tuple(round(0.1 + 0.05 * i, 2) for i in range(9))  # 0.10 … 0.50
FROC_FP_RATES: Tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
FROC_IOU_THRESHOLDS: Tuple[float, ...] = (0.3, 0.1)


@dataclass
class CaseDetections:
    """Predictions and ground truth of one volume (file box format)."""
    case_id: str
    pred_boxes: np.ndarray
    pred_scores: np.ndarray
    gt_boxes: np.ndarray

    def __post_init__(self) -> None:
        self.pred_boxes = np.asarray(self.pred_boxes, dtype=np.float64).reshape(-1, 6)
        self.pred_scores = np.asarray(self.pred_scores, dtype=np.float64).reshape(-1)
        self.gt_boxes = np.asarray(self.gt_boxes, dtype=np.float64).reshape(-1, 6)
        if self.pred_boxes.shape[0] != self.pred_scores.shape[0]:
            raise ValueError(f"case {self.case_id}: {self.pred_boxes.shape[0]} boxes but "
                             f"{self.pred_scores.shape[0]} scores")


@dataclass
class CaseMatch:
    """Matching of one case at one IoU threshold; arrays follow the input prediction order."""
    is_true_positive: np.ndarray  # (P,) bool
    matched_gt: np.ndarray  # (P,) int, -1 if unmatched
    gt_found: np.ndarray  # (G,) bool


def match_case(case: CaseDetections, iou_threshold: float) -> CaseMatch:
    """Greedy score-ordered matching of one case (see module docstring)."""
    num_pred, num_gt = case.pred_boxes.shape[0], case.gt_boxes.shape[0]
    is_tp = np.zeros(num_pred, dtype=bool)
    matched = np.full(num_pred, -1, dtype=np.int64)
    found = np.zeros(num_gt, dtype=bool)
    if num_pred == 0 or num_gt == 0:
        return CaseMatch(is_tp, matched, found)
    ious = box_iou(case.pred_boxes, case.gt_boxes, fmt=FILE_FORMAT)  # (P, G)
    for p in np.argsort(-case.pred_scores, kind="stable"):
        candidate_ious = np.where(found, -1.0, ious[p])
        g = int(np.argmax(candidate_ious))
        if candidate_ious[g] >= iou_threshold:
            found[g] = True
            is_tp[p] = True
            matched[p] = g
    return CaseMatch(is_tp, matched, found)


def _pooled(cases: Sequence[CaseDetections], iou_threshold: float) -> Tuple[np.ndarray, np.ndarray, int]:
    """All predictions pooled: (scores, true-positive flags) sorted by descending score, and the GT count."""
    scores, flags = [], []
    num_gt = 0
    for case in cases:
        match = match_case(case, iou_threshold)
        scores.append(case.pred_scores)
        flags.append(match.is_true_positive)
        num_gt += case.gt_boxes.shape[0]
    all_scores = np.concatenate(scores) if scores else np.zeros(0)
    all_flags = np.concatenate(flags) if flags else np.zeros(0, dtype=bool)
    order = np.argsort(-all_scores, kind="stable")
    return all_scores[order], all_flags[order], num_gt


def average_precision(cases: Sequence[CaseDetections], iou_threshold: float) -> float:
    """All-point interpolated AP over pooled predictions; ``nan`` when there are no GT boxes."""
    _, flags, num_gt = _pooled(cases, iou_threshold)
    if num_gt == 0:
        return float("nan")
    if flags.size == 0:
        return 0.0
    tp = np.cumsum(flags)
    fp = np.cumsum(~flags)
    recall = tp / num_gt
    precision = tp / (tp + fp)
    # Monotone envelope: precision at recall r = best precision at any recall >= r.
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    recall_steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(recall_steps * envelope))


def mean_average_precision(cases: Sequence[CaseDetections],
                           iou_thresholds: Sequence[float] = MAP_IOU_THRESHOLDS) -> float:
    """Mean of :func:`average_precision` over ``iou_thresholds``."""
    return float(np.mean([average_precision(cases, t) for t in iou_thresholds]))


def lesion_recall_precision(cases: Sequence[CaseDetections], iou_threshold: float) -> Tuple[float, float]:
    """(recall over lesions, precision over predictions); ``nan`` where the denominator is 0."""
    found = total_gt = tp = total_pred = 0
    for case in cases:
        match = match_case(case, iou_threshold)
        found += int(match.gt_found.sum())
        total_gt += case.gt_boxes.shape[0]
        tp += int(match.is_true_positive.sum())
        total_pred += case.pred_boxes.shape[0]
    recall = found / total_gt if total_gt else float("nan")
    precision = tp / total_pred if total_pred else float("nan")
    return recall, precision


@dataclass
class FROCResult:
    """FROC curve and its summary at fixed false-positive rates."""
    iou_threshold: float
    fp_per_volume: np.ndarray  # operating points, starting at 0
    sensitivity: np.ndarray
    fp_rates: Tuple[float, ...]
    sensitivity_at_rates: np.ndarray
    num_volumes: int
    num_lesions: int

    @property
    def score(self) -> float:
        """Mean sensitivity over the FP rates (the challenge's FROC score)."""
        return float(np.mean(self.sensitivity_at_rates))


def froc(cases: Sequence[CaseDetections], iou_threshold: float = 0.3,
         fp_rates: Sequence[float] = FROC_FP_RATES) -> FROCResult:
    """FROC analysis (see module docstring). Sensitivities are ``nan`` when there is no lesion."""
    scores, flags, num_gt = _pooled(cases, iou_threshold)
    num_volumes = len(cases)
    if num_volumes == 0:
        raise ValueError("FROC needs at least one volume")
    tp = np.cumsum(flags)
    fp = np.cumsum(~flags)
    # Operating points only where the score changes: tied predictions cannot be separated by a threshold.
    last_of_group = np.ones(scores.shape[0], dtype=bool)
    if scores.size > 1:
        last_of_group[:-1] = scores[:-1] != scores[1:]
    fp_curve = np.concatenate([[0.0], fp[last_of_group] / num_volumes])
    if num_gt:
        sens_curve = np.concatenate([[0.0], tp[last_of_group] / num_gt])
    else:
        sens_curve = np.full(fp_curve.shape, np.nan)
    at_rates = []
    for rate in fp_rates:
        allowed = fp_curve <= rate + 1e-12
        at_rates.append(float(np.max(sens_curve[allowed])) if num_gt else float("nan"))
    return FROCResult(iou_threshold, fp_curve, sens_curve, tuple(float(r) for r in fp_rates),
                      np.asarray(at_rates), num_volumes, num_gt)


def best_iou_per_case(case: CaseDetections) -> float:
    """Highest IoU between any prediction and any GT box of the case (0 if either is empty)."""
    if case.pred_boxes.shape[0] == 0 or case.gt_boxes.shape[0] == 0:
        return 0.0
    return float(box_iou(case.pred_boxes, case.gt_boxes, fmt=FILE_FORMAT).max())


def _json_float(value: float):
    return None if value is None or not np.isfinite(value) else float(value)


@dataclass
class DetectionReport:
    """Everything :func:`evaluate_detections` computes, as JSON-ready python values."""
    summary: Dict[str, object] = field(default_factory=dict)
    per_case: List[Dict[str, object]] = field(default_factory=list)
    froc_curves: Dict[str, FROCResult] = field(default_factory=dict)

    def to_json(self) -> Dict[str, object]:
        curves = {key: {"fp_per_volume": [float(v) for v in r.fp_per_volume],
                        "sensitivity": [_json_float(v) for v in r.sensitivity]}
                  for key, r in self.froc_curves.items()}
        return {"summary": self.summary, "froc_curves": curves, "per_case": self.per_case}


def evaluate_detections(cases: Sequence[CaseDetections],
                        ap_thresholds: Sequence[float] = AP_IOU_THRESHOLDS,
                        map_thresholds: Sequence[float] = MAP_IOU_THRESHOLDS,
                        froc_iou_thresholds: Sequence[float] = FROC_IOU_THRESHOLDS,
                        fp_rates: Sequence[float] = FROC_FP_RATES) -> DetectionReport:
    """All detection metrics of the project for a set of volumes (NaN is reported as ``null``)."""
    report = DetectionReport()
    summary: Dict[str, object] = {"num_cases": len(cases),
                                  "num_lesions": int(sum(c.gt_boxes.shape[0] for c in cases)),
                                  "num_predictions": int(sum(c.pred_boxes.shape[0] for c in cases))}
    summary["AP"] = {f"{t:g}": _json_float(average_precision(cases, t)) for t in ap_thresholds}
    summary["mAP"] = _json_float(mean_average_precision(cases, map_thresholds))
    summary["mAP_iou_thresholds"] = [float(t) for t in map_thresholds]
    recall, precision = {}, {}
    for t in ap_thresholds:
        r, p = lesion_recall_precision(cases, t)
        recall[f"{t:g}"], precision[f"{t:g}"] = _json_float(r), _json_float(p)
    summary["lesion_recall"] = recall
    summary["lesion_precision"] = precision
    froc_summary = {}
    for t in froc_iou_thresholds:
        result = froc(cases, t, fp_rates)
        key = f"{t:g}"
        report.froc_curves[key] = result
        froc_summary[key] = {"score": _json_float(result.score),
                             "fp_rates": list(result.fp_rates),
                             "sensitivity": [_json_float(v) for v in result.sensitivity_at_rates]}
    summary["FROC"] = froc_summary
    summary["mean_best_iou"] = _json_float(float(np.mean([best_iou_per_case(c) for c in cases]))) if cases else None
    report.summary = summary
    for case in cases:
        entry: Dict[str, object] = {"case": case.case_id, "num_pred": int(case.pred_boxes.shape[0]),
                                    "num_gt": int(case.gt_boxes.shape[0]),
                                    "best_iou": best_iou_per_case(case),
                                    "max_score": float(case.pred_scores.max()) if case.pred_scores.size else None}
        for t in ap_thresholds:
            entry[f"lesions_found@{t:g}"] = int(match_case(case, t).gt_found.sum())
        report.per_case.append(entry)
    return report


def plot_froc(results: Sequence[FROCResult], path: str, title: str = "FROC") -> None:
    """Write a PNG of the FROC curves (log-scaled FP axis, the challenge's FP rates marked)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    largest_fp = max([float(r.fp_per_volume.max()) for r in results if r.fp_per_volume.size] + [10.0])
    for result in results:
        fp = np.maximum(result.fp_per_volume, 1e-3)
        ax.step(fp, result.sensitivity, where="post", label=f"IoU ≥ {result.iou_threshold:g} "
                f"(score {result.score:.3f})")
        ax.plot(result.fp_rates, result.sensitivity_at_rates, "o", ms=4, color=ax.lines[-1].get_color())
    ax.set_xscale("log")
    ax.set_xlim(0.1, largest_fp * 1.2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("average false positives per volume")
    ax.set_ylabel("lesion sensitivity")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    try:  # written under a temporary name in the same folder, then renamed: never a half-written PNG
        with atomic_path(path) as tmp_path:
            fig.savefig(tmp_path, dpi=120, format="png")
    finally:
        plt.close(fig)
