#!/usr/bin/env python
"""Step 5 of the BraTS 2023 pipeline: Dice and HD95 of the predictions of the test split.

For every test case listed in the shared ``splits.json`` this reads the ground truth
``DATA_DIR/<case>/seg.nii.gz`` and the prediction ``PREDICTION_ROOT/<pred_name>/<case>.nii.gz`` (a 3D label
map: 0 background, 1 NCR, 2 ED, 3 ET), checks that both have the same grid (shape, spacing, origin,
direction), and computes Dice and HD95 (medpy, in mm with the real voxel spacing) for the regions
TC (1|3), WT (1|2|3) and ET (3), under both empty-mask conventions:

  reference  prediction or ground truth empty -> Dice 0, HD95 50            (the reference implementation)
  brats      both empty -> Dice 1, HD95 0; one empty -> Dice 0, HD95 373.13 (BraTS challenge)

Writes ``PREDICTION_ROOT/result_metrics/<pred_name>.csv`` (one row per case) and ``.json`` (summary) and
prints mean ± std. Missing predictions are listed (not silently skipped). Exit codes: 0 all test cases
evaluated; 3 some were missing or failed (listed at the end; the rest is written and summarised); 1 stopped:
nothing could be evaluated, or --strict and a case was missing or failed (nothing written); 2 bad settings.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys


from light_training.evaluation import (BRATS_HD95_PENALTY, CONVENTIONS, REFERENCE_HD95_PENALTY, REGION_NAMES,
                                       brats_case_metrics, format_summary, summarize)
from light_training.io import read_label_image, sanitize_case_name
from light_training.splits import load_or_create_splits
from light_training.utils.files import atomic_path, save_json_atomic

# Defaults (edit here or pass the flags).
PRED_NAME = "segmamba"
DATA_DIR = "./data/raw_data/BraTS2023/ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData"
PREDICTION_ROOT = "./prediction_results"
SPLITS_FILE = "./data/fullres/splits.json"   # written when training starts; shared by predict and metrics
SPLIT = "test"
SEG_NAME = "seg.nii.gz"
LABELS = (0, 1, 2, 3)

EXIT_OK, EXIT_NOTHING, EXIT_BAD_SETTINGS, EXIT_INCOMPLETE = 0, 1, 2, 3

CSV_METRICS = [f"{region}_{metric}_{convention}" for region in REGION_NAMES for convention in CONVENTIONS
               for metric in ("dice", "hd95")] + \
              [f"{region}_{count}" for region in REGION_NAMES for count in ("gt_voxels", "pred_voxels")]


def evaluate_case(gt_path: str, pred_path: str, check_geometry: bool = True) -> dict[str, dict[str, float]]:
    """Metrics of one case (``{region: metrics}``); raises ``ValueError`` naming the file on any mismatch."""
    gt, gt_geometry = read_label_image(gt_path, LABELS, what="ground truth")
    pred, pred_geometry = read_label_image(pred_path, LABELS, what="prediction")
    if pred.shape != gt.shape:
        raise ValueError(f"{pred_path}: shape (Z, Y, X) {pred.shape} differs from the ground truth {gt_path} {gt.shape}")
    if check_geometry:
        problems = gt_geometry.differences(pred_geometry)
        if problems:
            raise ValueError(f"{pred_path}: geometry differs from the ground truth ({'; '.join(problems)}); "
                             f"pass --ignore_geometry to compare on the voxel grid anyway")
    return brats_case_metrics(pred, gt, gt_geometry.spacing_zyx)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred_name", default=PRED_NAME,
                        help=f"prediction folder name under --prediction_root (default: {PRED_NAME})")
    parser.add_argument("--data_dir", default=DATA_DIR, help=f"raw case folders with the ground truth (default: {DATA_DIR})")
    parser.add_argument("--prediction_root", default=PREDICTION_ROOT, help=f"(default: {PREDICTION_ROOT})")
    parser.add_argument("--splits", default=SPLITS_FILE, help=f"the shared splits.json (default: {SPLITS_FILE})")
    parser.add_argument("--split", default=SPLIT, choices=["train", "val", "test"], help=f"(default: {SPLIT})")
    parser.add_argument("--seg_name", default=SEG_NAME, help=f"ground-truth file in each case folder (default: {SEG_NAME})")
    parser.add_argument("--ignore_geometry", action="store_true",
                        help="only require equal shapes (for predictions written without the image header)")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first missing or failing case (exit code 1, nothing written)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def _csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["case", "status"] + CSV_METRICS + ["error"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm
    args = build_parser().parse_args(argv)
    try:
        sanitize_case_name(args.pred_name)  # it names the output files: they must stay in result_metrics/
    except ValueError as error:
        print(f"error: --pred_name: {error}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    if not os.path.isdir(args.data_dir):
        print(f"error: {args.data_dir}: ground-truth directory not found (set DATA_DIR or pass --data_dir)", file=sys.stderr)
        return EXIT_NOTHING
    raw_cases = sorted(d for d in os.listdir(args.data_dir) if os.path.isdir(os.path.join(args.data_dir, d)))
    try:
        splits = load_or_create_splits(args.splits, raw_cases, create=False)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NOTHING
    cases = splits[args.split]
    if not cases:
        print(f"error: {args.splits}: the {args.split!r} split is empty", file=sys.stderr)
        return EXIT_NOTHING
    pred_dir = os.path.join(args.prediction_root, args.pred_name)
    print(f"evaluating {len(cases)} {args.split} cases of {args.splits}: predictions {pred_dir}, ground truth {args.data_dir}")

    rows, metrics, missing, failed = [], {}, [], {}
    for case in tqdm(cases, desc="metrics", unit="case", disable=args.no_progress):
        gt_path = os.path.join(args.data_dir, case, args.seg_name)
        pred_path = os.path.join(pred_dir, f"{case}.nii.gz")
        if not os.path.isfile(pred_path):
            missing.append(case)
            rows.append({"case": case, "status": "missing", "error": f"{pred_path} not found"})
            if args.strict:
                print(f"error: missing prediction {pred_path}; stopped (--strict)", file=sys.stderr)
                return EXIT_NOTHING
            continue
        try:
            result = evaluate_case(gt_path, pred_path, check_geometry=not args.ignore_geometry)
        except Exception as error:  # one bad case must not cost the others; the message names the file
            message = str(error) if isinstance(error, (ValueError, OSError)) else f"{type(error).__name__}: {error}"
            failed[case] = message
            rows.append({"case": case, "status": "failed", "error": message})
            if args.strict:
                print(f"error: {case}: {message}; stopped (--strict)", file=sys.stderr)
                return EXIT_NOTHING
            continue
        metrics[case] = result
        row = {"case": case, "status": "ok", "error": ""}
        for region, values in result.items():
            for key, value in values.items():
                row[f"{region}_{key}"] = value
        rows.append(row)

    summary = summarize(metrics)
    out_base = os.path.join(args.prediction_root, "result_metrics", args.pred_name)
    with atomic_path(out_base + ".csv") as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(_csv_text(rows))
    save_json_atomic({
        "pred_name": args.pred_name, "split": args.split, "splits_file": os.path.abspath(args.splits),
        "prediction_dir": os.path.abspath(pred_dir), "ground_truth_dir": os.path.abspath(args.data_dir),
        "n_cases_in_split": len(cases), "n_evaluated": len(metrics), "missing_predictions": missing,
        "failed": failed,
        "conventions": {"reference": f"prediction or ground truth empty -> Dice 0, HD95 {REFERENCE_HD95_PENALTY:g}",
                        "brats": f"both empty -> Dice 1, HD95 0; one empty -> Dice 0, HD95 {BRATS_HD95_PENALTY:g}"},
        "regions": {"TC": "labels 1|3", "WT": "labels 1|2|3", "ET": "label 3"},
        "summary": summary,
    }, out_base + ".json")

    if metrics:
        print(f"\n{args.pred_name}: {len(metrics)} of {len(cases)} {args.split} cases (mean ± std over cases)")
        print(format_summary(summary))
    print(f"\nwrote {out_base}.csv and {out_base}.json")
    for case in missing:
        print(f"missing prediction: {os.path.join(pred_dir, case + '.nii.gz')}", file=sys.stderr)
    for case, message in failed.items():
        print(f"failed: {case}: {message}", file=sys.stderr)
    if not metrics:
        print("error: no case could be evaluated", file=sys.stderr)
        return EXIT_NOTHING
    if missing or failed:
        print(f"{len(missing)} prediction(s) missing, {len(failed)} case(s) failed: the summary covers "
              f"{len(metrics)} of {len(cases)} cases", file=sys.stderr)
        return EXIT_INCOMPLETE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
