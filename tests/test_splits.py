"""Splits: deterministic, independent of input order, disjoint, covering, stored once and re-used."""
import json
import random

import pytest

from light_training.splits import (case_names_in_dir, load_or_create_splits, load_splits, make_splits,
                                   split_sizes)

NAMES = [f"BraTS-GLI-{i:05d}-000" for i in range(40)]


def test_same_names_and_seed_give_the_same_split():
    assert make_splits(NAMES, seed=42) == make_splits(list(NAMES), seed=42)


def test_split_does_not_depend_on_input_order():
    shuffled = list(NAMES)
    random.Random(7).shuffle(shuffled)
    assert make_splits(shuffled) == make_splits(NAMES)


def test_split_is_disjoint_and_covers_every_case():
    splits = make_splits(NAMES)
    all_listed = splits["train"] + splits["val"] + splits["test"]
    assert sorted(all_listed) == sorted(NAMES)
    assert len(set(all_listed)) == len(NAMES)


def test_split_sizes_follow_the_70_10_20_ratios():
    assert split_sizes(40) == (28, 4, 8)
    # BraTS 2023 GLI training data: the test set has 250 cases, as in the reference, and no case is dropped.
    assert split_sizes(1251) == (876, 125, 250)
    # The 8-case demo still gets a validation and a test case.
    assert split_sizes(8) == (5, 1, 2)
    splits = make_splits(NAMES)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [28, 4, 8]


def test_another_seed_gives_another_split():
    assert make_splits(NAMES, seed=1)["test"] != make_splits(NAMES, seed=42)["test"]


def test_duplicate_case_names_are_refused():
    with pytest.raises(ValueError, match="more than once.*BraTS-GLI-00001-000"):
        make_splits(NAMES + [NAMES[1]])


def test_too_few_cases_for_a_training_set_are_refused():
    with pytest.raises(ValueError, match="too few"):
        make_splits(["a", "b"], ratios=(0.2, 0.4, 0.4))


def test_splits_file_is_created_once_and_reused_by_later_stages(tmp_path):
    path = tmp_path / "splits.json"
    first = load_or_create_splits(path, NAMES)
    stored = json.loads(path.read_text())
    assert stored["seed"] == 42 and stored["ratios"] == [0.7, 0.1, 0.2] and stored["n_cases"] == 40
    # A later stage with a different seed still gets the stored split: the file wins.
    assert load_or_create_splits(path, NAMES, seed=123) == first
    assert load_splits(path) == first


def test_missing_splits_file_is_an_error_when_creation_is_not_allowed(tmp_path):
    with pytest.raises(FileNotFoundError, match="splits.json"):
        load_or_create_splits(tmp_path / "splits.json", NAMES, create=False)


def test_splits_file_listing_unknown_cases_is_refused_with_their_names(tmp_path):
    path = tmp_path / "splits.json"
    load_or_create_splits(path, NAMES)
    fewer = [n for n in NAMES if n != "BraTS-GLI-00003-000"]
    with pytest.raises(ValueError, match=r"splits.json.*BraTS-GLI-00003-000"):
        load_or_create_splits(path, fewer)


def test_new_cases_not_in_the_file_are_left_out_with_a_warning(tmp_path, caplog):
    path = tmp_path / "splits.json"
    first = load_or_create_splits(path, NAMES)
    assert load_or_create_splits(path, NAMES + ["new_case"]) == first
    assert "new_case" in caplog.text


def test_overlapping_splits_file_is_refused(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": ["a", "b"], "val": ["b"], "test": []}))
    with pytest.raises(ValueError, match="both 'train' and 'val'.*'b'"):
        load_splits(path)


def test_case_names_in_dir_are_sorted_stems_without_temporary_files(tmp_path):
    for name in ["b.npz", "a.npz", "a.json", ".tmp-123-c.npz"]:
        (tmp_path / name).write_text("")
    assert case_names_in_dir(tmp_path) == ["a", "b"]
