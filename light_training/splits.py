"""Deterministic train/val/test splits stored in ``splits.json``, shared by every stage.

The split is computed once from the SORTED case names (so it does not depend on file-system order) and
written to a JSON file; training, prediction and metrics all read that same file instead of re-deriving it.

File format::

    {"seed": 42, "ratios": [0.7, 0.1, 0.2], "n_cases": 1251,
     "train": [...], "val": [...], "test": [...]}
"""
from __future__ import annotations

import collections
import logging
import os
import random
from typing import Iterable, Sequence

from light_training.io import sanitize_case_name
from light_training.utils.files import load_json, save_json_atomic

__all__ = ["SPLIT_NAMES", "DEFAULT_RATIOS", "DEFAULT_SEED", "make_splits", "split_sizes", "validate_splits",
           "load_splits", "save_splits", "load_or_create_splits", "case_names_in_dir"]

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
DEFAULT_RATIOS = (0.7, 0.1, 0.2)
DEFAULT_SEED = 42


def split_sizes(n_cases: int, ratios: Sequence[float] = DEFAULT_RATIOS) -> tuple[int, int, int]:
    """Number of (train, val, test) cases for ``n_cases``.

    val and test get ``round(n * ratio)`` cases, at least one each when their ratio is non-zero and there
    are at least three cases; train gets the rest, so the split always covers every case. For BraTS 2023
    (1,251 cases) this gives 876 / 125 / 250 (the reference also tests on 250 cases).
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"ratios must be three non-negative numbers (train, val, test), got {tuple(ratios)}")
    total = float(sum(ratios))
    fractions = [r / total for r in ratios]
    sizes = []
    for fraction in fractions[1:]:
        size = int(round(n_cases * fraction))
        if fraction > 0 and n_cases >= 3:
            size = max(size, 1)
        sizes.append(size)
    n_val, n_test = sizes
    if n_val + n_test > n_cases:  # tiny datasets: give val/test what there is
        n_val = min(n_val, n_cases)
        n_test = min(n_test, n_cases - n_val)
    n_train = n_cases - n_val - n_test
    if fractions[0] > 0 and n_train == 0 and n_cases > 0:
        raise ValueError(f"{n_cases} case(s) are too few for ratios {tuple(ratios)}: no training case left")
    return n_train, n_val, n_test


def make_splits(names: Iterable[str], ratios: Sequence[float] = DEFAULT_RATIOS,
                seed: int = DEFAULT_SEED) -> dict[str, list[str]]:
    """Split case names into train/val/test deterministically.

    The names are checked for duplicates and SORTED first, then shuffled with ``random.Random(seed)``; the
    first cases go to train, then val, then test (sizes from :func:`split_sizes`). Each list is returned
    sorted. The result depends only on the set of names, the ratios and the seed.
    """
    names = list(names)
    duplicates = sorted(n for n, count in collections.Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"case names occur more than once: {duplicates[:10]}")
    ordered = sorted(names)
    random.Random(seed).shuffle(ordered)
    n_train, n_val, _ = split_sizes(len(ordered), ratios)
    return {"train": sorted(ordered[:n_train]),
            "val": sorted(ordered[n_train:n_train + n_val]),
            "test": sorted(ordered[n_train + n_val:])}


def validate_splits(splits: dict, source: str = "splits") -> None:
    """Raise ``ValueError`` (naming ``source``) unless train/val/test are lists of safe case names (see
    :func:`light_training.io.sanitize_case_name`) without repeats or overlap."""
    for key in SPLIT_NAMES:
        if key not in splits or not isinstance(splits[key], list):
            raise ValueError(f"{source}: missing list {key!r}")
        if not all(isinstance(n, str) for n in splits[key]):
            raise ValueError(f"{source}: {key!r} must list case names (strings)")
        for name in splits[key]:
            try:
                sanitize_case_name(name)  # names become output file names: no path separators, no '..'
            except ValueError as error:
                raise ValueError(f"{source}: {key!r}: {error}") from None
        if len(set(splits[key])) != len(splits[key]):
            raise ValueError(f"{source}: {key!r} lists a case more than once")
    for i, first in enumerate(SPLIT_NAMES):
        for second in SPLIT_NAMES[i + 1:]:
            shared = sorted(set(splits[first]) & set(splits[second]))
            if shared:
                raise ValueError(f"{source}: cases in both {first!r} and {second!r}: {shared[:10]}")


def save_splits(path: str | os.PathLike, splits: dict[str, list[str]], ratios: Sequence[float] = DEFAULT_RATIOS,
                seed: int = DEFAULT_SEED) -> None:
    """Write ``splits`` (plus seed and ratios for the record) to ``path`` atomically."""
    validate_splits(splits, os.fspath(path))
    n_cases = sum(len(splits[k]) for k in SPLIT_NAMES)
    save_json_atomic({"seed": seed, "ratios": list(ratios), "n_cases": n_cases,
                      **{k: list(splits[k]) for k in SPLIT_NAMES}}, path)


def load_splits(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read and validate a ``splits.json``; returns ``{"train": [...], "val": [...], "test": [...]}``."""
    path = os.fspath(path)
    content = load_json(path)
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a JSON object with train/val/test lists")
    validate_splits(content, path)
    return {k: list(content[k]) for k in SPLIT_NAMES}


def load_or_create_splits(path: str | os.PathLike, names: Iterable[str], ratios: Sequence[float] = DEFAULT_RATIOS,
                          seed: int = DEFAULT_SEED, create: bool = True) -> dict[str, list[str]]:
    """Return the split stored at ``path``, creating it from ``names`` when the file does not exist yet.

    Args:
        path: the ``splits.json`` every stage shares.
        names: the cases available now (e.g. preprocessed ``*.npz`` stems or raw case folders).
        create: if False, a missing file is an error (prediction/metrics must not invent a new split).

    Raises:
        ValueError: the file lists cases that are not in ``names`` (the message names the file and cases).
        FileNotFoundError: the file is missing and ``create`` is False.

    Cases in ``names`` that the file does not list are reported with a warning and left out (a split is never
    changed silently after training started).
    """
    path = os.fspath(path)
    names = list(names)
    if os.path.isfile(path):
        splits = load_splits(path)
        listed = {n for k in SPLIT_NAMES for n in splits[k]}
        missing = sorted(listed - set(names))
        if missing:
            raise ValueError(f"{path}: lists {len(missing)} case(s) that do not exist in the data: "
                             f"{missing[:10]}{' ...' if len(missing) > 10 else ''}. Use the splits file that "
                             f"belongs to this dataset, or delete it to create a new split.")
        unlisted = sorted(set(names) - listed)
        if unlisted:
            logger.warning("%s: %d case(s) are not in the split and are ignored: %s", path, len(unlisted),
                           unlisted[:10])
        return splits
    if not create:
        raise FileNotFoundError(f"{path}: splits file not found (it is written when training starts; "
                                f"pass the splits.json of the training run)")
    splits = make_splits(names, ratios, seed)
    save_splits(path, splits, ratios, seed)
    logger.info("wrote %s: %d train / %d val / %d test", path, *(len(splits[k]) for k in SPLIT_NAMES))
    return splits


def case_names_in_dir(folder: str | os.PathLike, suffix: str = ".npz") -> list[str]:
    """Sorted case names (file stems) of ``folder/*{suffix}``; temporary files are ignored."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: directory not found")
    return sorted(f[:-len(suffix)] for f in os.listdir(folder)
                  if f.endswith(suffix) and not f.startswith("."))
