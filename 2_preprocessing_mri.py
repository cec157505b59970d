#!/usr/bin/env python
"""Step 2 of the BraTS 2023 pipeline: preprocess every renamed case folder into ``OUTPUT_DIR/train``.

Per case: read the four modalities in the order [t2w, t2f, t1n, t1c] and seg.nii.gz, check they share shape
and geometry, crop to the non-zero (brain) region, z-score each channel, resample to 1 mm, store foreground
locations, and write ``NAME.npz`` (data float32 (4, Z, Y, X), seg int8 (1, Z, Y, X)) + ``NAME.json``
(properties). Finished cases are skipped on re-runs (``--overwrite`` redoes them). A dataset summary is
written to ``OUTPUT_DIR/dataset_summary.json`` and printed.

Exit codes: 0 every case done; 3 finished, but some cases failed (listed at the end); 1 stopped (``--strict``
and a case failed, or no input found).
"""
from __future__ import annotations

import argparse
import os
import sys

from light_training.io import sanitize_case_name
from light_training.preprocessing import (PreprocessingConfig, PreprocessingError, RawCase, dataset_summary,
                                          format_summary_table, preprocess_cases)
from light_training.progress import print_case_failures
from light_training.utils.files import save_json_atomic

# Defaults (edit here or pass the flags).
DATA_DIR = "./data/raw_data/BraTS2023/ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData"
OUTPUT_DIR = "./data/fullres"                 # cases go to OUTPUT_DIR/train, the summary to OUTPUT_DIR
MODALITIES = ["t2w", "t2f", "t1n", "t1c"]     # channel order of the model input (as the reference)
SEG_NAME = "seg.nii.gz"
TARGET_SPACING = [1.0, 1.0, 1.0]              # mm, Z Y X
LABELS = [1, 2, 3]                            # 1 NCR, 2 ED, 3 ET (0 background)
NUM_PROCESSES = 8
NORMALIZE_WITH_MASK = False                   # False: z-score over the cropped volume, as the reference

EXIT_OK, EXIT_STOPPED, EXIT_SOME_FAILED = 0, 1, 3


def find_cases(data_dir: str, modalities: list[str], seg_name: str) -> tuple[list[RawCase], dict[str, str]]:
    """Case folders of ``data_dir`` as :class:`RawCase` (sorted), plus problems found before reading any
    image (``{case: message}``, e.g. files still carrying their long BraTS names)."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{data_dir}: raw data directory not found (set DATA_DIR or pass --data_dir)")
    cases, problems = [], {}
    for name in sorted(os.listdir(data_dir)):
        folder = os.path.join(data_dir, name)
        if not os.path.isdir(folder) or name.startswith("."):
            continue
        try:
            sanitize_case_name(name)  # the name becomes NAME.npz/NAME.json in the output folder
        except ValueError as error:
            problems[name] = f"{folder}: unusable case folder name: {error}"
            continue
        images = [os.path.join(folder, f"{m}.nii.gz") for m in modalities]
        seg = os.path.join(folder, seg_name)
        missing = [os.path.basename(p) for p in images + [seg] if not os.path.isfile(p)]
        if missing:
            long_names = [f for f in os.listdir(folder) if f.startswith(name + "-")]
            hint = " (the files still have their long BraTS names: run 1_rename_mri_data.py first)" if long_names else ""
            problems[name] = f"{folder}: missing {', '.join(missing)}{hint}"
            continue
        cases.append(RawCase(name=name, image_paths=images, seg_path=seg, channel_names=list(modalities)))
    return cases, problems


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[-1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data_dir", default=DATA_DIR, help="renamed raw case folders")
    parser.add_argument("--output_dir", default=OUTPUT_DIR, help="output root (cases in OUTPUT_DIR/train)")
    parser.add_argument("--modalities", nargs="+", default=MODALITIES, help="channel files, in model-input order")
    parser.add_argument("--seg_name", default=SEG_NAME, help="segmentation file name in each case folder")
    parser.add_argument("--target_spacing", type=float, nargs=3, default=TARGET_SPACING, metavar=("Z", "Y", "X"),
                        help="output voxel size in mm")
    parser.add_argument("--labels", type=int, nargs="+", default=LABELS, help="foreground labels")
    parser.add_argument("--num_processes", type=int, default=NUM_PROCESSES, help="worker processes")
    parser.add_argument("--mask_norm", action="store_true", default=NORMALIZE_WITH_MASK,
                        help="z-score inside the brain mask only (default: whole cropped volume, as the reference)")
    parser.add_argument("--overwrite", action="store_true", help="redo cases that are already preprocessed")
    parser.add_argument("--strict", action="store_true", help="stop at the first failing case (exit code 1)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cases, problems = find_cases(args.data_dir, args.modalities, args.seg_name)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_STOPPED
    if not cases and not problems:
        print(f"error: {args.data_dir}: no case folders found", file=sys.stderr)
        return EXIT_STOPPED
    if problems and args.strict:
        name, message = next(iter(problems.items()))
        print(f"error: case {name}: {message} (strict mode, stopped)", file=sys.stderr)
        return EXIT_STOPPED
    config = PreprocessingConfig(target_spacing_zyx=tuple(args.target_spacing), labels=tuple(args.labels),
                                 normalize_with_mask=args.mask_norm)
    train_dir = os.path.join(args.output_dir, "train")
    print(f"preprocessing {len(cases)} cases from {args.data_dir} into {train_dir} "
          f"({args.num_processes} processes, channels {args.modalities})")
    try:
        report = preprocess_cases(cases, train_dir, config, num_workers=args.num_processes,
                                  overwrite=args.overwrite, strict=args.strict, progress=not args.no_progress)
    except PreprocessingError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_STOPPED
    failed = {**problems, **report.failed}
    complete = sorted(report.done + report.skipped)
    summary = dataset_summary(train_dir, complete, failed)
    summary_path = os.path.join(args.output_dir, "dataset_summary.json")
    save_json_atomic(summary, summary_path)
    print(format_summary_table(summary))
    print(f"done: {len(report.done)} preprocessed, {len(report.skipped)} already done (skipped), "
          f"{len(failed)} failed. Summary: {summary_path}")
    if failed:
        print_case_failures(f"{len(failed)} case(s) failed:", failed)
        return EXIT_SOME_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
