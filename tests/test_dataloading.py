"""Patch loading: geometry of patch placement and padding (hand-computed), foreground oversampling,
batch format, reproducibility independent of worker count, resume, and nothing written to the data folder."""
import os
import zlib

import numpy as np
import pytest
import torch

from light_training.dataloading import (CaseDataset, PatchBatchStream, choose_patch_start, crop_with_padding,
                                        is_forced_foreground, list_case_files, make_patch_loader,
                                        patch_start_bounds, sample_patch)
from light_training.io import save_case


def _write_case(folder, name, shape=(12, 14, 16), channels=2, fg_voxels=((3, 4, 5),), label=1):
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # stable across runs (str hash is salted)
    data = rng.normal(size=(channels, *shape)).astype(np.float32)
    seg = np.zeros((1, *shape), np.int8)
    for voxel in fg_voxels:
        seg[(0, *voxel)] = label
    locations = {str(label): np.argwhere(seg[0] == label)} if fg_voxels else {}
    save_case(folder, name, data, seg, {"class_locations": locations})
    return data, seg


def test_start_bounds_match_hand_computed_values():
    # Axis 20 vs patch 8: anywhere from 0 to 12. Axis 10 vs patch 16: 6 missing -> start fixed at -3.
    # Axis 10 vs patch 15: 5 missing -> start fixed at -2 (one more voxel of padding at the end).
    assert patch_start_bounds((20, 10, 10), (8, 16, 15)) == ([0, -3, -2], [12, -3, -2])


def test_crop_with_padding_equals_numpy_pad_then_slice():
    array = np.arange(2 * 5 * 6 * 7, dtype=np.float32).reshape(2, 5, 6, 7)
    start, patch = (-2, 3, 4), (6, 4, 5)
    padded = np.pad(array, ((0, 0), (2, 3), (0, 1), (0, 2)), constant_values=-9)
    expected = padded[:, 0:6, 3:7, 4:9]
    np.testing.assert_array_equal(crop_with_padding(array, start, patch, -9), expected)


def test_crop_entirely_outside_is_all_padding():
    array = np.ones((1, 4, 4, 4), np.float32)
    assert np.all(crop_with_padding(array, (10, 0, 0), (2, 2, 2), 0.0) == 0)


def test_forced_foreground_patch_contains_the_stored_voxel_for_every_draw():
    data = np.zeros((1, 40, 40, 40), np.float32)
    seg = np.zeros((1, 40, 40, 40), np.int8)
    rng = np.random.default_rng(0)
    for voxel in [(0, 0, 0), (39, 39, 39), (20, 1, 38), (5, 30, 12)]:
        seg[:] = 0
        seg[(0, *voxel)] = 2
        for _ in range(20):
            _, seg_patch, start = sample_patch(data, seg, (16, 16, 16), rng, {2: np.array([voxel])}, True)
            assert seg_patch.max() == 2, (voxel, start)
            lower, upper = patch_start_bounds((40, 40, 40), (16, 16, 16))
            assert all(lo <= s <= hi for s, lo, hi in zip(start, lower, upper))


def test_random_patch_without_forcing_often_misses_a_single_voxel():
    data = np.zeros((1, 40, 40, 40), np.float32)
    seg = np.zeros((1, 40, 40, 40), np.int8)
    seg[0, 20, 20, 20] = 1
    rng = np.random.default_rng(0)
    hits = [sample_patch(data, seg, (8, 8, 8), rng, {1: np.array([[20, 20, 20]])}, False)[1].max() == 1
            for _ in range(200)]
    # Probability of covering the voxel is (8/33)^3 ~ 1.4 %.
    assert sum(hits) < 20


def test_forced_patch_draws_from_every_label_with_locations():
    data = np.zeros((1, 30, 30, 30), np.float32)
    seg = np.zeros((1, 30, 30, 30), np.int8)
    seg[0, 2, 2, 2], seg[0, 27, 27, 27] = 1, 3
    locations = {1: np.array([[2, 2, 2]]), 3: np.array([[27, 27, 27]])}
    rng = np.random.default_rng(1)
    seen = {int(sample_patch(data, seg, (6, 6, 6), rng, locations, True)[1].max()) for _ in range(40)}
    assert seen == {1, 3}


def test_oversampling_rule_forces_the_last_samples_of_a_batch():
    # Batch 2 with p=0.33 (the BraTS default): sample 0 random, sample 1 forced; p=1 forces all.
    assert [is_forced_foreground(j, 2, 0.33) for j in range(2)] == [False, True]
    assert [is_forced_foreground(j, 3, 0.33) for j in range(3)] == [False, False, True]
    assert all(is_forced_foreground(j, 4, 1.0) for j in range(4))
    assert not any(is_forced_foreground(j, 4, 0.0) for j in range(4))


