"""Shared helpers of the ABUS scripts (not a script itself): the raw TDSC-ABUS layout, case names,
``split_info.json`` and ground-truth lookup.

Raw layout: ``{abus_root}/data/{Train,Validation,Test}/DATA/DATA_<id>.nrrd`` with the mask
``{abus_root}/data/<same folder>/MASK/MASK_<id>.nrrd`` (voxels > 0 = lesion). Case names are ``ABUS_<id>``.

``split_info.json`` (written by ``abus_preprocessing.py`` next to the preprocessed folders)::

    {"seed": 42, "ratios": {"train": 0.8, "val": 0.1, "test": 0.1},
     "abus_root": "/abs/path/to/ABUS",
     "train": [names], "val": [names], "test": [names],
     "cases": {"ABUS_000": {"split": "train", "original_folder": "Train",
                            "image": "data/Train/DATA/DATA_000.nrrd",     # relative to abus_root
                            "mask": "data/Train/MASK/MASK_000.nrrd",
                            "lesion_voxels": 1234, "num_lesions": 1, "shape_zyx": [...], "spacing_xyz": [...]}},
     "skipped_without_lesion": [names], "skipped_missing_mask": [names], "failed": {name: reason}}

The metric scripts find each test case's raw mask through ``cases[name]["mask"]`` — whatever folder the case
originally came from (the re-split mixes the original Train/Validation/Test folders).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

RAW_FOLDERS = ("Train", "Validation", "Test")
CASE_PREFIX = "ABUS_"
_DATA_FILE = re.compile(r"^DATA_(.+)\.nrrd$")


@dataclass
class RawAbusCase:
    """One raw case: id (e.g. ``"000"``), original folder and the two file paths (mask may be missing)."""
    case_id: str
    folder: str
    image_path: str
    mask_path: Optional[str]

    @property
    def name(self) -> str:
        return CASE_PREFIX + self.case_id


def discover_raw_cases(abus_root: str) -> Tuple[List[RawAbusCase], List[str], Dict[str, str]]:
    """List the raw cases (folders in Train, Validation, Test order, files sorted by name).

    Returns ``(cases, problems, rejected)``: problems are human-readable lines about files that are ignored
    (masks without an image, files not named ``DATA_<id>.nrrd``); ``rejected`` maps case names that cannot be
    processed to the reason, each naming the files: an id present in more than one folder (its outputs would
    overwrite each other, so none of its copies is used) or an id that is not a safe file name.

    Raises:
        FileNotFoundError: ``{abus_root}/data`` has none of the three folders.
    """
    from light_training.io import sanitize_case_name

    data_root = os.path.join(abus_root, "data")
    present = [f for f in RAW_FOLDERS if os.path.isdir(os.path.join(data_root, f, "DATA"))]
    if not present:
        raise FileNotFoundError(
            f"{data_root}: no raw ABUS data found; expected {data_root}/{{Train,Validation,Test}}/DATA/DATA_<id>.nrrd "
            f"and .../MASK/MASK_<id>.nrrd (set --abus_root to the folder that contains 'data/')")
    found: Dict[str, List[RawAbusCase]] = {}
    problems: List[str] = []
    for folder in present:
        data_dir = os.path.join(data_root, folder, "DATA")
        mask_dir = os.path.join(data_root, folder, "MASK")
        ids = []
        for filename in sorted(os.listdir(data_dir)):
            match = _DATA_FILE.match(filename)
            if match is None:
                if not filename.startswith("."):
                    problems.append(f"{os.path.join(data_dir, filename)}: ignored (not named DATA_<id>.nrrd)")
                continue
            ids.append(match.group(1))
        for case_id in ids:
            mask_path = os.path.join(mask_dir, f"MASK_{case_id}.nrrd")
            found.setdefault(case_id, []).append(RawAbusCase(
                case_id, folder, os.path.join(data_dir, f"DATA_{case_id}.nrrd"),
                mask_path if os.path.isfile(mask_path) else None))
        if os.path.isdir(mask_dir):
            for filename in sorted(os.listdir(mask_dir)):
                if filename.startswith("MASK_") and filename.endswith(".nrrd") and filename[5:-5] not in ids:
                    problems.append(f"{os.path.join(mask_dir, filename)}: mask without an image DATA_{filename[5:]}")
    cases: List[RawAbusCase] = []
    rejected: Dict[str, str] = {}
    for case_id, copies in found.items():
        name = copies[0].name
        if len(copies) > 1:
            rejected[name] = (f"case id {case_id!r} is present {len(copies)} times ("
                              + ", ".join(c.image_path for c in copies)
                              + "); the output name must be unique: rename or remove all but one")
            continue
        try:
            sanitize_case_name(name)
        except ValueError as error:
            rejected[name] = f"{copies[0].image_path}: {error}"
            continue
        cases.append(copies[0])
    return cases, problems, rejected


def load_split_info(path: str) -> dict:
    """Read ``split_info.json`` (see module docstring) with a clear error when it is missing or malformed."""
    from light_training.utils.files import load_json

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: split_info.json not found (it is written by abus_preprocessing.py; "
                                "pass --split_info)")
    info = load_json(path)
    if not isinstance(info, dict) or not isinstance(info.get("cases"), dict):
        raise ValueError(f"{path}: not an ABUS split_info.json (no 'cases' object)")
    validate_split_lists(info, path)
    return info


def validate_split_lists(info: dict, source: str) -> None:
    """Raise ``ValueError`` naming ``source`` unless train/val/test are lists of safe, distinct case names
    (case names become output file names, so they must not carry path separators or '..')."""
    from light_training.io import sanitize_case_name

    seen: Dict[str, str] = {}
    for split in ("train", "val", "test"):
        names = info.get(split, [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{source}: {split!r} must be a list of case names")
        for name in names:
            try:
                sanitize_case_name(name)
            except ValueError as error:
                raise ValueError(f"{source}: {split!r}: {error}") from None
            if name in seen:
                where = split if seen[name] == split else f"{seen[name]!r} and {split!r}"
                raise ValueError(f"{source}: case {name} is listed twice (in {where})")
            seen[name] = split


def raw_paths_for_case(split_info: dict, name: str, abus_root: Optional[str] = None,
                       split_info_path: str = "split_info.json") -> Tuple[str, str]:
    """``(image path, mask path)`` of a case in the raw dataset.

    ``abus_root`` overrides the root recorded in split_info (for data that moved since preprocessing).
    """
    entry = split_info["cases"].get(name)
    if entry is None:
        raise KeyError(f"{split_info_path}: case {name} is not listed (was it preprocessed with another "
                       "split_info.json?)")
    root = abus_root or split_info.get("abus_root") or "."
    return os.path.join(root, entry["image"]), os.path.join(root, entry["mask"])


def case_id_from_name(name: str) -> str:
    """``ABUS_<id>`` → ``<id>``."""
    return name[len(CASE_PREFIX):] if name.startswith(CASE_PREFIX) else name
