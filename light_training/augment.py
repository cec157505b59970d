"""Training-time augmentation of patches (the reference's nnU-Net-style pipeline, built from MONAI).

Applied per sample to ``{"data": (C, Z, Y, X) float, "seg": (1, Z, Y, X) float labels}`` (the seg keeps the
``-1`` "outside the image" marker; the data loader maps it to 0 afterwards). Default pipeline, in order:

====  =============================================================  ======  ============================
 #    transform                                                      p       implementation
====  =============================================================  ======  ============================
 1    rotation U(-30°, 30°) about each axis / isotropic scaling      0.2 /   :class:`RandRotateScaled`
      U(0.7, 1.4), one resampling; data cubic spline, seg nearest    0.2     (MONAI ``Affine``)
 2    Gaussian noise, std U(0, √0.1)                                 0.1     MONAI ``RandGaussianNoised``
 3    Gaussian blur σ U(0.5, 1) per axis, per channel p 0.5          0.2     MONAI ``RandGaussianSmooth``
 4    brightness × U(0.75, 1.25) per channel                         0.15    MONAI ``RandScaleIntensityd``
 5    contrast × U(0.75, 1.25) about the mean, range preserved       0.15    :class:`RandContrastd`
 6    simulate low resolution, zoom U(0.5, 1), per channel p 0.5     0.25    MONAI ``RandSimulateLowResolution``
 7    gamma U(0.7, 1.5) of the inverted image, stats retained        0.1     MONAI ``RandAdjustContrast``
 8    gamma U(0.7, 1.5), stats retained, per channel                 0.3     MONAI ``RandAdjustContrast``
 9    mirror along each spatial axis                                 0.5 ea  MONAI ``RandFlipd``
====  =============================================================  ======  ============================

Per-channel steps use :class:`RandPerChanneld` (MONAI applies one random draw to all channels). Known
differences from batchgenerators: noise std (not variance) is uniform; blur σ is drawn per axis; low-res
upsampling is trilinear (not cubic); gamma is drawn uniformly from (0.7, 1.5).

Variants (the reference's ``augmentation`` setting): ``"default"``; ``"nomirror"`` (no 9); ``"onlymirror"``
(no 1 — the name is the reference's); ``"onlyspatial"`` (1 and 9 only); ``None`` (no augmentation).
Seed with ``transform.set_random_state(seed)``; the patch loader re-seeds it for every sample.
"""
from __future__ import annotations

import math
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import (Affine, Compose, EnsureTyped, MapTransform, RandAdjustContrast, RandFlipd,
                              RandGaussianNoised, RandGaussianSmooth, RandomizableTransform, RandScaleIntensityd,
                              RandSimulateLowResolution)
from monai.utils import MAX_SEED

__all__ = ["AUGMENTATION_VARIANTS", "RandRotateScaled", "RandContrastd", "RandPerChanneld",
           "build_train_transforms"]

AUGMENTATION_VARIANTS = ("default", "nomirror", "onlymirror", "onlyspatial", None)


def _plain(value: Any) -> torch.Tensor:
    if hasattr(value, "as_tensor"):
        return value.as_tensor()
    return torch.as_tensor(value)


class RandRotateScaled(RandomizableTransform, MapTransform):
    """Random rotation and isotropic scaling in one resampling, with separate probabilities.

    MONAI's ``RandAffined`` has one probability for all parameters and draws scaling per axis; the reference
    rotates with p 0.2 and scales (same factor on all axes) with p 0.2 independently.

    Args:
        keys: keys to transform (all with the same draw).
        label_keys: keys resampled with nearest neighbour (label maps); others use ``data_mode``.
        rotate_range_deg: angles are U(-r, r) degrees about each of the three axes.
        scale_range: isotropic factor U(lo, hi) (> 1 samples a larger region: content looks smaller).
        data_mode: interpolation of images: spline order (3 = cubic) or "bilinear" (faster).
    Outside the patch, images are filled with 0 and labels with 0.
    """

    def __init__(self, keys: Sequence[Hashable], label_keys: Sequence[Hashable] = ("seg",), prob_rotate: float = 0.2,
                 rotate_range_deg: float = 30.0, prob_scale: float = 0.2, scale_range: tuple[float, float] = (0.7, 1.4),
                 data_mode: int | str = 3):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.label_keys = set(label_keys)
        self.prob_rotate, self.prob_scale = float(prob_rotate), float(prob_scale)
        self.rotate_range = math.radians(rotate_range_deg)
        self.scale_range = tuple(scale_range)
        self.data_mode = data_mode
        self._angles: tuple[float, float, float] | None = None
        self._scale: float | None = None

    def randomize(self, data: Any = None) -> None:
        rotate = self.R.rand() < self.prob_rotate
        self._angles = tuple(self.R.uniform(-self.rotate_range, self.rotate_range, 3)) if rotate else None
        scale = self.R.rand() < self.prob_scale
        self._scale = float(self.R.uniform(*self.scale_range)) if scale else None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        self.randomize()
        if self._angles is None and self._scale is None:
            return out
        for key in self.key_iterator(out):
            affine = Affine(rotate_params=self._angles, scale_params=(self._scale,) * 3 if self._scale else None,
                            mode="nearest" if key in self.label_keys else self.data_mode, padding_mode="zeros",
                            image_only=True)
            out[key] = _plain(affine(_plain(out[key]).float()))
        return out


