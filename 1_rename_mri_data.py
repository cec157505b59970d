#!/usr/bin/env python
"""Step 1 of the BraTS 2023 pipeline: give the files of every case folder their short names, in place.

    BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1c.nii.gz  ->  BraTS-GLI-00000-000/t1c.nii.gz
    (likewise t1n, t2f, t2w and seg)

Safe to run any number of times: files that already have their short name are left alone; if a short-named
file already exists with DIFFERENT content the long file is not renamed and the conflict is reported (exit
code 1). A long file identical to its existing short twin is reported and left in place.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import sys

# Defaults (edit here or pass the flags).
DATA_DIR = "./data/raw_data/BraTS2023/ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData"
EXPECTED_FILES = ("t1c.nii.gz", "t1n.nii.gz", "t2f.nii.gz", "t2w.nii.gz", "seg.nii.gz")
IMAGE_SUFFIXES = (".nii.gz", ".nii")


def short_name(file_name: str, case_name: str) -> str | None:
    """The short name of a long BraTS file name, or None if ``file_name`` is not one.

    ``BraTS-GLI-00000-000-t1c.nii.gz`` in folder ``BraTS-GLI-00000-000`` → ``t1c.nii.gz``: the part after
    the case prefix (or, for other prefixes, after the last '-').
    """
    if not file_name.endswith(IMAGE_SUFFIXES) or "-" not in file_name:
        return None
    if file_name.startswith(case_name + "-"):
        rest = file_name[len(case_name) + 1:]
    else:
        rest = file_name.rsplit("-", 1)[1]
    return rest if rest and "-" not in rest and rest not in IMAGE_SUFFIXES else None


def rename_case(folder: str, dry_run: bool = False) -> dict[str, list]:
    """Rename the long-named files of one case folder; returns what happened (lists of names)."""
    case_name = os.path.basename(os.path.normpath(folder))
    result: dict[str, list] = {"renamed": [], "identical": [], "conflicts": [], "missing": []}
    present = set(os.listdir(folder))
    for file_name in sorted(os.listdir(folder)):
        target = short_name(file_name, case_name)
        if target is None or target == file_name:
            continue
        source_path, target_path = os.path.join(folder, file_name), os.path.join(folder, target)
        if os.path.exists(target_path):
            if filecmp.cmp(source_path, target_path, shallow=False):
                result["identical"].append(file_name)
            else:
                result["conflicts"].append(f"{source_path} -> {target} (exists with different content)")
            continue
        if not dry_run:
            os.rename(source_path, target_path)  # same directory: atomic
        present.add(target)
        result["renamed"].append(f"{file_name} -> {target}")
    result["missing"] = [f for f in EXPECTED_FILES if f not in present]
    return result


def rename_dataset(data_dir: str, dry_run: bool = False, verbose: bool = True) -> dict[str, dict[str, list]]:
    """Apply :func:`rename_case` to every case folder of ``data_dir``; returns ``{case: result}``."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{data_dir}: data directory not found (set DATA_DIR or pass --data_dir)")
    cases = sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d)) and not d.startswith("."))
    results = {}
    for case in cases:
        results[case] = rename_case(os.path.join(data_dir, case), dry_run)
        if verbose:
            for line in results[case]["renamed"]:
                print(f"{case}: {'would rename' if dry_run else 'renamed'} {line}")
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data_dir", default=DATA_DIR, help="folder holding one sub-folder per case")
    parser.add_argument("--dry_run", action="store_true", help="only print what would be renamed")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = rename_dataset(args.data_dir, args.dry_run, verbose=not args.quiet)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not results:
        print(f"error: {args.data_dir}: no case folders found", file=sys.stderr)
        return 1
    renamed = sum(len(r["renamed"]) for r in results.values())
    cases_changed = sum(1 for r in results.values() if r["renamed"])
    conflicts = [c for r in results.values() for c in r["conflicts"]]
    identical = [(case, f) for case, r in results.items() for f in r["identical"]]
    incomplete = {case: r["missing"] for case, r in results.items() if r["missing"]}
    verb = "would rename" if args.dry_run else "renamed"
    print(f"{len(results)} case folders: {verb} {renamed} files in {cases_changed} cases, "
          f"{len(results) - cases_changed} cases already had short names.")
    for case, file_name in identical:
        print(f"note: {case}/{file_name} is identical to its short-named copy and was left in place")
    for case, missing in incomplete.items():
        print(f"warning: {case} lacks {', '.join(missing)}")
    for conflict in conflicts:
        print(f"conflict: {conflict}; not renamed", file=sys.stderr)
    if conflicts:
        print(f"{len(conflicts)} conflict(s): resolve them by hand (keep the right file) and run again",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
