"""Whole-volume prediction: window coverage, blending, probability-averaging TTA, resize and un-crop."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from light_training.prediction import (SlidingWindowConfig, SlidingWindowPredictor, labels_from_probabilities,
                                       mirror_combinations, paste_into_original, predict_case,
                                       resize_probabilities)


class ConstantLogits(torch.nn.Module):
    def __init__(self, values):
        super().__init__()
        self.values = torch.tensor(values, dtype=torch.float32)

    def forward(self, x):
        shape = (x.shape[0], len(self.values)) + tuple(x.shape[2:])
        return self.values.view(1, -1, 1, 1, 1).expand(shape).clone()


class Echo(torch.nn.Module):
    def forward(self, x):
        return x.clone()


def coordinate_volume(shape):
    """(3, Z, Y, X) float32 holding each voxel's own z, y, x index."""
    return np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")).astype(np.float32)


@pytest.mark.parametrize("shape", [(37, 50, 23), (9, 20, 17)])  # second: smaller than the ROI on one axis
def test_constant_logit_model_gives_the_same_probabilities_at_every_voxel(shape):
    predictor = SlidingWindowPredictor(SlidingWindowConfig(roi_size=(16, 16, 16), overlap=0.5, sw_batch_size=3))
    probabilities = predictor.predict_probabilities(ConstantLogits([1.0, 2.0, 3.0]), np.zeros((1,) + shape))
    expected = np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum()
    assert probabilities.shape == (3,) + shape
    np.testing.assert_allclose(probabilities.numpy(), np.broadcast_to(expected[:, None, None, None],
                                                                      (3,) + shape), rtol=1e-5)


@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.25])
def test_echo_model_returns_every_voxels_own_coordinates(overlap):
    """Blending windows of an echo model must give back the input at every voxel (weights sum to 1, all
    voxels visited, windows placed where they claim)."""
    shape = (35, 21, 40)
    volume = coordinate_volume(shape)
    predictor = SlidingWindowPredictor(SlidingWindowConfig(roi_size=(16, 8, 16), overlap=overlap))
    logits = predictor.predict_logits(Echo(), torch.from_numpy(volume)[None])[0]
    np.testing.assert_allclose(logits.numpy(), volume, atol=1e-4)


def test_sliding_window_of_a_pointwise_model_equals_the_whole_volume_forward_in_float64():
    torch.manual_seed(0)
    pointwise = torch.nn.Sequential(torch.nn.Conv3d(2, 5, 1), torch.nn.Tanh(), torch.nn.Conv3d(5, 3, 1))
    image = torch.randn(2, 30, 19, 26)
    predictor = SlidingWindowPredictor(SlidingWindowConfig(roi_size=(16, 16, 16), overlap=0.5))
    probabilities = predictor.predict_probabilities(pointwise, image)
    with torch.no_grad():
        reference = torch.softmax(pointwise.double()(image.double()[None]), dim=1)[0]
    torch.testing.assert_close(probabilities.double(), reference, rtol=1e-5, atol=1e-6)


def test_mirror_combinations_are_all_subsets_starting_with_no_flip():
    combos = mirror_combinations((0, 1, 2))
    assert combos[0] == () and len(combos) == 8 and len(set(combos)) == 8
    assert set(combos) == {c for n in range(4) for c in itertools.combinations((0, 1, 2), n)}
    assert mirror_combinations(()) == [()]


class PositionDependent(torch.nn.Module):
    """Not flip-symmetric: logits mix the input with fixed ramps along z and x."""

    def forward(self, x):
        z = torch.linspace(-2.0, 3.0, x.shape[2]).view(1, 1, -1, 1, 1)
        xr = torch.linspace(1.0, -1.5, x.shape[4]).view(1, 1, 1, 1, -1)
        first = 2.0 * x[:, :1] + z + 0 * xr
        second = -x[:, :1] * xr + 0.5 * z * xr
        third = torch.zeros_like(first) + xr
        return torch.cat([first, second, third], dim=1)


def test_mirror_tta_averages_softmax_probabilities_of_the_flipped_predictions():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(1, 6, 5, 7))
    model = PositionDependent()

    def softmax(a):
        e = np.exp(a - a.max(axis=0, keepdims=True))
        return e / e.sum(axis=0, keepdims=True)

    def logits_np(img):  # the same model written in numpy, float64
        z = np.linspace(-2.0, 3.0, img.shape[1])[:, None, None]
        xr = np.linspace(1.0, -1.5, img.shape[3])[None, None, :]
        first = 2.0 * img[0] + z + 0 * xr
        second = -img[0] * xr + 0.5 * z * xr
        third = np.zeros_like(first) + xr
        return np.stack([first, second, third])

    axes = (0, 2)
    expected = np.zeros((3,) + image.shape[1:])
    expected_logit_mean = np.zeros_like(expected)
    for combo in [(), (0,), (2,), (0, 2)]:
        flip_axes = tuple(a + 1 for a in combo)
        flipped = np.flip(image, flip_axes) if combo else image
        logits = logits_np(flipped)
        logits = np.flip(logits, flip_axes) if combo else logits
        expected += softmax(logits) / 4
        expected_logit_mean += logits / 4

    # one window covers the whole volume, so Gaussian blending is an exact no-op here
    predictor = SlidingWindowPredictor(SlidingWindowConfig(roi_size=(6, 5, 7), mirror_axes=axes))
    got = predictor.predict_probabilities(model, image.astype(np.float32)).double().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.abs(softmax(expected_logit_mean) - expected).max() > 1e-2  # the two averages really differ


