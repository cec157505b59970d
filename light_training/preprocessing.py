"""Preprocessing of raw 3D cases into the ``NAME.npz`` + ``NAME.json`` format (nnU-Net style).

Per case (:func:`preprocess_case`):

1. read the channels (all must share shape, spacing, origin and direction) and the segmentation;
   reject NaN/Inf voxels, all-zero images and labels outside the declared set;
2. crop to the non-zero region (union over channels, holes filled); segmentation voxels that are background
   and outside that region become ``-1``;
3. z-score each channel: over the whole cropped volume (``normalize_with_mask=False``, what the reference
   does for BraTS, so reference checkpoints see the intensities they were trained on) or over the non-zero
   region only (``True``; voxels outside it are then set to 0);
4. resample to the target spacing: images with cubic splines (order 3, edge mode, no anti-aliasing), the
   segmentation label by label with linear interpolation and a 0.5 threshold; skipped when the spacing
   already matches;
5. store up to 10,000 voxel coordinates per foreground label (seeded) for foreground oversampling.

:func:`preprocess_cases` runs this over many cases in worker processes with a progress bar, skips finished
cases, collects per-case failures and returns a :class:`PreprocessingReport`; :func:`dataset_summary`
condenses the written properties (spacings, shapes, intensities).
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import multiprocessing
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from light_training.io import (ImageGeometry, is_case_complete, load_case_properties, read_image,
                               read_images_as_channels, sanitize_case_name, save_case, case_paths)
from light_training.utils.files import remove_stale_temporaries

__all__ = ["RawCase", "PreprocessingConfig", "PreprocessingReport", "PreprocessingError", "nonzero_mask",
           "bounding_box", "crop_to_bbox", "crop_to_nonzero", "compute_new_shape", "resample_data",
           "resample_seg", "zscore_normalize", "collect_class_locations", "intensity_statistics",
           "preprocess_case", "preprocess_cases", "dataset_summary", "format_summary_table"]

logger = logging.getLogger(__name__)


class PreprocessingError(RuntimeError):
    """Raised in strict mode when a case fails (the message names the case and the problem)."""


@dataclass
class RawCase:
    """One raw case: a name, one image file per channel (co-registered) and an optional segmentation."""

    name: str
    image_paths: list[str]
    seg_path: str | None = None
    channel_names: list[str] | None = None


@dataclass
class PreprocessingConfig:
    """Settings of :func:`preprocess_case`.

    Attributes:
        target_spacing_zyx: output voxel size in mm (Z, Y, X); None keeps the original spacing.
        labels: foreground labels the segmentation may contain (besides 0); others are an error.
        normalize_with_mask: z-score over the non-zero region only (True) or the whole cropped volume (False).
        binarize_seg: map every label > 0 to 1 before checking (binary tasks such as ABUS with 0/255 masks).
        max_locations_per_class: stored foreground coordinates per label.
        location_seed: seed of the coordinate sampling (fixed: re-running gives the same file).
        data_order / seg_order: interpolation orders (3 = cubic for images, 1 = linear per label for seg).
    """

    target_spacing_zyx: tuple[float, float, float] | None = (1.0, 1.0, 1.0)
    labels: tuple[int, ...] = (1, 2, 3)
    normalize_with_mask: bool = False
    binarize_seg: bool = False
    max_locations_per_class: int = 10000
    location_seed: int = 1234
    data_order: int = 3
    seg_order: int = 1


# ------------------------------------------------------------------------------------------------ crop

def nonzero_mask(data: np.ndarray) -> np.ndarray:
    """``(Z, Y, X)`` bool: voxels where any channel of ``data (C, Z, Y, X)`` is non-zero, holes filled."""
    from scipy.ndimage import binary_fill_holes
    return binary_fill_holes(np.any(data != 0, axis=0))


def bounding_box(mask: np.ndarray) -> list[list[int]]:
    """Half-open bounding box ``[[z0, z1], [y0, y1], [x0, x1]]`` of the True voxels (error if none)."""
    if not mask.any():
        raise ValueError("the mask is empty, no bounding box")
    box = []
    for axis in range(mask.ndim):
        other_axes = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other_axes))
        box.append([int(present[0]), int(present[-1]) + 1])
    return box


def crop_to_bbox(array: np.ndarray, bbox: Sequence[Sequence[int]]) -> np.ndarray:
    """Crop the last three axes of ``array`` to ``bbox`` (half-open)."""
    index = (Ellipsis,) + tuple(slice(lo, hi) for lo, hi in bbox)
    return array[index]


def crop_to_nonzero(data: np.ndarray, seg: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """Crop ``data (C, Z, Y, X)`` (and ``seg (1, Z, Y, X)``) to the non-zero region.

    Returns ``(data, seg, bbox)``. In the returned ``seg`` (created as zeros when None), background voxels
    outside the non-zero region are ``-1``.
    """
    mask = nonzero_mask(data)
    if not mask.any():
        raise ValueError("all channels are zero everywhere (empty image)")
    bbox = bounding_box(mask)
    cropped_data = crop_to_bbox(data, bbox)
    cropped_mask = crop_to_bbox(mask, bbox)
    if seg is None:
        cropped_seg = np.zeros((1,) + cropped_data.shape[1:], np.int16)
    else:
        cropped_seg = crop_to_bbox(seg, bbox).astype(np.int16, copy=True)
    cropped_seg[(cropped_seg == 0) & ~cropped_mask[None]] = -1
    return cropped_data, cropped_seg, bbox


# -------------------------------------------------------------------------------------------- resample

def compute_new_shape(shape_zyx: Sequence[int], spacing_zyx: Sequence[float],
                      target_spacing_zyx: Sequence[float]) -> tuple[int, ...]:
    """``round(spacing / target_spacing * shape)`` per axis (at least 1 voxel)."""
    return tuple(max(1, int(round(s * sp / tsp))) for s, sp, tsp in zip(shape_zyx, spacing_zyx, target_spacing_zyx))


def resample_data(data: np.ndarray, new_shape: Sequence[int], order: int = 3) -> np.ndarray:
    """Resize every channel of ``data (C, Z, Y, X)`` to ``new_shape`` (spline ``order``, edge mode)."""
    from skimage.transform import resize
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(data.shape[1:]) == new_shape:
        return data.astype(np.float32, copy=True)
    out = np.empty((data.shape[0], *new_shape), np.float32)
    for channel in range(data.shape[0]):
        out[channel] = resize(data[channel].astype(np.float32, copy=False), new_shape, order=order, mode="edge",
                              anti_aliasing=False, preserve_range=True)
    return out


def resample_seg(seg: np.ndarray, new_shape: Sequence[int], order: int = 1) -> np.ndarray:
    """Resize a label map ``(1, Z, Y, X)`` label by label: each label's mask is interpolated (``order``) and
    the voxels where it exceeds 0.5 take that label (labels in increasing order, so higher labels win ties).
    ``order=0`` is plain nearest neighbour."""
    from skimage.transform import resize
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(seg.shape[1:]) == new_shape:
        return seg.copy()
    if order == 0:
        return resize(seg[0], new_shape, order=0, mode="edge", anti_aliasing=False, preserve_range=True,
                      clip=False).astype(seg.dtype)[None]
    out = np.zeros((1, *new_shape), seg.dtype)
    for label in np.unique(seg):
        if label == 0:
            continue
        resized = resize((seg[0] == label).astype(np.float32), new_shape, order=order, mode="edge",
                         anti_aliasing=False)
        out[0][resized >= 0.5] = label
    return out


# ------------------------------------------------------------------------------------------- normalise

def zscore_normalize(data: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, list[dict[str, float]]]:
    """Z-score every channel of ``data (C, Z, Y, X)``.

    With ``mask (Z, Y, X)`` the mean/std come from the masked voxels and voxels outside are set to 0;
    without, from the whole array. The std is floored at 1e-8. Returns ``(normalised float32, [{"mean",
    "std"} per channel])``.
    """
    out = np.empty(data.shape, np.float32)
    stats = []
    for channel in range(data.shape[0]):
        values = data[channel][mask] if mask is not None else data[channel]
        mean = float(values.mean(dtype=np.float64))
        std = float(values.std(dtype=np.float64))
        out[channel] = (data[channel] - mean) / max(std, 1e-8)
        if mask is not None:
            out[channel][~mask] = 0
        stats.append({"mean": mean, "std": std})
    return out, stats


# ------------------------------------------------------------------------------------------- locations

def collect_class_locations(seg: np.ndarray, labels: Sequence[int], max_per_class: int = 10000,
                            seed: int = 1234) -> dict[int, np.ndarray]:
    """Up to ``max_per_class`` voxel coordinates ``(N, 3)`` (z, y, x) per label of ``seg (1, Z, Y, X)``.

    Sampled without replacement with ``np.random.RandomState(seed)``; all voxels when there are fewer.
    Labels absent from ``seg`` map to an empty ``(0, 3)`` array.
    """
    rng = np.random.RandomState(seed)
    locations = {}
    for label in labels:
        coords = np.argwhere(seg[0] == label)
        if len(coords) > max_per_class:
            coords = coords[np.sort(rng.choice(len(coords), max_per_class, replace=False))]
        locations[int(label)] = coords.astype(np.int32)
    return locations


def intensity_statistics(data: np.ndarray, region: np.ndarray, max_samples: int = 10000,
                         seed: int = 1234) -> list[dict[str, float]]:
    """Per-channel statistics of ``data (C, Z, Y, X)`` inside ``region (Z, Y, X)``: mean, std, median, min,
    max, 0.5th and 99.5th percentiles (percentiles from at most ``max_samples`` seeded voxels)."""
    rng = np.random.RandomState(seed)
    stats = []
    for channel in range(data.shape[0]):
        values = data[channel][region]
        if values.size == 0:
            stats.append({k: float("nan") for k in ("mean", "std", "median", "min", "max", "p00_5", "p99_5")})
            continue
        sample = values if values.size <= max_samples else values[rng.choice(values.size, max_samples, replace=False)]
        stats.append({"mean": float(values.mean(dtype=np.float64)), "std": float(values.std(dtype=np.float64)),
                      "median": float(np.median(sample)), "min": float(values.min()), "max": float(values.max()),
                      "p00_5": float(np.percentile(sample, 0.5)), "p99_5": float(np.percentile(sample, 99.5))})
    return stats


# ----------------------------------------------------------------------------------------------- case

def _read_seg(case: RawCase, image_shape: tuple[int, ...], geometry: ImageGeometry,
              config: PreprocessingConfig) -> np.ndarray:
    seg, seg_geometry = read_image(case.seg_path)
    if seg.shape != image_shape:
        raise ValueError(f"{case.seg_path}: segmentation shape (Z, Y, X) {seg.shape} differs from the image "
                         f"{case.image_paths[0]} {image_shape}")
    problems = geometry.differences(seg_geometry)
    if problems:
        raise ValueError(f"{case.seg_path}: segmentation geometry differs from {case.image_paths[0]}: "
                         + "; ".join(problems))
    if not np.issubdtype(seg.dtype, np.integer):
        if not np.all(np.isfinite(seg)):
            raise ValueError(f"{case.seg_path}: segmentation contains NaN or Inf")
        if not np.array_equal(seg, np.round(seg)):
            raise ValueError(f"{case.seg_path}: segmentation holds non-integer values "
                             f"(is it an image rather than a label map?)")
    seg = seg.astype(np.int64)
    if config.binarize_seg:
        if seg.size and seg.min() < 0:
            raise ValueError(f"{case.seg_path}: mask holds negative values (min {int(seg.min())}); a mask must be "
                             f"0 (background) or > 0 (foreground)")
        seg = (seg > 0).astype(np.int64)
    present = set(np.unique(seg).tolist())
    unexpected = sorted(present - {0, *config.labels})
    if unexpected:
        hint = " (BraTS 2021 and older use 4 for enhancing tumour; BraTS 2023 uses 3)" if 4 in unexpected else ""
        raise ValueError(f"{case.seg_path}: unexpected label values {unexpected}; allowed are 0 and "
                         f"{list(config.labels)}{hint}")
    return seg


def preprocess_case(case: RawCase, config: PreprocessingConfig | None = None
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Preprocess one case; returns ``(data float32 (C, Z, Y, X), seg int8/int16 (1, Z, Y, X), properties)``.

    Errors (``ValueError`` / ``FileNotFoundError`` / ``ImageReadError``) name the offending file.
    """
    config = config or PreprocessingConfig()
    sanitize_case_name(case.name)
    if not case.image_paths:
        raise ValueError(f"case {case.name}: no image files given")
    data, geometry = read_images_as_channels(case.image_paths)
    for channel, path in enumerate(case.image_paths):
        if not np.all(np.isfinite(data[channel])):
            raise ValueError(f"{path}: image contains NaN or Inf voxels")
        if not np.any(data[channel]):
            logger.warning("%s: channel is zero everywhere", path)
    if not np.any(data):
        raise ValueError(f"{case.image_paths[0]}: all channels of case {case.name} are zero everywhere")
    shape_before_cropping = list(data.shape[1:])
    seg = None
    if case.seg_path is not None:
        seg = _read_seg(case, data.shape[1:], geometry, config)[None]

    data, seg, bbox = crop_to_nonzero(data, seg)
    shape_after_cropping = list(data.shape[1:])
    region = seg[0] >= 0
    foreground = seg[0] > 0
    statistics = intensity_statistics(data, region)
    foreground_statistics = intensity_statistics(data, foreground)

    data, norm_stats = zscore_normalize(data, region if config.normalize_with_mask else None)

    spacing_zyx = list(geometry.spacing_zyx)
    target_zyx = list(config.target_spacing_zyx) if config.target_spacing_zyx is not None else spacing_zyx
    new_shape = compute_new_shape(shape_after_cropping, spacing_zyx, target_zyx)
    data = resample_data(data, new_shape, config.data_order)
    seg = resample_seg(seg, new_shape, config.seg_order)

    locations = collect_class_locations(seg, config.labels, config.max_locations_per_class, config.location_seed)
    channel_names = case.channel_names or [f"channel_{i}" for i in range(len(case.image_paths))]
    properties = {
        "name": case.name,
        "channel_names": list(channel_names),
        "labels": [int(label) for label in config.labels],
        **geometry.to_dict(),
        "raw_size_xyz": list(reversed(shape_before_cropping)),
        "shape_before_cropping": shape_before_cropping,
        "bbox_used_for_cropping": bbox,
        "shape_after_cropping_before_resample": shape_after_cropping,
        "original_spacing_zyx": spacing_zyx,
        "target_spacing_zyx": [float(t) for t in target_zyx],
        "shape_after_resample": list(new_shape),
        "normalization": {"scheme": "zscore", "use_mask": bool(config.normalize_with_mask),
                          "per_channel": norm_stats},
        "intensity_statistics": {name: stats for name, stats in zip(channel_names, statistics)},
        "foreground_intensity_statistics": {name: stats for name, stats in zip(channel_names, foreground_statistics)},
        "label_voxel_counts": {str(label): int((seg == label).sum()) for label in config.labels},
        "class_locations": {str(label): coords for label, coords in locations.items()},
        "source_files": {"images": [os.fspath(p) for p in case.image_paths],
                         "seg": os.fspath(case.seg_path) if case.seg_path else None},
    }
    return data, seg, properties