class RandContrastd(RandomizableTransform, MapTransform):
    """Per-channel contrast change: ``x -> (x - mean) * f + mean``, f ~ U(lo, hi), clipped to the channel's
    original min/max (batchgenerators' ``ContrastAugmentationTransform`` with preserve_range)."""

    def __init__(self, keys: Sequence[Hashable], prob: float = 0.15, factor_range: tuple[float, float] = (0.75, 1.25),
                 preserve_range: bool = True):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob=prob)
        self.factor_range = tuple(factor_range)
        self.preserve_range = preserve_range
        self._factors: np.ndarray | None = None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return out
        for key in self.key_iterator(out):
            image = _plain(out[key]).float().clone()
            factors = self.R.uniform(*self.factor_range, image.shape[0])
            for channel in range(image.shape[0]):
                values = image[channel]
                low, high, mean = values.min(), values.max(), values.mean()
                values.sub_(mean).mul_(float(factors[channel])).add_(mean)
                if self.preserve_range:
                    values.clamp_(low, high)
            out[key] = image
        return out


class RandPerChanneld(RandomizableTransform, MapTransform):
    """Apply a random MONAI array transform to each channel separately.

    With probability ``prob`` the sample is augmented; then each channel is transformed with probability
    ``prob_per_channel``, with its own random draw. The wrapped transform should have ``prob=1.0``.
    """

    def __init__(self, keys: Sequence[Hashable], transform: RandomizableTransform, prob: float,
                 prob_per_channel: float = 1.0):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob=prob)
        self.transform = transform
        self.prob_per_channel = float(prob_per_channel)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> "RandPerChanneld":
        super().set_random_state(seed=seed, state=state)
        self.transform.set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return out
        for key in self.key_iterator(out):
            image = _plain(out[key]).float().clone()
            for channel in range(image.shape[0]):
                if self.R.rand() < self.prob_per_channel:
                    image[channel] = _plain(self.transform(image[channel:channel + 1]))[0]
            out[key] = image
        return out


def build_train_transforms(variant: str | None = "default", data_key: str = "data", label_key: str = "seg",
                           data_interpolation: int | str = 3) -> Compose | None:
    """The training augmentation pipeline (module docstring) for ``variant``; None for no augmentation.

    Args:
        data_interpolation: spatial interpolation of images, spline order 3 (reference) or "bilinear"
            (several times faster on CPU).
    """
    if variant not in AUGMENTATION_VARIANTS:
        raise ValueError(f"unknown augmentation variant {variant!r}; choose one of {AUGMENTATION_VARIANTS}")
    if variant is None:
        return None
    keys = [data_key, label_key]
    spatial = [RandRotateScaled(keys, label_keys=(label_key,), data_mode=data_interpolation)]
    intensity = [
        RandGaussianNoised(data_key, prob=0.1, mean=0.0, std=math.sqrt(0.1), sample_std=True),
        RandPerChanneld(data_key, RandGaussianSmooth((0.5, 1.0), (0.5, 1.0), (0.5, 1.0), prob=1.0),
                        prob=0.2, prob_per_channel=0.5),
        RandScaleIntensityd(data_key, factors=(-0.25, 0.25), prob=0.15, channel_wise=True),
        RandContrastd(data_key, prob=0.15),
        RandPerChanneld(data_key, RandSimulateLowResolution(prob=1.0, zoom_range=(0.5, 1.0)),
                        prob=0.25, prob_per_channel=0.5),
        RandPerChanneld(data_key, RandAdjustContrast(prob=1.0, gamma=(0.7, 1.5), invert_image=True,
                                                     retain_stats=True), prob=0.1),
        RandPerChanneld(data_key, RandAdjustContrast(prob=1.0, gamma=(0.7, 1.5), invert_image=False,
                                                     retain_stats=True), prob=0.3),
    ]
    mirror = [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(3)]
    steps = {"default": spatial + intensity + mirror, "nomirror": spatial + intensity,
             "onlymirror": intensity + mirror, "onlyspatial": spatial + mirror}[variant]
    return Compose([EnsureTyped(keys, data_type="tensor", dtype=torch.float32, track_meta=False), *steps,
                    EnsureTyped(keys, data_type="tensor", track_meta=False)])
