"""Preprocessing: crop (hand-computed boxes, holes filled, -1 marker), crop/uncrop round trip with the
predictor's paste, resampling (shape formula, values against scipy), z-score statistics, class locations,
whole-case properties, clear errors, and the multi-case runner (skip/overwrite/failures/strict)."""
import importlib.util
import json
import os

import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from light_training.io import ImageGeometry, load_case, write_image
from light_training.preprocessing import (PreprocessingConfig, PreprocessingError, RawCase, bounding_box,
                                          collect_class_locations, compute_new_shape, crop_to_nonzero,
                                          dataset_summary, format_summary_table, preprocess_case,
                                          preprocess_cases, resample_data, resample_seg, zscore_normalize)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_demo_module():
    spec = importlib.util.spec_from_file_location("make_brats_demo", os.path.join(ROOT, "tools", "make_brats_demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_raw_case(folder, name="case_a", shape=(20, 24, 28), spacing_xyz=(0.9, 0.9, 1.1), seed=0):
    demo = _load_demo_module()
    images, labels = demo.make_case(np.random.default_rng(seed), shape)
    geometry = ImageGeometry(spacing_xyz, (10.0, -20.0, 5.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    case_dir = os.path.join(folder, name)
    paths = []
    for modality in ("t2w", "t2f", "t1n", "t1c"):
        paths.append(os.path.join(case_dir, f"{modality}.nii.gz"))
        write_image(images[modality], paths[-1], geometry)
    seg_path = os.path.join(case_dir, "seg.nii.gz")
    write_image(labels, seg_path, geometry)
    return RawCase(name, paths, seg_path, ["t2w", "t2f", "t1n", "t1c"]), images, labels, geometry


# ------------------------------------------------------------------------------------------------ crop

def test_bounding_box_is_half_open_and_hand_checked():
    mask = np.zeros((6, 7, 8), bool)
    mask[1, 2, 3] = mask[4, 5, 6] = True
    assert bounding_box(mask) == [[1, 5], [2, 6], [3, 7]]
    with pytest.raises(ValueError, match="empty"):
        bounding_box(np.zeros((2, 2, 2), bool))


def test_crop_uses_the_union_of_channels_fills_holes_and_marks_outside_with_minus_one():
    data = np.zeros((2, 10, 10, 10), np.float32)
    data[0, 2:8, 2:8, 2:8] = 1.0
    data[0, 4:6, 4:6, 4:6] = 0.0          # a hole inside the brain: still "inside"
    data[1, 7:9, 3:5, 3:5] = 5.0          # second channel extends the region
    seg = np.zeros((1, 10, 10, 10), np.int8)
    seg[0, 3, 3, 3] = 2
    cropped, cropped_seg, bbox = crop_to_nonzero(data, seg)
    assert bbox == [[2, 9], [2, 8], [2, 8]]
    assert cropped.shape == (2, 7, 6, 6)
    assert cropped_seg[0, 3 - 2, 3 - 2, 3 - 2] == 2
    assert cropped_seg[0, 4 - 2, 4 - 2, 4 - 2] == 0   # filled hole counts as inside
    assert cropped_seg[0, 8 - 2, 7 - 2, 7 - 2] == -1  # outside both channels
    expected_outside = ~((data[0] != 0) | (data[1] != 0))[2:9, 2:8, 2:8]
    expected_outside[2:4, 2:4, 2:4] = False  # the filled hole
    np.testing.assert_array_equal(cropped_seg[0] == -1, expected_outside)


def test_crop_then_paste_back_restores_the_original_inside_the_box():
    from light_training.prediction import paste_into_original
    rng = np.random.default_rng(0)
    data = np.zeros((1, 12, 13, 14), np.float32)
    data[0, 3:9, 2:11, 5:12] = rng.uniform(1, 2, (6, 9, 7))
    cropped, _, bbox = crop_to_nonzero(data)
    restored = paste_into_original(cropped[0], data.shape[1:], bbox, fill_value=0)
    np.testing.assert_array_equal(restored, data[0])


def test_all_zero_image_cannot_be_cropped():
    with pytest.raises(ValueError, match="zero"):
        crop_to_nonzero(np.zeros((2, 4, 4, 4), np.float32))


# -------------------------------------------------------------------------------------------- resample

def test_new_shape_is_rounded_spacing_ratio_times_shape():
    assert compute_new_shape((10, 20, 30), (2.0, 1.0, 0.5), (1.0, 1.0, 1.0)) == (20, 20, 15)
    assert compute_new_shape((7, 9, 155), (1.1, 0.9, 1.0), (1.0, 1.0, 1.0)) == (8, 8, 155)
    assert compute_new_shape((3, 3, 3), (0.1, 1, 1), (1, 1, 1)) == (1, 3, 3)


def _skimage_source_coordinates(out_shape, in_shape):
    # skimage.resize maps output voxel centres onto input voxel centres: x_in = (x_out + 0.5) * in/out - 0.5.
    axes = [(np.arange(o) + 0.5) * (i / o) - 0.5 for o, i in zip(out_shape, in_shape)]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def test_cubic_resampling_reproduces_a_linear_ramp_in_the_interior():
    z, y, x = np.meshgrid(np.arange(20), np.arange(18), np.arange(16), indexing="ij")
    ramp = (2.0 * z - 1.5 * y + 0.5 * x + 3.0).astype(np.float32)[None]
    out = resample_data(ramp, (29, 25, 11), order=3)
    coords = _skimage_source_coordinates((29, 25, 11), (20, 18, 16))
    expected = 2.0 * coords[0] - 1.5 * coords[1] + 0.5 * coords[2] + 3.0
    # Away from the border, where "edge" padding bends the spline; a half-voxel mapping error would be ~1.
    inside = (slice(3, -3),) * 3
    np.testing.assert_allclose(out[0][inside], expected[inside], atol=0.03)


def test_resampling_to_the_same_shape_changes_nothing():
    data = np.random.default_rng(0).normal(size=(2, 5, 6, 7)).astype(np.float32)
    np.testing.assert_array_equal(resample_data(data, (5, 6, 7)), data)
    seg = np.random.default_rng(0).integers(-1, 4, (1, 5, 6, 7)).astype(np.int16)
    np.testing.assert_array_equal(resample_seg(seg, (5, 6, 7)), seg)


@pytest.mark.parametrize("new_shape", [(14, 18, 9), (5, 6, 7)])
def test_label_resampling_matches_per_label_trilinear_threshold_computed_with_scipy(new_shape):
    seg = np.zeros((1, 9, 11, 13), np.int16)
    seg[0, 2:7, 3:9, 2:10] = 2
    seg[0, 3:6, 4:7, 4:8] = 3
    seg[0, 4, 5, 5] = 1
    seg[0, 0, :, :] = -1
    out = resample_seg(seg, new_shape, order=1)
    coords = _skimage_source_coordinates(new_shape, seg.shape[1:])
    expected = np.zeros(new_shape, np.int16)
    tie = np.zeros(new_shape, bool)
    for label in (-1, 1, 2, 3):
        interpolated = map_coordinates((seg[0] == label).astype(np.float64), coords, order=1, mode="nearest")
        expected[interpolated >= 0.5] = label
        tie |= np.abs(interpolated - 0.5) < 1e-6  # exactly on the threshold: rounding decides either way
    assert tie.mean() < 0.02
    np.testing.assert_array_equal(out[0][~tie], expected[~tie])
    assert set(np.unique(out)) <= {-1, 0, 1, 2, 3}


# ------------------------------------------------------------------------------------------- normalise

def test_zscore_over_the_whole_volume_gives_mean_zero_std_one_per_channel():
    data = np.random.default_rng(0).normal([[[[5.0]]], [[[-3.0]]]], [[[[2.0]]], [[[0.5]]]], (2, 6, 7, 8))
    out, stats = zscore_normalize(data.astype(np.float32))
    for channel in range(2):
        assert abs(out[channel].astype(np.float64).mean()) < 1e-5
        assert abs(out[channel].astype(np.float64).std() - 1) < 1e-5
        assert stats[channel]["mean"] == pytest.approx(data[channel].mean(), rel=1e-5)
        assert stats[channel]["std"] == pytest.approx(data[channel].std(), rel=1e-4)


def test_masked_zscore_uses_only_the_mask_and_zeroes_the_outside():
    data = np.zeros((1, 6, 6, 6), np.float32)
    data[0, 1:5, 1:5, 1:5] = np.random.default_rng(1).uniform(100, 200, (4, 4, 4))
    mask = data[0] != 0
    out, stats = zscore_normalize(data, mask)
    inside = out[0][mask].astype(np.float64)
    assert abs(inside.mean()) < 1e-5 and abs(inside.std() - 1) < 1e-5
    assert np.all(out[0][~mask] == 0)
    assert stats[0]["mean"] == pytest.approx(data[0][mask].mean(dtype=np.float64), rel=1e-6)


def test_constant_channel_is_normalised_without_nan():
    out, _ = zscore_normalize(np.full((1, 3, 3, 3), 7.0, np.float32))
    assert np.all(np.isfinite(out)) and np.all(out == 0)


# ------------------------------------------------------------------------------------------- locations

def test_class_locations_lie_inside_their_label_are_unique_capped_and_seeded():
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 3, (1, 10, 10, 10)).astype(np.int8)
    locations = collect_class_locations(seg, (1, 2, 3), max_per_class=50, seed=7)
    for label in (1, 2):
        coords = locations[label]
        assert coords.shape == (50, 3)
        assert np.all(seg[0][tuple(coords.T)] == label)
        assert len({tuple(c) for c in coords}) == 50
    assert locations[3].shape == (0, 3)
    again = collect_class_locations(seg, (1, 2, 3), max_per_class=50, seed=7)
    np.testing.assert_array_equal(again[1], locations[1])
    few = collect_class_locations(seg, (1,), max_per_class=10**6)
    assert len(few[1]) == int((seg == 1).sum())


# ------------------------------------------------------------------------------------------------ case

def test_preprocessed_case_has_documented_properties_and_consistent_arrays(tmp_path):
    case, images, labels, geometry = _write_raw_case(tmp_path)
    data, seg, props = preprocess_case(case, PreprocessingConfig())
    assert data.dtype == np.float32 and data.shape[0] == 4 and seg.shape == (1,) + data.shape[1:]
    for key in ("name", "spacing_xyz", "origin_xyz", "direction", "raw_size_xyz", "shape_before_cropping",
                "bbox_used_for_cropping", "shape_after_cropping_before_resample", "original_spacing_zyx",
                "target_spacing_zyx", "shape_after_resample", "class_locations", "intensity_statistics"):
        assert key in props, key
    assert props["shape_before_cropping"] == [20, 24, 28] and props["raw_size_xyz"] == [28, 24, 20]
    assert props["original_spacing_zyx"] == pytest.approx([1.1, 0.9, 0.9], abs=1e-6)
    assert props["origin_xyz"] == [10.0, -20.0, 5.0]
    cropped_shape = props["shape_after_cropping_before_resample"]
    assert [hi - lo for lo, hi in props["bbox_used_for_cropping"]] == cropped_shape
    # Spacing as stored in the header (float32 1.1 = 1.10000002: 15 voxels -> 16.5000004 -> 17).
    expected_shape = [int(round(n * s)) for n, s in zip(cropped_shape, props["original_spacing_zyx"])]
    assert list(data.shape[1:]) == props["shape_after_resample"] == expected_shape
    # The crop box is the brain's box (background is exactly zero in the generator).
    brain = images["t2w"] != 0
    assert props["bbox_used_for_cropping"] == bounding_box(brain)
    # Channel order t2w, t2f, t1n, t1c; raw statistics of t2w inside the brain.
    assert props["intensity_statistics"]["t2w"]["mean"] == pytest.approx(images["t2w"][brain].mean(), rel=1e-6)
    # Whole-volume z-score before resampling: after cubic resampling stats stay close to 0 / 1.
    assert abs(float(data[0].mean())) < 0.1 and abs(float(data[0].std()) - 1) < 0.1
    assert set(np.unique(seg)) <= {-1, 0, 1, 2, 3} and (seg == -1).any()
    for label, coords in props["class_locations"].items():
        coords = np.asarray(coords).reshape(-1, 3)
        assert np.all(seg[0][tuple(coords.T)] == int(label))
    assert props["label_voxel_counts"]["2"] == int((seg == 2).sum()) > 0


def test_isotropic_case_keeps_its_cropped_shape(tmp_path):
    case, *_ = _write_raw_case(tmp_path, spacing_xyz=(1.0, 1.0, 1.0))
    data, seg, props = preprocess_case(case)
    assert props["shape_after_resample"] == props["shape_after_cropping_before_resample"]


def test_mask_normalisation_option_is_recorded_and_zeroes_the_background(tmp_path):
    case, *_ = _write_raw_case(tmp_path, spacing_xyz=(1.0, 1.0, 1.0))
    data, seg, props = preprocess_case(case, PreprocessingConfig(normalize_with_mask=True))
    assert props["normalization"]["use_mask"] is True
    assert np.all(data[:, seg[0] == -1] == 0)


def test_seg_with_a_shape_different_from_the_images_is_refused_naming_the_file(tmp_path):
    case, images, labels, geometry = _write_raw_case(tmp_path)
    write_image(labels[:-1], case.seg_path, geometry)
    with pytest.raises(ValueError, match=r"seg.nii.gz: segmentation shape"):
        preprocess_case(case)


def test_seg_with_a_different_spacing_is_refused(tmp_path):
    case, images, labels, geometry = _write_raw_case(tmp_path)
    write_image(labels, case.seg_path, ImageGeometry((1, 1, 1), geometry.origin_xyz, geometry.direction))
    with pytest.raises(ValueError, match=r"seg.nii.gz: segmentation geometry differs.*spacing"):
        preprocess_case(case)


def test_label_4_is_refused_with_a_hint_about_old_brats_labels(tmp_path):
    case, images, labels, geometry = _write_raw_case(tmp_path)
    write_image(np.where(labels == 3, 4, labels).astype(np.uint8), case.seg_path, geometry)
    with pytest.raises(ValueError, match=r"seg.nii.gz: unexpected label values \[4\].*BraTS 2021"):
        preprocess_case(case)


def test_binarize_option_turns_255_masks_into_label_1(tmp_path):
    case, images, labels, geometry = _write_raw_case(tmp_path)
    write_image(np.where(labels > 0, 255, 0).astype(np.uint8), case.seg_path, geometry)
    _, seg, props = preprocess_case(case, PreprocessingConfig(labels=(1,), binarize_seg=True))
    assert set(np.unique(seg)) <= {-1, 0, 1} and props["label_voxel_counts"]["1"] > 0


def test_nan_voxels_and_all_zero_images_are_refused_naming_the_file(tmp_path):
    case, images, labels, geometry = _write_raw_case(tmp_path)
    bad = images["t2f"].astype(np.float32)
    bad[5, 5, 5] = np.nan
    write_image(bad, case.image_paths[1], geometry)
    with pytest.raises(ValueError, match=r"t2f.nii.gz: image contains .*NaN"):
        preprocess_case(case)
    for path in case.image_paths:
        write_image(np.zeros_like(images["t2w"]), path, geometry)
    with pytest.raises(ValueError, match=r"all channels of case case_a are zero"):
        preprocess_case(case)


# ---------------------------------------------------------------------------------------------- runner

def test_runner_writes_cases_skips_finished_ones_and_lists_failures(tmp_path):
    good, *_ = _write_raw_case(tmp_path / "raw", "good", shape=(16, 20, 20))
    broken, *_ = _write_raw_case(tmp_path / "raw", "broken", shape=(16, 20, 20))
    os.remove(broken.image_paths[2])
    out = tmp_path / "out"
    report = preprocess_cases([good, broken], out, num_workers=1, progress=False)
    assert report.done == ["good"] and report.skipped == []
    assert list(report.failed) == ["broken"] and "t1n.nii.gz" in report.failed["broken"]
    data, seg, props = load_case(out / "good.npz")
    assert props["channel_names"] == ["t2w", "t2f", "t1n", "t1c"]
    stamp = os.path.getmtime(out / "good.npz")
    (out / ".tmp-deadbeef-left.npz").write_bytes(b"half")  # leftover of a killed run
    again = preprocess_cases([good], out, num_workers=1, progress=False)
    assert again.skipped == ["good"] and again.done == []
    assert os.path.getmtime(out / "good.npz") == stamp
    assert not (out / ".tmp-deadbeef-left.npz").exists()
    assert preprocess_cases([good], out, overwrite=True, progress=False).done == ["good"]
    summary = dataset_summary(out, ["good"], report.failed)
    assert summary["n_cases"] == 1 and summary["failed"] == report.failed
    assert json.loads(json.dumps(summary)) is not None
    assert "t2w" in format_summary_table(summary)


def test_case_missing_its_json_is_redone(tmp_path):
    good, *_ = _write_raw_case(tmp_path / "raw", "good", shape=(16, 20, 20))
    out = tmp_path / "out"
    preprocess_cases([good], out, progress=False)
    os.remove(out / "good.json")  # as if killed between the two writes
    assert preprocess_cases([good], out, progress=False).done == ["good"]


def test_strict_runner_stops_at_the_first_failure(tmp_path):
    broken, *_ = _write_raw_case(tmp_path / "raw", "broken", shape=(16, 20, 20))
    os.remove(broken.seg_path)
    with pytest.raises(PreprocessingError, match="case broken failed.*seg.nii.gz"):
        preprocess_cases([broken], tmp_path / "out", strict=True, progress=False)


def test_runner_refuses_duplicate_or_unsafe_case_names(tmp_path):
    case, *_ = _write_raw_case(tmp_path / "raw", "dup", shape=(16, 20, 20))
    with pytest.raises(ValueError, match="more than once"):
        preprocess_cases([case, case], tmp_path / "out", progress=False)
    unsafe = RawCase("../escape", case.image_paths, case.seg_path)
    with pytest.raises(ValueError, match="invalid case name"):
        preprocess_cases([unsafe], tmp_path / "out", progress=False)
