#!/usr/bin/env python
"""ABUS step 5b: detection metrics of a ``detections.json`` against boxes of the raw ground-truth masks.

Reads the project's detection schema (written by ``abus_retina_predict.py`` and ``abus_seg_box_eval.py``;
boxes ``[z1, y1, x1, z2, y2, x2]`` in raw-volume voxels). Ground-truth boxes are the connected components
(``--connectivity``, 6 by default) of each case's raw mask, located through ``split_info.json`` whatever original
folder the case came from. The cases evaluated are those of ``--split`` that have an entry in the file; split
cases without an entry are listed (exit code 3).

Metrics (``detection/metrics.py``; a prediction matches the best still-unmatched lesion with IoU >= t):

* AP at IoU 0.1, 0.25, 0.5 (all-point interpolated, predictions pooled over cases) and mAP over IoU
  0.10, 0.15, …, 0.50;
* lesion-level recall and precision at the same IoUs over all submitted boxes;
* FROC: mean lesion sensitivity at 1/8, 1/4, 1/2, 1, 2, 4, 8 false positives per volume, at IoU 0.3 (the
  TDSC-ABUS 2023 challenge criterion) and at IoU 0.1;
* per case: number of boxes and lesions, best IoU, lesions found.

Writes to ``--output_dir`` (default ``<folder of pred_file>/metrics``): ``detection_metrics.json``,
``detection_per_case.csv`` and ``froc.png``. A detections file that breaks the schema (invalid JSON, a case
listed twice, inverted or non-finite boxes, scores outside [0, 1]) is refused as a whole, naming the file and
the case. Exit codes: 0 every split case evaluated; 3 some missing or failed (listed at the end, the rest is
scored); 1 stopped: nothing could be evaluated, an unusable detections file, or --strict and a case was
missing or failed (nothing written).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import io
import multiprocessing
import os
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from abus_common import load_split_info, raw_paths_for_case  # noqa: E402

PRED_FILE = "./prediction_results/segmamba_abus_retina/detections.json"
SPLIT_INFO = "./data/abus/split_info.json"
DEFAULT_ABUS_ROOT = "./data/raw_data/ABUS"
EXIT_OK, EXIT_NOTHING, EXIT_INCOMPLETE = 0, 1, 3


def ground_truth_boxes(mask_path: str, connectivity: int = 6) -> Tuple[np.ndarray, Tuple[int, ...]]:
    """File-format lesion boxes of a raw mask and the mask's shape (Z, Y, X)."""
    from detection.boxes import mask_to_boxes
    from light_training.io import read_label_image

    mask, _ = read_label_image(mask_path, what="ground-truth mask")
    return mask_to_boxes(mask > 0, connectivity=connectivity)[0], tuple(int(s) for s in mask.shape)


def _gt_worker(job):
    name, mask_path, connectivity = job
    try:
        boxes, shape = ground_truth_boxes(mask_path, connectivity)
        return name, boxes, shape, None
    except Exception as error:
        return name, None, None, f"{type(error).__name__}: {error}"


def resolve_abus_root(flag: Optional[str], info: dict) -> str:
    """Explicit flag, else the root recorded in split_info (if it exists), else ./data/raw_data/ABUS."""
    if flag:
        return flag
    recorded = info.get("abus_root")
    return recorded if recorded and os.path.isdir(recorded) else DEFAULT_ABUS_ROOT


