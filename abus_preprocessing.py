#!/usr/bin/env python
"""ABUS step 1: raw TDSC-ABUS NRRD volumes → preprocessed lesion-only cases split into train / val / test.

1. Collect every case of ``{abus_root}/data/{Train,Validation,Test}/DATA/DATA_<id>.nrrd`` with its mask
   ``.../MASK/MASK_<id>.nrrd`` (ids must be unique across the three folders: an id found twice fails, both
   copies are left out).
2. Read every mask once (in parallel): cases without a mask file or with an unreadable one fail (listed);
   cases whose mask has no voxel > 0 are skipped and listed; spacing and shape are recorded.
3. Spacing check: by default volumes keep their voxel grid (as the published pipeline, so boxes stay in raw
   voxels); a clear warning lists anisotropic spacings or spacings that differ between cases, and
   ``--target_spacing Z Y X`` resamples every case to that spacing instead (detections are mapped back to the
   raw grid by the prediction script either way).
4. Seeded split of the lesion cases (sorted names, ``--seed``, ``--train_ratio`` / ``--val_ratio``, test = the
   rest), ignoring the original folders.
5. Per case: crop to the non-zero region (outside voxels of the segmentation become -1), z-score over that
   region (the unscanned zero border does not enter the statistics), masks binarised (> 0 → 1), foreground
   locations stored; written as ``{output_base}/{train,val,test}/ABUS_<id>.npz`` + ``.json`` (no pickle).
6. ``split_info.json`` (machine-readable: split lists, original folder and raw paths of every case, skipped
   and failed cases) and ``split_info.txt`` (the same for humans).

Re-running skips finished cases (``--overwrite`` redoes them) and removes cases that a previous run with
another split put into a different folder. Exit codes: 0 all good, 3 some cases failed (listed at the end with
the file and the problem; the rest is written), 1 stopped (no input, a fatal error, or ``--strict`` and a case
failed).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import sys
from typing import Dict, List, Optional

import numpy as np

from abus_common import RawAbusCase, discover_raw_cases
from light_training.io import case_paths, image_geometry, read_label_image
from light_training.preprocessing import PreprocessingConfig, PreprocessingError, RawCase, preprocess_cases
from light_training.progress import print_case_failures
from light_training.splits import make_splits
from light_training.utils.files import atomic_path, save_json_atomic

ABUS_ROOT = "./data/raw_data/ABUS"
OUTPUT_BASE = "./data/abus"
NUM_PROCESSES = 4
SEED = 42
TRAIN_RATIO = 0.8
VAL_RATIO = 0.1
SPACING_TOLERANCE = 0.1  # relative difference of spacings that triggers the warning

EXIT_OK, EXIT_STOPPED, EXIT_SOME_FAILED = 0, 1, 3
SPLITS = ("train", "val", "test")


def scan_case(case: RawAbusCase) -> Dict[str, object]:
    """Worker: lesion voxel count, number of lesions, shape and spacing of one case (never raises)."""
    from scipy import ndimage

    result: Dict[str, object] = {"name": case.name}
    try:
        shape, geometry = image_geometry(case.image_path)
        mask, mask_geometry = read_label_image(case.mask_path, what="mask")  # whole numbers >= 0, > 0 = lesion
        if tuple(mask.shape) != tuple(shape):
            raise ValueError(f"{case.mask_path}: mask shape (Z, Y, X) {mask.shape} differs from the image "
                             f"{case.image_path} {tuple(shape)}")
        foreground = mask > 0
        result.update(lesion_voxels=int(foreground.sum()), shape_zyx=[int(s) for s in shape],
                      spacing_xyz=list(geometry.spacing_xyz),
                      num_lesions=int(ndimage.label(foreground)[1]) if foreground.any() else 0)
    except Exception as error:  # reported per case
        result["error"] = str(error) or type(error).__name__
    return result


def scan_cases(cases: List[RawAbusCase], num_processes: int, progress: bool) -> Dict[str, Dict[str, object]]:
    from tqdm.auto import tqdm

    results: Dict[str, Dict[str, object]] = {}
    bar = tqdm(total=len(cases), desc="reading masks", unit="case", disable=not progress)
    if num_processes <= 1 or len(cases) <= 1:
        for case in cases:
            results[case.name] = scan_case(case)
            bar.update()
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=num_processes, mp_context=context) as pool:
            futures = {pool.submit(scan_case, case): case.name for case in cases}
            for future in concurrent.futures.as_completed(futures):
                name = futures[future]
                try:
                    results[name] = future.result()
                except Exception as error:  # the worker process died
                    results[name] = {"name": name, "error": f"worker process died: {error}"}
                bar.update()
    bar.close()
    return results


def spacing_warnings(scans: Dict[str, Dict[str, object]], tolerance: float = SPACING_TOLERANCE) -> List[str]:
    """Lines describing anisotropic spacings and spacings that differ between cases (empty when uniform)."""
    spacings = {name: np.asarray(s["spacing_xyz"], dtype=float) for name, s in scans.items() if "spacing_xyz" in s}
    if not spacings:
        return []
    lines = []
    anisotropic = sorted(name for name, s in spacings.items() if s.max() / s.min() > 1 + tolerance)
    if anisotropic:
        example = anisotropic[0]
        lines.append(f"{len(anisotropic)} case(s) have anisotropic voxels, e.g. {example} with spacing (x, y, z) "
                     f"{tuple(round(float(v), 4) for v in spacings[example])} mm")
    stacked = np.stack(list(spacings.values()))
    median = np.median(stacked, axis=0)
    differing = sorted(name for name, s in spacings.items() if np.any(np.abs(s - median) > tolerance * median))
    if differing:
        lines.append(f"{len(differing)} case(s) differ by more than {tolerance:.0%} from the median spacing "
                     f"{tuple(round(float(v), 4) for v in median)} mm, e.g. {differing[:5]}")
    return lines


def write_split_info(output_base: str, info: dict) -> None:
    save_json_atomic(info, os.path.join(output_base, "split_info.json"))
    lines = [f"ABUS split (seed {info['seed']}; ratios train {info['ratios']['train']:g} / val "
             f"{info['ratios']['val']:g} / test {info['ratios']['test']:g}); raw data: {info['abus_root']}", ""]
    total = sum(len(info[s]) for s in SPLITS)
    for split in SPLITS:
        names = info[split]
        share = 100.0 * len(names) / total if total else 0.0
        lines.append(f"{split}: {len(names)} cases ({share:.1f}%)")
        for name in names:
            entry = info["cases"][name]
            lines.append(f"  {name:<16} from {entry['original_folder']:<11} lesions {entry['num_lesions']:<3} "
                         f"lesion voxels {entry['lesion_voxels']}")
        lines.append("")
    for key, title in (("skipped_without_lesion", "skipped (mask has no lesion voxel)"),
                       ("skipped_missing_mask", "skipped (no mask file)")):
        lines.append(f"{title}: {len(info[key])}" + (f" - {', '.join(info[key])}" if info[key] else ""))
    lines.append(f"failed: {len(info['failed'])}")
    for name, reason in sorted(info["failed"].items()):
        lines.append(f"  {name}: {reason}")
    with atomic_path(os.path.join(output_base, "split_info.txt")) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")


def remove_misplaced_cases(output_base: str, split_of: Dict[str, str]) -> List[str]:
    """Delete ``ABUS_*`` case files that sit in a split folder the current split does not assign them to
    (left by an earlier run with another seed or ratios): a case must never be in train and test at once."""
    removed = []
    for split in SPLITS:
        folder = os.path.join(output_base, split)
        if not os.path.isdir(folder):
            continue
        for filename in sorted(os.listdir(folder)):
            stem, ext = os.path.splitext(filename)
            if ext in (".npz", ".json") and stem.startswith("ABUS_") and split_of.get(stem) != split:
                os.remove(os.path.join(folder, filename))
                removed.append(os.path.join(split, filename))
    return removed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--abus_root", default=ABUS_ROOT, help="raw dataset root (the folder that contains data/)")
    parser.add_argument("--output_base", default=OUTPUT_BASE, help="output root ({train,val,test}/ and split_info)")
    parser.add_argument("--num_processes", type=int, default=NUM_PROCESSES, help="parallel worker processes")
    parser.add_argument("--seed", type=int, default=SEED, help="random seed of the split")
    parser.add_argument("--train_ratio", type=float, default=TRAIN_RATIO, help="fraction of cases for training")
    parser.add_argument("--val_ratio", type=float, default=VAL_RATIO,
                        help="fraction of cases for validation (test = the rest)")
    parser.add_argument("--target_spacing", type=float, nargs=3, default=None, metavar=("Z", "Y", "X"),
                        help="resample every case to this spacing in mm (default: keep each case's voxel grid)")
    parser.add_argument("--overwrite", action="store_true", help="redo cases that are already preprocessed")
    parser.add_argument("--strict", action="store_true", help="stop at the first failing case (exit code 1)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    progress = not args.no_progress
    if not (0 < args.train_ratio <= 1 and 0 <= args.val_ratio < 1 and args.train_ratio + args.val_ratio <= 1 + 1e-9):
        print(f"error: need 0 < --train_ratio, 0 <= --val_ratio and train + val <= 1; got {args.train_ratio}, "
              f"{args.val_ratio}", file=sys.stderr)
        return EXIT_STOPPED
    test_ratio = max(0.0, 1.0 - args.train_ratio - args.val_ratio)
    abus_root = os.path.abspath(args.abus_root)
    try:
        raw_cases, problems, rejected = discover_raw_cases(abus_root)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_STOPPED
    for line in problems:
        print(f"warning: {line}", file=sys.stderr)
    print(f"found {len(raw_cases) + len(rejected)} case(s) in {abus_root}/data")
    if not raw_cases and not rejected:
        print(f"error: {abus_root}/data: no DATA_<id>.nrrd file in any of the DATA folders", file=sys.stderr)
        return EXIT_STOPPED

    # Every problem with one case is a failure of that case: listed, skipped, exit code 3 (or stop: --strict).
    failed: Dict[str, str] = dict(rejected)
    missing_mask = sorted(c.name for c in raw_cases if c.mask_path is None)
    by_raw_name = {c.name: c for c in raw_cases}
    for name in missing_mask:
        case = by_raw_name[name]
        expected = os.path.join(os.path.dirname(os.path.dirname(case.image_path)), "MASK", f"MASK_{case.case_id}.nrrd")
        failed[name] = f"no mask file: {expected} is missing (image {case.image_path})"
    for name, reason in sorted(failed.items()):
        print(f"error: {name}: {reason}", file=sys.stderr)
    if failed and args.strict:
        print("stopped at the first failing case (--strict)", file=sys.stderr)
        return EXIT_STOPPED
    with_mask = [c for c in raw_cases if c.mask_path is not None]
    scans = scan_cases(with_mask, args.num_processes, progress)
    unreadable = {name: str(s["error"]) for name, s in scans.items() if "error" in s}
    for name, reason in sorted(unreadable.items()):
        print(f"error: {name}: {reason}", file=sys.stderr)
    failed.update(unreadable)
    if unreadable and args.strict:
        print("stopped at the first failing case (--strict)", file=sys.stderr)
        return EXIT_STOPPED
    good = {name: s for name, s in scans.items() if "error" not in s}
    without_lesion = sorted(name for name, s in good.items() if s["lesion_voxels"] == 0)
    lesion_cases = [c for c in with_mask if c.name in good and good[c.name]["lesion_voxels"] > 0]
    print(f"{len(lesion_cases)} case(s) with lesions; skipped {len(without_lesion)} without lesion"
          + (f" ({', '.join(without_lesion)})" if without_lesion else "")
          + (f", {len(missing_mask)} without mask" if missing_mask else "")
          + (f", {len(unreadable)} unreadable" if unreadable else "")
          + (f", {len(rejected)} with an unusable id" if rejected else ""))
    if not lesion_cases:
        print("error: no case with a lesion to preprocess", file=sys.stderr)
        return EXIT_STOPPED

    warnings = spacing_warnings({c.name: good[c.name] for c in lesion_cases})
    if warnings:
        if args.target_spacing is None:
            print("WARNING: the voxel spacing is not uniform:\n  " + "\n  ".join(warnings) +
                  "\n  Cases keep their own voxel grid (no resampling), so voxels are not cubes of the same size "
                  "in every case. Pass --target_spacing Z Y X (mm) to resample all cases to one spacing.",
                  file=sys.stderr)
        else:
            print("note: spacings differ (" + "; ".join(warnings) + f"); resampling to {args.target_spacing} mm")

    try:
        splits = make_splits([c.name for c in lesion_cases], (args.train_ratio, args.val_ratio, test_ratio),
                             args.seed)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_STOPPED
    split_of = {name: split for split in SPLITS for name in splits[split]}
    removed = remove_misplaced_cases(args.output_base, split_of)
    if removed:
        print(f"removed {len(removed)} file(s) a previous run had put into another split folder: {removed[:6]}")

    config = PreprocessingConfig(
        target_spacing_zyx=tuple(args.target_spacing) if args.target_spacing else None, labels=(1,),
        normalize_with_mask=True, binarize_seg=True)
    by_name = {c.name: c for c in lesion_cases}
    for split in SPLITS:
        cases = [RawCase(name, [by_name[name].image_path], by_name[name].mask_path, ["ultrasound"])
                 for name in splits[split]]
        if not cases:
            print(f"warning: the {split} split is empty ({len(lesion_cases)} lesion cases)", file=sys.stderr)
            continue
        try:
            report = preprocess_cases(cases, os.path.join(args.output_base, split), config,
                                      num_workers=args.num_processes, overwrite=args.overwrite,
                                      strict=args.strict, progress=progress)
        except PreprocessingError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_STOPPED
        failed.update(report.failed)
        print(f"{split}: {len(report.done)} preprocessed, {len(report.skipped)} already done, "
              f"{len(report.failed)} failed")

    written = {split: [n for n in splits[split] if os.path.isfile(case_paths(os.path.join(args.output_base, split), n)[1])]
               for split in SPLITS}
    info = {
        "seed": args.seed,
        "ratios": {"train": args.train_ratio, "val": args.val_ratio, "test": test_ratio},
        "abus_root": abus_root,
        "target_spacing_zyx": list(args.target_spacing) if args.target_spacing else None,
        **written,
        "cases": {name: {"split": split_of[name], "original_folder": by_name[name].folder,
                         "image": os.path.relpath(by_name[name].image_path, abus_root),
                         "mask": os.path.relpath(by_name[name].mask_path, abus_root),
                         "lesion_voxels": good[name]["lesion_voxels"], "num_lesions": good[name]["num_lesions"],
                         "shape_zyx": good[name]["shape_zyx"], "spacing_xyz": good[name]["spacing_xyz"]}
                  for split in SPLITS for name in written[split]},
        "skipped_without_lesion": without_lesion,
        "skipped_missing_mask": missing_mask,
        "failed": failed,
    }
    os.makedirs(args.output_base, exist_ok=True)
    write_split_info(args.output_base, info)
    print(f"train {len(written['train'])} / val {len(written['val'])} / test {len(written['test'])} cases in "
          f"{args.output_base}; split written to {os.path.join(args.output_base, 'split_info.json')} and .txt")
    if failed:
        print_case_failures(f"{len(failed)} case(s) failed (skipped; the rest is written):", failed)
        return EXIT_SOME_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
