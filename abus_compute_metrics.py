#!/usr/bin/env python
"""ABUS step 5a: segmentation metrics of predicted lesion masks against the raw ground-truth masks.

For every case of the chosen split in ``split_info.json`` (written by ``abus_preprocessing.py``), the
prediction ``{results_root}/{pred_name}/ABUS_<id>.nii.gz`` is compared with the raw mask the case came from —
found through split_info, whichever original folder (Train / Validation / Test) it was in. Both must share the
voxel grid (shape, spacing, origin, direction). Per case: Dice, HD95 and the full Hausdorff distance (mm, with
the ground truth's real spacing; medpy), plus voxel counts.

Empty masks (ABUS convention of the reference): both empty → Dice 1, HD95 = HD = 0; exactly one empty → Dice 0,
HD95 = HD = ``--hd_penalty`` mm (50).

Writes ``{results_root}/result_metrics/{pred_name}.csv`` (one row per case) and ``.json`` (summary: mean ± std,
median, per case) and prints the summary. Missing predictions are listed, never silently skipped. Masks must be
label maps (finite whole numbers >= 0; > 0 = lesion) on the same grid, else the case fails with the file named.
Exit codes: 0 every case evaluated; 3 some predictions missing or failed (listed at the end; the rest is
written); 1 stopped: nothing could be evaluated, or --strict and a case was missing or failed (nothing written);
2 bad settings.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import io
import multiprocessing
import os
import sys
from typing import Dict, List, Optional

import numpy as np

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from abus_common import load_split_info, raw_paths_for_case  # noqa: E402

PRED_NAME = "segmamba_abus"
RESULTS_ROOT = "./prediction_results"
SPLIT_INFO = "./data/abus/split_info.json"
HD_PENALTY = 50.0
EXIT_OK, EXIT_NOTHING, EXIT_BAD_SETTINGS, EXIT_INCOMPLETE = 0, 1, 2, 3
CSV_COLUMNS = ["case", "original_folder", "dice", "hd95_mm", "hausdorff_mm", "gt_voxels", "pred_voxels"]


def surface_distance_metrics(pred: np.ndarray, gt: np.ndarray, spacing_zyx, penalty: float = HD_PENALTY) -> Dict[str, float]:
    """Dice, HD95 and full Hausdorff distance (mm) of two binary masks with the ABUS empty-mask convention."""
    from medpy.metric.binary import hd
    from light_training.evaluation import dice, hd95

    pred, gt = np.asarray(pred) > 0, np.asarray(gt) > 0
    result = {"dice": dice(pred, gt, empty="brats"),
              "hd95_mm": hd95(pred, gt, spacing_zyx, empty="brats", penalty=penalty),
              "gt_voxels": int(gt.sum()), "pred_voxels": int(pred.sum())}
    if pred.any() and gt.any():
        # Surfaces lie inside the union's bounding box (+1 voxel keeps the border erosion unchanged), so the
        # distance transforms can run on that box instead of the whole ultrasound volume.
        union = np.argwhere(pred | gt)
        lower = np.maximum(union.min(axis=0) - 1, 0)
        upper = np.minimum(union.max(axis=0) + 2, pred.shape)
        box = tuple(slice(lo, hi) for lo, hi in zip(lower, upper))
        result["hausdorff_mm"] = float(hd(pred[box], gt[box], voxelspacing=[float(s) for s in spacing_zyx],
                                          connectivity=1))
    else:
        result["hausdorff_mm"] = 0.0 if not pred.any() and not gt.any() else float(penalty)
    return result


def evaluate_case(gt_path: str, pred_path: str, penalty: float) -> Dict[str, float]:
    """Metrics of one case; ``ValueError`` naming the file on any grid mismatch."""
    from light_training.io import read_label_image

    gt, gt_geometry = read_label_image(gt_path, what="ground-truth mask")
    pred, pred_geometry = read_label_image(pred_path, what="predicted mask")
    if pred.shape != gt.shape:
        raise ValueError(f"{pred_path}: shape (Z, Y, X) {pred.shape} differs from the ground truth {gt_path} {gt.shape}")
    problems = gt_geometry.differences(pred_geometry)
    if problems:
        raise ValueError(f"{pred_path}: geometry differs from the ground truth {gt_path}: {'; '.join(problems)}")
    return surface_distance_metrics(pred, gt, gt_geometry.spacing_zyx, penalty)


def _worker(job):
    name, gt_path, pred_path, penalty = job
    try:
        return name, evaluate_case(gt_path, pred_path, penalty), None
    except Exception as error:  # reported per case
        return name, None, f"{type(error).__name__}: {error}"


def summarise(rows: Dict[str, Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    summary = {}
    for key in ("dice", "hd95_mm", "hausdorff_mm"):
        values = np.array([row[key] for row in rows.values()], dtype=np.float64)
        summary[key] = {"mean": float(values.mean()), "std": float(values.std()), "median": float(np.median(values)),
                        "min": float(values.min()), "max": float(values.max())}
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--pred_name", default=PRED_NAME, help="prediction folder name under --results_root")
    add("--split", default="test", choices=("train", "val", "test"), help="which split of split_info to evaluate")
    add("--split_info", default=SPLIT_INFO, help="split_info.json written by abus_preprocessing.py")
    add("--abus_root", default=None, help="raw dataset root (default: the one recorded in split_info.json)")
    add("--results_root", default=RESULTS_ROOT, help="folder holding the prediction folders and result_metrics/")
    add("--hd_penalty", type=float, default=HD_PENALTY, help="HD95 / Hausdorff (mm) when exactly one mask is empty")
    add("--num_processes", type=int, default=2, help="parallel worker processes")
    add("--strict", action="store_true", help="stop at the first missing or failing case (exit code 1)")
    add("--no_progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm.auto import tqdm
    from light_training.io import sanitize_case_name
    from light_training.progress import print_case_failures
    from light_training.utils.files import atomic_path, save_json_atomic

    try:
        sanitize_case_name(args.pred_name)  # it names the output files: they must stay in result_metrics/
    except ValueError as error:
        print(f"error: --pred_name: {error}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    try:
        info = load_split_info(args.split_info)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NOTHING
    names = list(info.get(args.split, []))
    pred_dir = os.path.join(args.results_root, args.pred_name)
    if not names:
        print(f"error: {args.split_info}: the {args.split} split is empty", file=sys.stderr)
        return EXIT_NOTHING
    jobs, missing = [], []
    rows: Dict[str, Dict[str, float]] = {}
    failed: Dict[str, str] = {}
    for name in names:
        pred_path = os.path.join(pred_dir, f"{name}.nii.gz")
        if not os.path.isfile(pred_path):
            missing.append(name)
            print(f"warning: no prediction {pred_path}", file=sys.stderr)
            if args.strict:
                print("stopped (--strict)", file=sys.stderr)
                return EXIT_NOTHING
            continue
        try:
            _, gt_path = raw_paths_for_case(info, name, args.abus_root, args.split_info)
        except KeyError as error:
            failed[name] = str(error.args[0])
            continue
        jobs.append((name, gt_path, pred_path, args.hd_penalty))
    bar = tqdm(total=len(jobs), desc="cases", unit="case", disable=args.no_progress)
    if args.num_processes <= 1 or len(jobs) <= 1 or args.strict:
        for job in jobs:
            name, row, error = _worker(job)
            (rows.__setitem__(name, row) if row is not None else failed.__setitem__(name, error))
            bar.update()
            if failed and args.strict:
                break
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.num_processes, mp_context=context) as pool:
            for name, row, error in pool.map(_worker, jobs):
                (rows.__setitem__(name, row) if row is not None else failed.__setitem__(name, error))
                bar.update()
    bar.close()
    for name, error in sorted(failed.items()):
        print(f"error: {name}: {error}", file=sys.stderr)
    if failed and args.strict:
        print("stopped at the first failing case (--strict)", file=sys.stderr)
        return EXIT_NOTHING
    if not rows:
        print(f"error: no case of the {args.split} split could be evaluated ({len(missing)} prediction(s) missing "
              f"in {pred_dir}, {len(failed)} failed)", file=sys.stderr)
        return EXIT_NOTHING

    out_dir = os.path.join(args.results_root, "result_metrics")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for name in sorted(rows):
        writer.writerow({"case": name, "original_folder": info["cases"][name].get("original_folder", ""),
                         **{k: rows[name][k] for k in CSV_COLUMNS[2:]}})
    with atomic_path(os.path.join(out_dir, f"{args.pred_name}.csv")) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(buffer.getvalue())
    summary = summarise(rows)
    save_json_atomic({"pred_name": args.pred_name, "split": args.split, "num_cases": len(rows),
                      "empty_mask_convention": f"both empty: Dice 1, HD 0; one empty: Dice 0, HD {args.hd_penalty} mm",
                      "summary": summary, "missing_predictions": missing, "failed": failed, "per_case": rows},
                     os.path.join(out_dir, f"{args.pred_name}.json"))
    print(f"{args.pred_name}: {len(rows)} {args.split} case(s)")
    print(f"  Dice       {summary['dice']['mean']:.4f} ± {summary['dice']['std']:.4f}")
    print(f"  HD95 (mm)  {summary['hd95_mm']['mean']:.2f} ± {summary['hd95_mm']['std']:.2f}")
    print(f"  HD (mm)    {summary['hausdorff_mm']['mean']:.2f} ± {summary['hausdorff_mm']['std']:.2f}")
    print(f"written: {os.path.join(out_dir, args.pred_name)}.csv and .json")
    if missing or failed:
        print_case_failures(f"incomplete: {len(missing)} missing, {len(failed)} failed of {len(names)} (the "
                            f"summary covers {len(rows)}):", failed, missing,
                            lambda name: f"no prediction {os.path.join(pred_dir, name + '.nii.gz')}")
        return EXIT_INCOMPLETE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