def evaluate_detection_file(pred_file: str, split_info_path: str, split: str = "test",
                            abus_root: Optional[str] = None, output_dir: Optional[str] = None,
                            connectivity: int = 6, num_processes: int = 2, progress: bool = True,
                            title: str = "FROC", strict: bool = False) -> Tuple[dict, List[str], Dict[str, str]]:
    """Score a detections.json; writes the JSON report, the per-case CSV and the FROC plot.

    Returns ``(report dict, missing case names, failed cases)``. Raises on a missing/invalid file, and with
    ``strict`` (``ValueError``, nothing written) on the first split case that is missing or fails.
    """
    from tqdm.auto import tqdm

    from detection.detections_file import read_detections_json
    from detection.metrics import CaseDetections, evaluate_detections, plot_froc
    from light_training.utils.files import atomic_path, save_json_atomic

    info = load_split_info(split_info_path)
    predictions = read_detections_json(pred_file)
    root = resolve_abus_root(abus_root, info)
    names = list(info.get(split, []))
    if not names:
        raise ValueError(f"{split_info_path}: the {split} split is empty")
    missing = [n for n in names if n not in predictions]
    if strict and missing:
        raise ValueError(f"{pred_file}: no entry for the {split} case {missing[0]} (--strict)")
    extra = sorted(set(predictions) - set(names))
    if extra:
        print(f"note: {len(extra)} case(s) of {pred_file} are not in the {split} split and are ignored: {extra[:5]}",
              file=sys.stderr)
    failed: Dict[str, str] = {}
    jobs = []
    for name in names:
        if name in predictions:
            try:
                jobs.append((name, raw_paths_for_case(info, name, root, split_info_path)[1], connectivity))
            except KeyError as error:
                failed[name] = str(error.args[0])
    cases: List[CaseDetections] = []
    bar = tqdm(total=len(jobs), desc="ground truth", unit="case", disable=not progress)
    if num_processes <= 1 or len(jobs) <= 1 or strict:
        results = []
        for job in jobs:
            results.append(_gt_worker(job))
            bar.update()
    else:
        with concurrent.futures.ProcessPoolExecutor(num_processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = []
            for result in pool.map(_gt_worker, jobs):
                results.append(result)
                bar.update()
    bar.close()
    for name, gt_boxes, shape, error in results:
        if error is not None:
            failed[name] = error
        else:
            prediction = predictions[name]
            if prediction.image_shape_zyx is not None and tuple(prediction.image_shape_zyx) != shape:
                failed[name] = (f"{pred_file}: case {name}: image_shape_zyx {list(prediction.image_shape_zyx)} "
                                f"differs from the raw mask's shape {list(shape)}")
            else:
                cases.append(CaseDetections(name, prediction.boxes, prediction.scores, gt_boxes))
        if strict and failed:
            name, reason = next(iter(failed.items()))
            raise ValueError(f"case {name}: {reason} (--strict)")
    if not cases:
        raise ValueError(f"no case of the {split} split could be evaluated ({len(missing)} without predictions, "
                         f"{len(failed)} failed: {dict(list(failed.items())[:3])})")
    report = evaluate_detections(cases)
    output_dir = output_dir or os.path.join(os.path.dirname(os.path.abspath(pred_file)), "metrics")
    os.makedirs(output_dir, exist_ok=True)
    payload = report.to_json()
    payload.update(pred_file=os.path.abspath(pred_file), split=split, connectivity=connectivity,
                   matching="greedy by score; a box matches the best still-unmatched lesion with IoU >= threshold",
                   missing_predictions=missing, failed=failed)
    save_json_atomic(payload, os.path.join(output_dir, "detection_metrics.json"))
    buffer = io.StringIO()
    columns = list(report.per_case[0].keys())
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(report.per_case)
    with atomic_path(os.path.join(output_dir, "detection_per_case.csv")) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(buffer.getvalue())
    plot_froc(list(report.froc_curves.values()), os.path.join(output_dir, "froc.png"), title=title)
    return payload, missing, failed


def format_report(summary: dict) -> str:
    def show(value) -> str:
        return "  n/a " if value is None else f"{value:.4f}"
    lines = [f"cases {summary['num_cases']}, lesions {summary['num_lesions']}, predicted boxes "
             f"{summary['num_predictions']}",
             f"{'IoU':>6} {'AP':>8} {'recall':>8} {'precision':>10}"]
    for key in summary["AP"]:
        lines.append(f"{key:>6} {show(summary['AP'][key]):>8} {show(summary['lesion_recall'][key]):>8} "
                     f"{show(summary['lesion_precision'][key]):>10}")
    lines.append(f"mAP (IoU 0.10-0.50): {show(summary['mAP'])}")
    for key, froc_summary in summary["FROC"].items():
        rates = ", ".join(f"{r:g}: {show(s).strip()}" for r, s in zip(froc_summary["fp_rates"], froc_summary["sensitivity"]))
        lines.append(f"FROC @ IoU {key}: score {show(froc_summary['score'])}  (sensitivity at FP/volume {rates})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--pred_file", default=PRED_FILE, help="detections.json to evaluate")
    add("--abus_root", default=None,
        help=f"raw dataset root (default: the root recorded in split_info.json, else {DEFAULT_ABUS_ROOT})")
    add("--split_info", default=SPLIT_INFO, help="split_info.json written by abus_preprocessing.py")
    add("--split", default="test", choices=("train", "val", "test"), help="which split of split_info to evaluate")
    add("--output_dir", default=None, help="where the metrics go (default: <folder of pred_file>/metrics)")
    add("--connectivity", type=int, default=6, choices=(6, 18, 26), help="lesion connectivity in the GT masks")
    add("--num_processes", type=int, default=2, help="parallel processes reading the masks")
    add("--strict", action="store_true", help="stop at the first missing or failing case (exit code 1)")
    add("--no_progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from detection.detections_file import DetectionsFileError
    from light_training.progress import print_case_failures

    try:
        payload, missing, failed = evaluate_detection_file(
            args.pred_file, args.split_info, args.split, args.abus_root, args.output_dir, args.connectivity,
            args.num_processes, progress=not args.no_progress, strict=args.strict)
    except (FileNotFoundError, ValueError, KeyError, DetectionsFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NOTHING
    print(format_report(payload["summary"]))
    output_dir = args.output_dir or os.path.join(os.path.dirname(os.path.abspath(args.pred_file)), "metrics")
    print(f"written: {output_dir}/detection_metrics.json, detection_per_case.csv, froc.png")
    if missing or failed:
        print_case_failures(f"incomplete: {len(missing)} missing, {len(failed)} failed (the metrics cover the "
                            "other cases):", failed, missing, lambda name: f"no entry in {args.pred_file}")
        return EXIT_INCOMPLETE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