def test_batch_has_documented_keys_shapes_and_dtypes_and_forced_samples_hold_foreground(tmp_path):
    for i in range(3):
        _write_case(tmp_path, f"case{i}", fg_voxels=[(1 + i, 12, 14)], label=i + 1)
    dataset = CaseDataset.from_folder(tmp_path)
    loader = make_patch_loader(dataset, (8, 8, 8), 2, num_batches=10, seed=5)
    batches = list(loader)
    assert len(batches) == 10
    for batch in batches:
        assert set(batch) == {"data", "seg", "keys"}
        assert batch["data"].shape == (2, 2, 8, 8, 8) and batch["data"].dtype == torch.float32
        assert batch["seg"].shape == (2, 1, 8, 8, 8) and batch["seg"].dtype == torch.int64
        assert batch["seg"].min() >= 0
        assert batch["seg"][1].max() > 0  # sample 1 is the forced one
        assert all(k in dataset.keys for k in batch["keys"])


def test_case_smaller_than_patch_is_centred_with_zero_data_and_background_labels(tmp_path):
    data, seg = _write_case(tmp_path, "small", shape=(4, 6, 8), channels=1, fg_voxels=[(1, 2, 3)])
    dataset = CaseDataset.from_folder(tmp_path)
    batch = PatchBatchStream(dataset, (8, 8, 8), 1, oversample_foreground=0.0).make_batch(0)
    patch = batch["data"][0, 0].numpy()
    # Missing (4, 2, 0) voxels: starts at (-2, -1, 0), so the case sits at [2:6, 1:7, 0:8].
    np.testing.assert_array_equal(patch[2:6, 1:7, :], data[0])
    assert np.all(patch[:2] == 0) and np.all(patch[6:] == 0) and np.all(patch[:, 0] == 0)
    labels = batch["seg"][0, 0].numpy()
    assert labels[3, 3, 3] == 1 and labels.sum() == 1  # padding (-1) became background


def test_labels_reach_the_transform_with_minus_one_and_leave_it_as_zero(tmp_path):
    _write_case(tmp_path, "pad", shape=(4, 4, 4), channels=1, fg_voxels=[(1, 1, 1)])
    seen = []

    def recording_transform(sample):
        seen.append(float(np.min(sample["seg"])))
        return sample

    dataset = CaseDataset.from_folder(tmp_path)
    batch = PatchBatchStream(dataset, (6, 6, 6), 1, 0.0, transform=recording_transform).make_batch(0)
    assert seen == [-1.0]
    assert batch["seg"].min() == 0


def test_same_batches_for_any_number_of_workers(tmp_path):
    for i in range(3):
        _write_case(tmp_path, f"case{i}")
    dataset = CaseDataset.from_folder(tmp_path)
    serial = list(make_patch_loader(dataset, (8, 8, 8), 2, num_batches=5, seed=3, num_workers=0))
    parallel = list(make_patch_loader(dataset, (8, 8, 8), 2, num_batches=5, seed=3, num_workers=2))
    for a, b in zip(serial, parallel, strict=True):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["data"], b["data"]) and torch.equal(a["seg"], b["seg"])


def test_resuming_at_start_batch_continues_the_uninterrupted_sequence(tmp_path):
    for i in range(3):
        _write_case(tmp_path, f"case{i}")
    dataset = CaseDataset.from_folder(tmp_path)
    full = list(make_patch_loader(dataset, (8, 8, 8), 2, num_batches=6, seed=11))
    resumed = list(make_patch_loader(dataset, (8, 8, 8), 2, start_batch=4, num_batches=2, seed=11))
    for a, b in zip(full[4:], resumed, strict=True):
        assert torch.equal(a["data"], b["data"]) and a["keys"] == b["keys"]
    other_rank = PatchBatchStream(dataset, (8, 8, 8), 2, seed=11, rank=1).make_batch(0)
    assert not torch.equal(other_rank["data"], full[0]["data"])


def test_seeded_monai_style_transform_is_reseeded_per_sample(tmp_path):
    from monai.transforms import Compose, RandGaussianNoised
    _write_case(tmp_path, "noise")
    dataset = CaseDataset.from_folder(tmp_path)
    transform = Compose([RandGaussianNoised(keys="data", prob=1.0, std=1.0)])
    first = PatchBatchStream(dataset, (8, 8, 8), 2, transform=transform, seed=2).make_batch(7)
    again = PatchBatchStream(dataset, (8, 8, 8), 2, transform=transform, seed=2).make_batch(7)
    plain = PatchBatchStream(dataset, (8, 8, 8), 2, transform=None, seed=2).make_batch(7)
    assert torch.equal(first["data"], again["data"])
    assert not torch.equal(first["data"], plain["data"])


