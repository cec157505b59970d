"""abus_preprocessing.py on tiny generated raw datasets: lesion-only cases, seeded split from the ratio flags,
split_info, per-case properties, faults (duplicate ids, missing / broken masks), re-runs and spacing checks."""
import json
import os
import shutil

import numpy as np
import pytest

import abus_preprocessing
from light_training.io import ImageGeometry, load_case, read_image, write_image
from tools.make_abus_demo import generate

SHAPE = (16, 24, 24)


def make_raw(root, num_cases=8, without=2, spacing=(0.5, 0.5, 0.5)):
    generate(str(root), num_cases=num_cases, num_without_lesion=without, shape_zyx=SHAPE, spacing_xyz=spacing,
             seed=5, progress=False)
    return root


def run(raw, out, *extra):
    return abus_preprocessing.main(["--abus_root", str(raw), "--output_base", str(out), "--num_processes", "1",
                                    "--no_progress", *extra])


def test_lesion_free_cases_are_skipped_and_the_split_follows_the_ratio_flags(tmp_path):
    raw = make_raw(tmp_path / "raw", num_cases=10, without=2)
    out = tmp_path / "out"
    assert run(raw, out, "--train_ratio", "0.5", "--val_ratio", "0.25", "--seed", "3") == 0
    info = json.loads((out / "split_info.json").read_text())
    assert len(info["skipped_without_lesion"]) == 2
    assert (len(info["train"]), len(info["val"]), len(info["test"])) == (4, 2, 2)
    assert info["ratios"] == {"train": 0.5, "val": 0.25, "test": 0.25} and info["seed"] == 3
    names = info["train"] + info["val"] + info["test"]
    assert len(set(names)) == 8 and not set(names) & set(info["skipped_without_lesion"])
    for split in ("train", "val", "test"):
        assert sorted(f[:-4] for f in os.listdir(out / split) if f.endswith(".npz")) == sorted(info[split])
    text = (out / "split_info.txt").read_text()
    assert "train: 4 cases (50.0%)" in text and info["skipped_without_lesion"][0] in text
    # the same seed gives the same split
    assert run(raw, tmp_path / "again", "--train_ratio", "0.5", "--val_ratio", "0.25", "--seed", "3") == 0
    again = json.loads((tmp_path / "again" / "split_info.json").read_text())
    assert [again[s] for s in ("train", "val", "test")] == [info[s] for s in ("train", "val", "test")]


def test_preprocessed_case_is_cropped_zscored_on_the_scan_region_with_binary_labels(tmp_path):
    raw = make_raw(tmp_path / "raw", num_cases=3, without=0)
    out = tmp_path / "out"
    assert run(raw, out, "--train_ratio", "0.34", "--val_ratio", "0.33") == 0
    info = json.loads((out / "split_info.json").read_text())
    name = info["train"][0]
    entry = info["cases"][name]
    data, seg, props = load_case(str(out / "train" / f"{name}.npz"))
    image, geometry = read_image(str(raw / entry["image"]))
    mask, _ = read_image(str(raw / entry["mask"]))
    bbox = props["bbox_used_for_cropping"]
    assert props["shape_before_cropping"] == list(image.shape)
    cropped = image[bbox[0][0]:bbox[0][1], bbox[1][0]:bbox[1][1], bbox[2][0]:bbox[2][1]].astype(np.float64)
    region = seg[0] >= 0
    expected = (cropped - cropped[region].mean()) / cropped[region].std()
    np.testing.assert_allclose(data[0][region], expected[region], rtol=1e-4, atol=1e-4)
    assert set(np.unique(seg).tolist()) <= {-1, 0, 1}
    cropped_mask = mask[bbox[0][0]:bbox[0][1], bbox[1][0]:bbox[1][1], bbox[2][0]:bbox[2][1]]
    assert np.array_equal(seg[0] == 1, cropped_mask > 0)  # masks stored as 255 become label 1
    assert props["spacing_xyz"] == list(geometry.spacing_xyz) and props["origin_xyz"] == list(geometry.origin_xyz)