# -------------------------------------------------------------------------------------------- dataset

@dataclass
class PreprocessingReport:
    """Outcome of :func:`preprocess_cases`: names processed now, skipped (already done), failed with reason."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    stopped_early: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _process_and_save(case: RawCase, out_dir: str, config: PreprocessingConfig, overwrite: bool) -> tuple[str, str, str | None]:
    """Worker body: ``(name, status, error)`` with status "done", "skipped" or "failed"; never raises."""
    try:
        if not overwrite and is_case_complete(out_dir, case.name):
            return case.name, "skipped", None
        data, seg, properties = preprocess_case(case, config)
        save_case(out_dir, case.name, data, seg, properties)
        return case.name, "done", None
    except Exception as error:  # reported per case; the run goes on (or stops in strict mode)
        message = str(error) or type(error).__name__
        if not isinstance(error, (ValueError, FileNotFoundError, OSError)):
            message = f"{type(error).__name__}: {message}"
        return case.name, "failed", message


def preprocess_cases(cases: Sequence[RawCase], out_dir: str | os.PathLike, config: PreprocessingConfig | None = None,
                     num_workers: int = 1, overwrite: bool = False, strict: bool = False,
                     progress: bool = True) -> PreprocessingReport:
    """Preprocess ``cases`` into ``out_dir/NAME.npz|json``.

    Args:
        num_workers: processes (spawned); 1 runs in this process.
        overwrite: redo cases whose output already exists (default: skip them; incomplete ones are redone).
        strict: stop at the first failure (raise :class:`PreprocessingError` naming the case) instead of
            going on and listing failures in the report.
    """
    from tqdm.auto import tqdm

    config = config or PreprocessingConfig()
    out_dir = os.fspath(out_dir)
    names = [c.name for c in cases]
    duplicates = sorted(n for n, count in collections.Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"case names occur more than once: {duplicates[:10]}")
    for case in cases:
        sanitize_case_name(case.name)
    os.makedirs(out_dir, exist_ok=True)
    for entry in remove_stale_temporaries(out_dir):
        logger.info("removed unfinished file %s from an interrupted run", entry)
    report = PreprocessingReport()

    def record(name: str, status: str, error: str | None) -> None:
        if status == "done":
            report.done.append(name)
        elif status == "skipped":
            report.skipped.append(name)
        else:
            report.failed[name] = error or "unknown error"
            logger.error("case %s failed: %s", name, error)

    bar = tqdm(total=len(cases), desc="preprocessing", unit="case", disable=not progress)
    try:
        if num_workers <= 1 or len(cases) <= 1:
            for case in cases:
                record(*_process_and_save(case, out_dir, config, overwrite))
                bar.update()
                if strict and report.failed:
                    break
        else:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(max_workers=num_workers, mp_context=context) as pool:
                futures = {pool.submit(_process_and_save, case, out_dir, config, overwrite): case.name
                           for case in cases}
                for future in concurrent.futures.as_completed(futures):
                    try:
                        record(*future.result())
                    except Exception as error:  # the worker process itself died (e.g. out of memory)
                        record(futures[future], "failed", f"worker process died: {error}")
                    bar.update()
                    if strict and report.failed:
                        for other in futures:
                            other.cancel()
                        break
    finally:
        bar.close()
    report.done.sort()
    report.skipped.sort()
    if strict and report.failed:
        report.stopped_early = True
        name, message = next(iter(report.failed.items()))
        raise PreprocessingError(f"case {name} failed (strict mode, stopped): {message}")
    return report


def _spread(values: Sequence[Sequence[float]]) -> dict[str, list[float]]:
    array = np.asarray(values, dtype=np.float64)
    return {"median": np.median(array, axis=0).tolist(), "min": array.min(axis=0).tolist(),
            "max": array.max(axis=0).tolist()}


def dataset_summary(out_dir: str | os.PathLike, names: Sequence[str],
                    failed: dict[str, str] | None = None) -> dict[str, Any]:
    """Summary of preprocessed cases from their JSON properties: spacings, shapes (median/min/max per
    axis), per-channel raw intensity statistics inside the non-zero region (mean over cases), label voxel
    counts, failures."""
    properties = [load_case_properties(case_paths(out_dir, n)[0]) for n in names]
    summary: dict[str, Any] = {"n_cases": len(properties), "n_failed": len(failed or {}),
                               "failed": dict(failed or {})}
    if not properties:
        return summary
    channel_names = properties[0]["channel_names"]
    summary.update({
        "channel_names": channel_names,
        "target_spacing_zyx": properties[0]["target_spacing_zyx"],
        "normalization": {k: v for k, v in properties[0]["normalization"].items() if k != "per_channel"},
        "original_spacing_zyx": _spread([p["original_spacing_zyx"] for p in properties]),
        "shape_before_cropping": _spread([p["shape_before_cropping"] for p in properties]),
        "shape_after_cropping": _spread([p["shape_after_cropping_before_resample"] for p in properties]),
        "shape_after_resample": _spread([p["shape_after_resample"] for p in properties]),
    })
    intensities = {}
    for channel in channel_names:
        per_case = [p["intensity_statistics"][channel] for p in properties]
        intensities[channel] = {key: float(np.nanmean([s[key] if s[key] is not None else math.nan for s in per_case]))
                                for key in ("mean", "std", "median", "min", "max", "p00_5", "p99_5")}
    summary["intensity_statistics_mean_over_cases"] = intensities
    labels = properties[0].get("labels", [])
    summary["label_voxel_counts_total"] = {str(l): int(sum(p["label_voxel_counts"].get(str(l), 0) for p in properties))
                                           for l in labels}
    summary["cases_without_label"] = {str(l): sorted(p["name"] for p in properties
                                                    if p["label_voxel_counts"].get(str(l), 0) == 0) for l in labels}
    summary["cases"] = {p["name"]: {"original_spacing_zyx": p["original_spacing_zyx"],
                                    "shape_before_cropping": p["shape_before_cropping"],
                                    "shape_after_resample": p["shape_after_resample"]} for p in properties}
    return summary


def format_summary_table(summary: dict[str, Any]) -> str:
    """Plain-text table of a :func:`dataset_summary` for the terminal."""
    lines = [f"cases: {summary['n_cases']} preprocessed, {summary['n_failed']} failed"]
    if summary["n_cases"] == 0:
        return "\n".join(lines)
    fmt = lambda values: " x ".join(f"{v:g}" for v in values)  # noqa: E731
    lines.append(f"{'(Z x Y x X)':<28}{'median':>22}{'min':>22}{'max':>22}")
    for key, title in [("original_spacing_zyx", "spacing (mm)"), ("shape_before_cropping", "shape raw"),
                       ("shape_after_cropping", "shape cropped"), ("shape_after_resample", "shape resampled")]:
        spread = summary[key]
        lines.append(f"{title:<28}{fmt(spread['median']):>22}{fmt(spread['min']):>22}{fmt(spread['max']):>22}")
    lines.append(f"target spacing (mm): {fmt(summary['target_spacing_zyx'])}; normalisation: z-score "
                 f"{'inside the non-zero region' if summary['normalization']['use_mask'] else 'over the cropped volume'}")
    lines.append(f"{'raw (non-zero)':<16}{'mean':>12}{'std':>12}{'p0.5':>12}{'median':>12}{'p99.5':>12}")
    for channel, stats in summary["intensity_statistics_mean_over_cases"].items():
        lines.append(f"{channel:<16}" + "".join(f"{stats[k]:>12.4g}" for k in ("mean", "std", "p00_5", "median", "p99_5")))
    for label, count in summary["label_voxel_counts_total"].items():
        missing = summary["cases_without_label"][label]
        lines.append(f"label {label}: {count} voxels in total, absent from {len(missing)} case(s)")
    return "\n".join(lines)