def test_single_channel_binary_cases_work_like_abus(tmp_path):
    _write_case(tmp_path, "ABUS_001", channels=1, fg_voxels=[(5, 5, 5), (6, 5, 5)])
    dataset = CaseDataset.from_folder(tmp_path)
    batch = make_patch_loader(dataset, (8, 8, 8), 2, num_batches=1).__iter__().__next__()
    assert batch["data"].shape == (2, 1, 8, 8, 8)
    assert set(torch.unique(batch["seg"]).tolist()) <= {0, 1} and batch["seg"][1].sum() >= 1


def test_case_without_foreground_falls_back_to_random_patches(tmp_path):
    _write_case(tmp_path, "healthy", fg_voxels=[])
    dataset = CaseDataset.from_folder(tmp_path)
    assert dataset.class_locations(0) == {}
    batch = PatchBatchStream(dataset, (8, 8, 8), 2, 1.0).make_batch(0)
    assert batch["seg"].sum() == 0


def test_dataset_loads_lazily_caches_on_request_and_writes_nothing_to_the_data_folder(tmp_path):
    data, seg = _write_case(tmp_path, "c0")
    before = sorted(os.listdir(tmp_path))
    dataset = CaseDataset(list_case_files(tmp_path), cache_arrays=True)
    item = dataset[0]
    np.testing.assert_array_equal(item["data"], data)
    np.testing.assert_array_equal(item["seg"], seg)
    assert item["key"] == "c0" and item["properties"]["name"] == "c0"
    assert dataset.arrays(0)[0] is dataset.arrays(0)[0]
    np.testing.assert_array_equal(dataset.class_locations(0)[1], [[3, 4, 5]])
    list(make_patch_loader(dataset, (4, 4, 4), 1, num_batches=2))
    assert sorted(os.listdir(tmp_path)) == before


def test_missing_cases_are_listed_by_name(tmp_path):
    _write_case(tmp_path, "present")
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        list_case_files(tmp_path, ["present", "absent"])
    with pytest.raises(FileNotFoundError, match="not found"):
        CaseDataset([tmp_path / "gone.npz"])


def test_invalid_loader_arguments_are_refused(tmp_path):
    _write_case(tmp_path, "c0")
    dataset = CaseDataset.from_folder(tmp_path)
    with pytest.raises(ValueError, match="patch_size"):
        PatchBatchStream(dataset, (8, 8), 2)
    with pytest.raises(ValueError, match="oversample_foreground"):
        PatchBatchStream(dataset, (8, 8, 8), 2, oversample_foreground=1.5)


def test_choose_patch_start_is_uniform_over_the_whole_range():
    rng = np.random.default_rng(0)
    starts = {choose_patch_start((10,), (8,), rng)[0] for _ in range(200)}
    assert starts == {0, 1, 2}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_set_epoch_moves_the_stream_to_that_epochs_batches_also_in_running_workers(tmp_path, num_workers):
    for i in range(3):
        _write_case(tmp_path, f"case{i}")
    dataset = CaseDataset.from_folder(tmp_path)
    reference = PatchBatchStream(dataset, (8, 8, 8), 2, seed=4)
    loader = make_patch_loader(dataset, (8, 8, 8), 2, num_batches=3, seed=4, num_workers=num_workers)
    assert len(loader) == 3
    epoch0 = list(loader)  # starts the (persistent) workers
    loader.set_epoch(2)
    epoch2 = list(loader)
    for got, index in zip(epoch0 + epoch2, [0, 1, 2, 6, 7, 8], strict=True):
        expected = reference.make_batch(index)
        assert got["keys"] == expected["keys"] and torch.equal(got["data"], expected["data"])


# ------------------------------------------------------------------------------------------ augmentation

def _augment_sample(seed=0, shape=(16, 18, 20)):
    rng = np.random.default_rng(seed)
    seg = np.zeros((1, *shape), np.float32)
    seg[0, 4:12, 5:13, 6:14] = 2
    seg[0, 6:10, 7:11, 8:12] = 3
    seg[0, 0] = -1
    data = rng.normal(size=(2, *shape)).astype(np.float32)
    return {"data": data, "seg": seg}