def test_duplicate_case_id_in_two_folders_is_left_out_with_both_files_named_and_strict_stops(tmp_path, capsys):
    raw = make_raw(tmp_path / "raw", num_cases=6, without=0)
    source = raw / "data" / "Train" / "DATA" / "DATA_000.nrrd"
    shutil.copy(source, raw / "data" / "Test" / "DATA" / "DATA_000.nrrd")
    assert run(raw, tmp_path / "out") == 3
    err = capsys.readouterr().err
    assert "'000'" in err and os.path.join("Train", "DATA", "DATA_000.nrrd") in err
    assert os.path.join("Test", "DATA", "DATA_000.nrrd") in err
    info = json.loads((tmp_path / "out" / "split_info.json").read_text())
    assert "ABUS_000" in info["failed"] and "ABUS_000" not in info["cases"] and len(info["cases"]) == 5
    assert run(raw, tmp_path / "strict", "--strict") == 1
    assert not (tmp_path / "strict").exists()  # stopped before writing anything


def test_missing_and_unreadable_masks_are_listed_and_the_rest_is_preprocessed(tmp_path, capsys):
    raw = make_raw(tmp_path / "raw", num_cases=8, without=0)
    os.remove(raw / "data" / "Train" / "MASK" / "MASK_001.nrrd")
    (raw / "data" / "Train" / "MASK" / "MASK_002.nrrd").write_bytes(b"this is not an image")
    out = tmp_path / "out"
    assert run(raw, out) == 3
    err = capsys.readouterr().err
    assert "ABUS_001: no mask file" in err and "MASK_002.nrrd" in err
    info = json.loads((out / "split_info.json").read_text())
    assert info["skipped_missing_mask"] == ["ABUS_001"] and "ABUS_002" in info["failed"]
    assert len(info["cases"]) == 6


def test_rerun_with_another_seed_moves_cases_and_leaves_no_case_in_two_splits(tmp_path):
    raw = make_raw(tmp_path / "raw", num_cases=8, without=0)
    out = tmp_path / "out"
    assert run(raw, out, "--seed", "1") == 0
    assert run(raw, out, "--seed", "2") == 0
    info = json.loads((out / "split_info.json").read_text())
    on_disk = {split: sorted(f[:-4] for f in os.listdir(out / split) if f.endswith(".npz"))
               for split in ("train", "val", "test")}
    assert on_disk == {split: sorted(info[split]) for split in ("train", "val", "test")}


def test_anisotropic_spacing_is_reported_and_target_spacing_resamples(tmp_path, capsys):
    raw = make_raw(tmp_path / "raw", num_cases=4, without=0, spacing=(0.5, 0.5, 1.0))
    assert run(raw, tmp_path / "native", "--train_ratio", "0.5", "--val_ratio", "0.25") == 0
    assert "anisotropic" in capsys.readouterr().err
    out = tmp_path / "resampled"
    assert run(raw, out, "--train_ratio", "0.5", "--val_ratio", "0.25", "--target_spacing", "0.5", "0.5", "0.5") == 0
    info = json.loads((out / "split_info.json").read_text())
    name = info["train"][0]
    _, _, props = load_case(str(out / "train" / f"{name}.npz"))
    cropped_z = props["shape_after_cropping_before_resample"][0]
    assert props["shape_after_resample"][0] == 2 * cropped_z  # z spacing 1.0 mm -> 0.5 mm
    assert props["target_spacing_zyx"] == [0.5, 0.5, 0.5]


def test_demo_generator_writes_the_raw_layout_with_hypoechoic_lesions_and_lesion_free_cases(tmp_path):
    make_raw(tmp_path / "raw", num_cases=5, without=2, spacing=(0.6, 0.6, 0.6))
    images = sorted((tmp_path / "raw" / "data").glob("*/DATA/DATA_*.nrrd"), key=lambda p: p.name)
    assert [p.name for p in images] == [f"DATA_{i:03d}.nrrd" for i in range(5)]
    lesion_free = 0
    for path in images:
        image, geometry = read_image(str(path))
        mask, mask_geometry = read_image(str(path).replace("DATA", "MASK"))
        assert image.dtype == np.uint8 and image.shape == SHAPE and mask.shape == SHAPE
        assert geometry.spacing_xyz == pytest.approx((0.6, 0.6, 0.6)) and not geometry.differences(mask_geometry)
        assert set(np.unique(mask).tolist()) <= {0, 255}
        assert (image == 0).any() and (image > 0).mean() > 0.5  # an unscanned zero border around the scan
        if not mask.any():
            lesion_free += 1
            continue
        tissue = (mask == 0) & (image > 0)
        assert image[mask > 0].mean() < 0.5 * image[tissue].mean()  # lesions are hypo-echoic
    assert lesion_free == 2
