"""Image and case I/O: geometry survives a write/read round trip (checked with an independent reader),
bad files give errors naming the file, writes are atomic, cases round-trip without pickle."""
import json
import os
import zipfile

import nibabel
import numpy as np
import pytest

from light_training.io import (ImageGeometry, ImageReadError, case_paths, image_geometry, is_case_complete,
                               load_case, read_image, read_images_as_channels, sanitize_case_name, save_case,
                               write_image)
from light_training.utils.files import atomic_path, load_json, save_json_atomic

GEOMETRY = ImageGeometry(spacing_xyz=(0.8, 0.9, 1.5), origin_xyz=(-12.5, 30.25, 4.0),
                         direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))


def _random_volume(shape=(5, 6, 7), dtype=np.float32):
    return (np.random.default_rng(1).normal(size=shape) * 100).astype(dtype)


@pytest.mark.parametrize("extension", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_write_then_read_keeps_values_spacing_origin_direction(tmp_path, extension):
    volume = _random_volume()
    path = tmp_path / f"image{extension}"
    write_image(volume, path, GEOMETRY)
    back, geometry = read_image(path)
    assert back.shape == (5, 6, 7)
    np.testing.assert_array_equal(back, volume)
    assert geometry.differences(GEOMETRY, spacing_tol=1e-6, origin_tol=1e-6, direction_tol=1e-9) == []


def test_written_nifti_has_the_voxel_to_world_mapping_seen_by_nibabel(tmp_path):
    # Independent reader: nibabel's RAS affine must equal SimpleITK's LPS geometry flipped in x and y.
    path = tmp_path / "image.nii.gz"
    write_image(_random_volume(), path, GEOMETRY)
    affine = nibabel.load(str(path)).affine
    direction = np.array(GEOMETRY.direction).reshape(3, 3)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    expected_linear = lps_to_ras @ direction @ np.diag(GEOMETRY.spacing_xyz)
    np.testing.assert_allclose(affine[:3, :3], expected_linear, atol=1e-5)
    np.testing.assert_allclose(affine[:3, 3], lps_to_ras @ np.array(GEOMETRY.origin_xyz), atol=1e-5)
    # nibabel indexes (x, y, z); our arrays are (z, y, x).
    assert nibabel.load(str(path)).shape == (7, 6, 5)


def test_image_geometry_dict_round_trip_and_zyx_spacing():
    assert ImageGeometry.from_dict(GEOMETRY.to_dict()) == GEOMETRY
    assert json.loads(json.dumps(GEOMETRY.to_dict())) == GEOMETRY.to_dict()
    assert GEOMETRY.spacing_zyx == (1.5, 0.9, 0.8)


def test_header_only_read_reports_size_in_zyx(tmp_path):
    path = tmp_path / "image.nrrd"
    write_image(_random_volume((3, 4, 5)), path, GEOMETRY)
    size_zyx, geometry = image_geometry(path)
    assert size_zyx == (3, 4, 5)
    assert geometry.differences(GEOMETRY) == []


def test_boolean_and_int64_arrays_are_written_as_readable_integer_images(tmp_path):
    mask = np.zeros((3, 4, 5), bool)
    mask[1, 2, 3] = True
    write_image(mask, tmp_path / "mask.nii.gz")
    back, _ = read_image(tmp_path / "mask.nii.gz")
    assert back.dtype == np.uint8 and back[1, 2, 3] == 1 and back.sum() == 1
    write_image(np.full((2, 2, 2), 3, np.int64), tmp_path / "labels.nii.gz")
    assert read_image(tmp_path / "labels.nii.gz")[0].dtype == np.int32


def test_missing_file_error_names_the_file(tmp_path):
    path = tmp_path / "missing_t1c.nii.gz"
    with pytest.raises(FileNotFoundError, match="missing_t1c.nii.gz"):
        read_image(path)


@pytest.mark.parametrize("extension", [".nii.gz", ".nii", ".nrrd"])
def test_truncated_file_is_reported_not_silently_zero_filled(tmp_path, extension):
    good = tmp_path / f"good{extension}"
    write_image(_random_volume((8, 8, 8)), good, GEOMETRY)
    content = good.read_bytes()
    bad = tmp_path / f"bad{extension}"
    bad.write_bytes(content[: len(content) - max(200, len(content) // 3)])
    with pytest.raises(ImageReadError, match="bad"):
        read_image(bad)


def test_non_image_content_and_empty_file_are_reported(tmp_path):
    junk = tmp_path / "notes.nii.gz"
    junk.write_text("this is not an image")
    with pytest.raises(ImageReadError, match="notes.nii.gz"):
        read_image(junk)
    empty = tmp_path / "empty.nrrd"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty.nrrd.*empty"):
        read_image(empty)


def test_nan_voxels_in_a_nifti_are_reported_instead_of_read_as_zero(tmp_path):
    volume = np.ones((4, 4, 4), np.float32)
    volume[1, 2, 3] = np.nan
    path = tmp_path / "with_nan.nii.gz"
    nibabel.save(nibabel.Nifti1Image(volume.T, np.eye(4)), str(path))  # written by an independent writer
    with pytest.raises(ImageReadError, match="with_nan.nii.gz: image contains 1 NaN"):
        read_image(path)


def test_2d_4d_and_vector_images_are_refused_with_their_dimensionality(tmp_path):
    import SimpleITK as sitk
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5), np.float32)), str(tmp_path / "flat.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.float32), isVector=False),
                    str(tmp_path / "fourd.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.float32), isVector=True),
                    str(tmp_path / "vector.nii.gz"))
    with pytest.raises(ImageReadError, match="flat.nii.gz: expected a 3D image, got 2D"):
        read_image(tmp_path / "flat.nii.gz")
    with pytest.raises(ImageReadError, match="fourd.nii.gz: expected a 3D image, got 4D"):
        read_image(tmp_path / "fourd.nii.gz")
    with pytest.raises(ImageReadError, match="vector.nii.gz: expected a scalar image.*3 components"):
        read_image(tmp_path / "vector.nii.gz")


def test_channels_with_different_shape_or_spacing_are_refused(tmp_path):
    write_image(_random_volume((4, 4, 4)), tmp_path / "a.nii.gz", GEOMETRY)
    write_image(_random_volume((4, 4, 5)), tmp_path / "b.nii.gz", GEOMETRY)
    other = ImageGeometry((1.0, 1.0, 1.0), GEOMETRY.origin_xyz, GEOMETRY.direction)
    write_image(_random_volume((4, 4, 4)), tmp_path / "c.nii.gz", other)
    with pytest.raises(ImageReadError, match="b.nii.gz: shape"):
        read_images_as_channels([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"])
    with pytest.raises(ImageReadError, match="c.nii.gz: geometry differs.*spacing"):
        read_images_as_channels([tmp_path / "a.nii.gz", tmp_path / "c.nii.gz"])
    stacked, geometry = read_images_as_channels([tmp_path / "a.nii.gz", tmp_path / "a.nii.gz"])
    assert stacked.shape == (2, 4, 4, 4) and stacked.dtype == np.float32


def test_write_image_refuses_non_3d_arrays_and_unknown_extensions(tmp_path):
    with pytest.raises(ValueError, match="3D"):
        write_image(np.zeros((1, 2, 3, 4)), tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match="extension"):
        write_image(np.zeros((2, 3, 4)), tmp_path / "x.png")


def test_atomic_path_leaves_old_file_and_no_temporary_when_the_writer_fails(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as handle:
                handle.write("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["result.json"]


def test_atomic_path_replaces_the_file_and_keeps_the_extension_for_format_detection(tmp_path):
    target = tmp_path / "sub" / "result.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp.endswith("result.nii.gz") and os.path.dirname(tmp) == str(target.parent)
        with open(tmp, "w") as handle:
            handle.write("new")
    assert target.read_text() == "new"
    assert os.listdir(target.parent) == ["result.nii.gz"]


def test_json_written_atomically_is_strict_json_with_nan_as_null(tmp_path):
    path = tmp_path / "summary.json"
    save_json_atomic({"a": np.float32(1.5), "b": np.array([1, 2]), "c": float("nan"), "d": (np.int64(3),),
                      "nested": {"rows": [[1, 2, 3], [4, 5, 6]]}}, path)
    text = path.read_text()
    assert json.loads(text) == {"a": 1.5, "b": [1, 2], "c": None, "d": [3], "nested": {"rows": [[1, 2, 3], [4, 5, 6]]}}
    assert "NaN" not in text
    assert load_json(path)["a"] == 1.5
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json"):
        load_json(tmp_path / "broken.json")


@pytest.mark.parametrize("name", ["../escape", "a/b", "a\\b", ".hidden", "", "-flag", "x..y", "sp ace"])
def test_unsafe_case_names_are_refused(name, tmp_path):
    with pytest.raises(ValueError, match="invalid case name"):
        sanitize_case_name(name)
    with pytest.raises(ValueError, match="invalid case name"):
        save_case(tmp_path, name, np.zeros((1, 2, 2, 2)), None, {})


def test_brats_and_abus_names_are_accepted():
    assert sanitize_case_name("BraTS-GLI-00000-000") == "BraTS-GLI-00000-000"
    assert sanitize_case_name("ABUS_130") == "ABUS_130"


def test_case_round_trip_keeps_arrays_dtypes_and_properties(tmp_path):
    data = _random_volume((4, 3, 5, 6))
    seg = np.zeros((1, 3, 5, 6), np.int64)
    seg[0, 1, 2, 3], seg[0, 0, 0, 0] = 3, -1
    props = {"spacing_xyz": [1.0, 1.0, 1.0], "class_locations": {"3": np.array([[1, 2, 3]])}}
    npz_path, json_path = save_case(tmp_path, "case_1", data, seg, props)
    assert (npz_path, json_path) == case_paths(tmp_path, "case_1") and is_case_complete(tmp_path, "case_1")
    with np.load(npz_path, allow_pickle=False) as archive:  # plain arrays, readable without pickle
        assert sorted(archive.files) == ["data", "seg"]
        assert archive["seg"].dtype == np.int8
    loaded_data, loaded_seg, loaded_props = load_case(npz_path)
    np.testing.assert_array_equal(loaded_data, data)
    np.testing.assert_array_equal(loaded_seg, seg)
    assert loaded_data.dtype == np.float32
    assert loaded_props["name"] == "case_1"
    assert loaded_props["class_locations"] == {"3": [[1, 2, 3]]}
    assert json.loads(open(json_path).read()) == loaded_props


def test_large_label_values_are_stored_without_overflow(tmp_path):
    seg = np.full((1, 2, 2, 2), 300, np.int32)
    npz_path, _ = save_case(tmp_path, "big", np.zeros((1, 2, 2, 2)), seg, {})
    assert load_case(npz_path)[1].max() == 300


def test_overwriting_a_case_removes_the_old_properties_before_writing_new_arrays(tmp_path, monkeypatch):
    save_case(tmp_path, "c", np.ones((1, 2, 2, 2)), None, {"version": 1})
    # Simulate a crash right after the new .npz is in place: the old JSON must not survive next to it.
    real_savez = np.savez_compressed

    def savez_then_crash(path, **arrays):
        real_savez(path, **arrays)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(np, "savez_compressed", savez_then_crash)
    with pytest.raises(KeyboardInterrupt):
        save_case(tmp_path, "c", np.zeros((1, 2, 2, 2)), None, {"version": 2})
    assert not is_case_complete(tmp_path, "c")
    assert sorted(os.listdir(tmp_path)) == ["c.npz"]  # old arrays kept (atomic), no temporary left


def test_unlabelled_case_loads_with_seg_none(tmp_path):
    npz_path, _ = save_case(tmp_path, "unlabelled", np.ones((2, 2, 3, 4)), None, {})
    data, seg, props = load_case(npz_path)
    assert seg is None and data.shape == (2, 2, 3, 4) and props["name"] == "unlabelled"


def test_save_case_rejects_mismatched_seg_shape(tmp_path):
    with pytest.raises(ValueError, match="case x: seg must be"):
        save_case(tmp_path, "x", np.zeros((2, 3, 4, 5)), np.zeros((1, 3, 4, 4), np.int8), {})


def test_corrupt_or_incomplete_case_files_give_errors_naming_the_file(tmp_path):
    npz_path, json_path = save_case(tmp_path, "c", np.ones((1, 4, 4, 4)), np.zeros((1, 4, 4, 4)), {})
    content = open(npz_path, "rb").read()
    with open(npz_path, "wb") as handle:
        handle.write(content[: len(content) // 2])
    with pytest.raises(ValueError, match="c.npz.*corrupt"):
        load_case(npz_path)
    os.remove(json_path)
    assert not is_case_complete(tmp_path, "c")
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_case(tmp_path / "nope.npz")


def test_case_files_with_pickled_objects_are_not_loaded(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, data=np.array([{"a": 1}], dtype=object))
    (tmp_path / "evil.json").write_text("{}")
    with pytest.raises(ValueError):
        load_case(path)
    assert zipfile.is_zipfile(path)