def test_augmentation_variants_contain_the_documented_steps():
    from light_training.augment import RandRotateScaled, build_train_transforms
    from monai.transforms import RandFlipd, RandGaussianNoised

    def kinds(variant):
        return [type(t) for t in build_train_transforms(variant).transforms]

    assert kinds("default").count(RandFlipd) == 3 and RandRotateScaled in kinds("default")
    assert RandFlipd not in kinds("nomirror") and RandRotateScaled in kinds("nomirror")
    assert RandRotateScaled not in kinds("onlymirror") and kinds("onlymirror").count(RandFlipd) == 3
    only_spatial = kinds("onlyspatial")
    assert RandGaussianNoised not in only_spatial and RandRotateScaled in only_spatial
    assert build_train_transforms(None) is None
    with pytest.raises(ValueError, match="unknown augmentation variant"):
        build_train_transforms("heavy")


@pytest.mark.parametrize("seed", range(6))
def test_spatial_steps_move_images_and_labels_identically(seed):
    from light_training.augment import build_train_transforms
    sample = _augment_sample(seed)
    sample["data"] = np.repeat(sample["seg"] * 10.0, 2, axis=0)  # images that are a copy of the labels
    transform = build_train_transforms("onlyspatial", data_interpolation="nearest")
    # Force the spatial step to happen.
    transform.transforms[1].prob_rotate = transform.transforms[1].prob_scale = 1.0
    transform.set_random_state(seed)
    out = transform(sample)
    assert isinstance(out["data"], torch.Tensor) and not hasattr(out["data"], "meta")
    assert out["data"].shape == (2, 16, 18, 20) and out["seg"].shape == (1, 16, 18, 20)
    torch.testing.assert_close(out["data"][0] / 10.0, out["seg"][0])
    assert set(torch.unique(out["seg"]).tolist()) <= {-1.0, 0.0, 2.0, 3.0}  # nearest: no new labels


def test_default_pipeline_is_reproducible_with_a_seed_and_keeps_labels_valid():
    from light_training.augment import build_train_transforms
    transform = build_train_transforms("default")
    outputs = []
    for seed in (5, 5, 6):
        transform.set_random_state(seed)
        outputs.append(transform(_augment_sample()))
    assert torch.equal(outputs[0]["data"], outputs[1]["data"]) and torch.equal(outputs[0]["seg"], outputs[1]["seg"])
    changed = [not torch.equal(transform.set_random_state(s)(_augment_sample())["data"],
                               torch.as_tensor(_augment_sample()["data"])) for s in range(10)]
    assert any(changed)
    for out in outputs:
        assert out["data"].dtype == torch.float32 and torch.isfinite(out["data"]).all()
        assert set(torch.unique(out["seg"]).tolist()) <= {-1.0, 0.0, 2.0, 3.0}


def test_contrast_step_matches_the_formula_per_channel():
    from light_training.augment import RandContrastd
    data = np.random.default_rng(0).normal(size=(2, 4, 5, 6)).astype(np.float32)
    transform = RandContrastd("data", prob=1.0, factor_range=(2.0, 2.0))
    out = transform({"data": data})["data"].numpy()
    for channel in range(2):
        x = data[channel].astype(np.float64)
        expected = np.clip((x - x.mean()) * 2.0 + x.mean(), x.min(), x.max())
        np.testing.assert_allclose(out[channel], expected, atol=1e-5)


def test_per_channel_wrapper_transforms_each_chosen_channel_on_its_own():
    from light_training.augment import RandPerChanneld
    from monai.transforms import RandAdjustContrast
    data = np.random.default_rng(0).uniform(1, 5, size=(3, 4, 4, 4)).astype(np.float32)
    gamma_two = RandAdjustContrast(prob=1.0, gamma=(2.0, 2.0))
    out = RandPerChanneld("data", gamma_two, prob=1.0, prob_per_channel=1.0)({"data": data})["data"].numpy()
    for channel in range(3):
        x = data[channel].astype(np.float64)
        span = x.max() - x.min()
        expected = ((x - x.min()) / (span + 1e-7)) ** 2 * span + x.min()
        np.testing.assert_allclose(out[channel], expected, rtol=1e-4, atol=1e-4)
    untouched = RandPerChanneld("data", gamma_two, prob=1.0, prob_per_channel=0.0)({"data": data})["data"]
    np.testing.assert_array_equal(untouched.numpy(), data)


def test_patch_loader_with_augmentation_yields_valid_batches(tmp_path):
    from light_training.augment import build_train_transforms
    for i in range(2):
        _write_case(tmp_path, f"case{i}", shape=(16, 16, 16))
    dataset = CaseDataset.from_folder(tmp_path)
    loader = make_patch_loader(dataset, (12, 12, 12), 2, transform=build_train_transforms("default"),
                               num_batches=3, seed=1)
    for batch in loader:
        assert batch["data"].shape == (2, 2, 12, 12, 12) and batch["seg"].dtype == torch.int64
        assert batch["seg"].min() >= 0 and batch["seg"].max() <= 1
        assert torch.isfinite(batch["data"]).all()