def test_predictor_leaves_the_models_training_mode_as_it_found_it():
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1), torch.nn.Dropout(0.9))
    model.train()
    predictor = SlidingWindowPredictor(SlidingWindowConfig(roi_size=(4, 4, 4)))
    first = predictor.predict_probabilities(model, np.ones((1, 4, 4, 4), np.float32))
    second = predictor.predict_probabilities(model, np.ones((1, 4, 4, 4), np.float32))
    assert torch.equal(first, second)  # dropout was off during inference
    assert model.training


def test_config_rejects_bad_values_with_clear_messages():
    with pytest.raises(ValueError, match="overlap"):
        SlidingWindowConfig(overlap=1.0)
    with pytest.raises(ValueError, match="mirror_axes"):
        SlidingWindowConfig(mirror_axes=(3,))
    with pytest.raises(ValueError, match="amp_dtype"):
        SlidingWindowConfig(amp_dtype="fp8")


# ------------------------------------------------------------------------------------------- geometry
def test_trilinear_resize_matches_hand_computed_half_pixel_interpolation():
    probabilities = torch.zeros(2, 1, 1, 2)
    probabilities[0, 0, 0] = torch.tensor([1.0, 3.0])
    probabilities[1] = 0.25
    resized = resize_probabilities(probabilities, (2, 3, 4))
    assert resized.shape == (2, 2, 3, 4)
    # x_out = (i + 0.5) * 2 / 4 - 0.5 = -0.25, 0.25, 0.75, 1.25 (clamped to [0, 1])
    np.testing.assert_allclose(resized[0, 1, 2].numpy(), [1.0, 1.5, 2.5, 3.0], atol=1e-6)
    np.testing.assert_allclose(resized[1].numpy(), 0.25, atol=1e-7)
    same = torch.rand(3, 4, 5, 6)
    assert resize_probabilities(same, (4, 5, 6)) is same


def test_paste_into_original_places_the_crop_at_its_box_and_fills_the_rest():
    cropped = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) + 1
    full = paste_into_original(cropped, (5, 6, 7), [[1, 3], [2, 5], [3, 7]])
    assert full.shape == (5, 6, 7) and full.dtype == np.uint8
    assert np.array_equal(full[1:3, 2:5, 3:7], cropped)
    assert full.sum() == cropped.sum()
    multi = paste_into_original(np.ones((2, 2, 3, 4), np.float32), (5, 6, 7), [[1, 3], [2, 5], [3, 7]], 0.5)
    assert multi.shape == (2, 5, 6, 7) and multi[0, 0, 0, 0] == 0.5
    with pytest.raises(ValueError, match="spans"):
        paste_into_original(cropped, (5, 6, 7), [[0, 3], [2, 5], [3, 7]])
    with pytest.raises(ValueError, match="outside"):
        paste_into_original(cropped, (5, 6, 5), [[1, 3], [2, 5], [3, 7]])


def test_predict_case_goes_back_to_the_raw_grid_through_resize_and_uncrop():
    """Preprocessed grid (4, 6, 8) = the crop (2, 3, 4) resampled by 2; raw volume (5, 7, 9), crop at
    [[1, 3], [2, 5], [4, 8]]. The model marks voxels with positive input as class 1."""
    data = -np.ones((1, 4, 6, 8), np.float32)
    data[0, 2:4, 0:2, 4:8] = 1.0  # covers crop voxels z 1, y 0, x 2..3
    properties = {"shape_after_cropping_before_resample": [2, 3, 4], "shape_before_cropping": [5, 7, 9],
                  "bbox_used_for_cropping": [[1, 3], [2, 5], [4, 8]]}

    class Threshold(torch.nn.Module):
        def forward(self, x):
            return torch.cat([-x, x], dim=1) * 5

    predictor = SlidingWindowPredictor(SlidingWindowConfig(roi_size=(4, 4, 4)))
    result = predict_case(predictor, Threshold(), data, properties)
    expected = np.zeros((5, 7, 9), np.uint8)
    expected[1 + 1, 2 + 0, 4 + 2:4 + 4] = 1
    assert result.labels_original.dtype == np.uint8
    assert np.array_equal(result.labels_original, expected)
    assert np.array_equal(result.labels_preprocessed, (data[0] > 0).astype(np.uint8))
    with pytest.raises(KeyError, match="shape_before_cropping"):
        predict_case(predictor, Threshold(), data, {"shape_after_cropping_before_resample": [2, 3, 4],
                                                    "bbox_used_for_cropping": [[1, 3], [2, 5], [4, 8]]})


def test_labels_from_probabilities_is_argmax_as_uint8():
    probabilities = torch.tensor([[0.2, 0.5], [0.7, 0.1], [0.1, 0.4]]).view(3, 1, 1, 2)
    labels = labels_from_probabilities(probabilities)
    assert labels.dtype == np.uint8 and labels.tolist() == [[[1, 0]]]
