"""Image and preprocessed-case I/O.

* Images (.nii.gz, .nii, .nrrd, .mha, .mhd) are read and written with SimpleITK. Arrays are ``(Z, Y, X)``;
  SimpleITK's spacing/origin are ``(x, y, z)``; :class:`ImageGeometry` carries them unchanged so a written
  image lands exactly where the input was (spacing, origin and direction are all kept).
* A preprocessed case is ``NAME.npz`` (``data`` float32 ``(C, Z, Y, X)``, ``seg`` int8/int16 ``(1, Z, Y, X)``)
  plus ``NAME.json`` (properties, plain JSON). No pickle is ever used to read them back.
"""
from __future__ import annotations

import math
import os
import re
import zipfile
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from light_training.utils.files import atomic_path, dumps_readable_json, load_json

__all__ = ["ImageGeometry", "ImageReadError", "read_image", "read_label_image", "write_image", "image_geometry",
           "sanitize_case_name", "save_case", "load_case", "load_case_properties", "case_paths",
           "is_case_complete", "read_images_as_channels", "check_finite_input", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


class ImageReadError(ValueError):
    """An image file exists but cannot be used (corrupt, not an image, wrong dimensionality...)."""


@dataclass(frozen=True)
class ImageGeometry:
    """Physical placement of a 3D image, in SimpleITK's convention.

    Attributes:
        spacing_xyz: voxel size in mm along x, y, z (array axes 2, 1, 0).
        origin_xyz: physical position of voxel (0, 0, 0) in mm.
        direction: 3x3 direction cosine matrix, row-major, 9 floats.
    """

    spacing_xyz: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin_xyz: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing_xyz", tuple(float(v) for v in self.spacing_xyz))
        object.__setattr__(self, "origin_xyz", tuple(float(v) for v in self.origin_xyz))
        object.__setattr__(self, "direction", tuple(float(v) for v in np.ravel(self.direction)))
        if len(self.spacing_xyz) != 3 or len(self.origin_xyz) != 3 or len(self.direction) != 9:
            raise ValueError(f"ImageGeometry needs 3 spacings, 3 origin values and 9 direction values, got "
                             f"{self.spacing_xyz}, {self.origin_xyz}, {self.direction}")
        if not all(math.isfinite(s) and s > 0 for s in self.spacing_xyz):
            raise ValueError(f"ImageGeometry spacing must be finite and positive, got {self.spacing_xyz}")

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Spacing in array-axis order (Z, Y, X)."""
        return tuple(reversed(self.spacing_xyz))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, list[float]]:
        return {"spacing_xyz": list(self.spacing_xyz), "origin_xyz": list(self.origin_xyz),
                "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ImageGeometry":
        return cls(spacing_xyz=values["spacing_xyz"], origin_xyz=values["origin_xyz"],
                   direction=values["direction"])

    def differences(self, other: "ImageGeometry", spacing_tol: float = 1e-3, origin_tol: float = 1e-2,
                    direction_tol: float = 1e-3) -> list[str]:
        """Human-readable list of the ways ``other`` differs from this geometry (empty when they match).

        Tolerances are absolute (mm for spacing/origin); headers written by different tools round differently.
        """
        problems = []
        if not np.allclose(self.spacing_xyz, other.spacing_xyz, rtol=0, atol=spacing_tol):
            problems.append(f"spacing {self.spacing_xyz} vs {other.spacing_xyz}")
        if not np.allclose(self.origin_xyz, other.origin_xyz, rtol=0, atol=origin_tol):
            problems.append(f"origin {self.origin_xyz} vs {other.origin_xyz}")
        if not np.allclose(self.direction, other.direction, rtol=0, atol=direction_tol):
            problems.append(f"direction {self.direction} vs {other.direction}")
        return problems


def _sitk():
    import SimpleITK as sitk  # imported lazily: only image I/O needs it
    return sitk


def _has_image_extension(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def image_geometry(path: str | os.PathLike) -> tuple[tuple[int, int, int], ImageGeometry]:
    """Read only the header: ``(size_zyx, geometry)``. Same errors as :func:`read_image`."""
    sitk = _sitk()
    path = os.fspath(path)
    _check_readable(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise ImageReadError(f"{path}: cannot read image header ({_short_itk_error(error)})") from error
    if reader.GetDimension() != 3:
        raise ImageReadError(f"{path}: expected a 3D image, got {reader.GetDimension()}D "
                             f"(size {reader.GetSize()})")
    geometry = ImageGeometry(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
    return tuple(reversed(reader.GetSize())), geometry  # type: ignore[return-value]


def _check_readable(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: file not found")
    if os.path.isdir(path):
        raise ImageReadError(f"{path}: is a directory, expected an image file")
    if os.path.getsize(path) == 0:
        raise ImageReadError(f"{path}: file is empty (0 bytes)")


def _verify_nifti_complete(path: str) -> None:
    """Raise ``ImageReadError`` when a NIfTI file holds fewer voxel bytes than its header announces.

    SimpleITK silently fills missing voxels of a truncated .nii/.nii.gz with zeros (and reads NaN as 0),
    so check it ourselves; also raises when a floating-point image holds NaN/Inf voxels.
    """
    import gzip
    import zlib

    import nibabel

    if path.lower().endswith(".gz"):
        total = 0
        try:
            with gzip.open(path, "rb") as handle:
                while True:
                    chunk = handle.read(1 << 22)
                    if not chunk:
                        break
                    total += len(chunk)
        except (EOFError, OSError, zlib.error) as error:
            raise ImageReadError(f"{path}: the compressed file is truncated or corrupt ({error})") from error
    else:
        total = os.path.getsize(path)
    try:
        nifti = nibabel.load(path)
        # dataobj.offset is where voxels start (nibabel resets the header's vox_offset field on load).
        expected = int(nifti.dataobj.offset) + int(np.prod(nifti.header.get_data_shape(), dtype=np.int64)) * \
            int(nifti.header.get_data_dtype().itemsize)
    except Exception as error:  # nibabel raises many types for non-NIfTI content
        raise ImageReadError(f"{path}: not a valid NIfTI file ({error})") from error
    if total < expected:
        raise ImageReadError(f"{path}: file is truncated: the header announces {expected} bytes of header+voxels, "
                             f"the file holds {total}")
    if nifti.header.get_data_dtype().kind == "f":
        # ITK's NIfTI reader turns NaN into 0 without a word; look at the raw floats ourselves.
        raw = np.asarray(nifti.dataobj.get_unscaled())
        bad = int(np.count_nonzero(~np.isfinite(raw)))
        if bad:
            raise ImageReadError(f"{path}: image contains {bad} NaN or Inf voxel(s)")


def _short_itk_error(error: Exception) -> str:
    # ITK messages are long multi-line dumps; keep the line that says what went wrong.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "Description" in line or "error" in line.lower():
            return line.replace("Description:", "").strip()
    return lines[-1] if lines else type(error).__name__


def read_image(path: str | os.PathLike, dtype: Any = None) -> tuple[np.ndarray, ImageGeometry]:
    """Read a 3D scalar image.

    Args:
        path: .nii.gz/.nii/.nrrd/.mha/.mhd file.
        dtype: optional numpy dtype to cast to (default: the stored pixel type).

    Returns:
        ``(array (Z, Y, X), geometry)``.

    Raises:
        FileNotFoundError: the file does not exist.
        ImageReadError: unreadable/corrupt/not an image, not 3D, or a vector (multi-component) image.
        All messages start with the file path.
    """
    sitk = _sitk()
    path = os.fspath(path)
    _check_readable(path)
    try:
        image = sitk.ReadImage(path)
    except RuntimeError as error:
        raise ImageReadError(f"{path}: cannot read image, the file is corrupt, truncated or not an image "
                             f"({_short_itk_error(error)})") from error
    if image.GetDimension() != 3:
        raise ImageReadError(f"{path}: expected a 3D image, got {image.GetDimension()}D (size {image.GetSize()})")
    if path.lower().endswith((".nii", ".nii.gz")):
        _verify_nifti_complete(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(f"{path}: expected a scalar image, got a vector image with "
                             f"{image.GetNumberOfComponentsPerPixel()} components per voxel "
                             f"(size {image.GetSize()}); store one 3D file per channel")
    try:
        array = sitk.GetArrayFromImage(image)
    except RuntimeError as error:  # pixel data shorter than the header says (truncated file)
        raise ImageReadError(f"{path}: cannot decode voxel data ({_short_itk_error(error)})") from error
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    geometry = ImageGeometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    return array, geometry


def _values_present(array: np.ndarray) -> list:
    """Sorted distinct values of an integer array (bincount for small ranges: much faster than np.unique)."""
    if array.size == 0:
        return []
    lo, hi = int(array.min()), int(array.max())
    if hi - lo <= 65535:
        counts = np.bincount((array.ravel() - lo).astype(np.int64, copy=False), minlength=hi - lo + 1)
        return [int(v) + lo for v in np.flatnonzero(counts)]
    return [int(v) for v in np.unique(array)]


def read_label_image(path: str | os.PathLike, labels: Sequence[int] | None = None,
                     what: str = "label map") -> tuple[np.ndarray, ImageGeometry]:
    """Read a 3D label map and check that it is one: finite, integer-valued and within ``labels``.

    Args:
        labels: the allowed values (e.g. ``(0, 1, 2, 3)`` for BraTS); None allows any value >= 0 (masks where
            every value > 0 marks the structure, such as ABUS masks stored as 0/255).
        what: how the file is called in error messages ("prediction", "ground truth", ...).

    Returns:
        ``(integer array (Z, Y, X), geometry)``; floating-point files holding whole numbers come back as int32.

    Raises:
        FileNotFoundError / ImageReadError (a ValueError): the message starts with the path and says what is
        wrong (the problems of :func:`read_image`, NaN/Inf, fractional values, unexpected label values).
    """
    path = os.fspath(path)
    array, geometry = read_image(path)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif not np.issubdtype(array.dtype, np.integer):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise ImageReadError(f"{path}: {what} contains {bad} NaN or Inf voxel(s)")
        if not np.array_equal(array, np.round(array)):
            raise ImageReadError(f"{path}: {what} holds non-integer values (an intensity image rather than a "
                                 f"label map?)")
        array = array.astype(np.int32)
    present = _values_present(array)
    if labels is not None:
        unexpected = sorted(set(present) - {int(v) for v in labels})
        if unexpected:
            raise ImageReadError(f"{path}: {what} holds unexpected label values {unexpected[:10]}; allowed are "
                                 f"{sorted(int(v) for v in labels)}")
    elif present and present[0] < 0:
        raise ImageReadError(f"{path}: {what} holds negative values {[v for v in present if v < 0][:10]}; "
                             f"a mask must be 0 (background) or > 0")
    return array, geometry


def write_image(array: np.ndarray, path: str | os.PathLike, geometry: ImageGeometry | None = None,
                compress: bool = True) -> None:
    """Write a 3D array ``(Z, Y, X)`` as an image with the given geometry, atomically.

    Boolean arrays are stored as uint8 and int64 as int32 (widely readable pixel types); other dtypes are kept.
    The file format follows the extension of ``path``.
    """
    sitk = _sitk()
    path = os.fspath(path)
    if not _has_image_extension(path):
        raise ValueError(f"{path}: unsupported image extension, use one of {', '.join(IMAGE_EXTENSIONS)}")
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"{path}: write_image expects a 3D (Z, Y, X) array, got shape {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif array.dtype == np.int64:
        if array.size and (array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max):
            raise ValueError(f"{path}: int64 values do not fit in int32")
        array = array.astype(np.int32)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=False)
    geometry = geometry or ImageGeometry()
    image.SetSpacing(geometry.spacing_xyz)
    image.SetOrigin(geometry.origin_xyz)
    image.SetDirection(geometry.direction)
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(image, tmp, compress)
        except RuntimeError as error:
            raise OSError(f"{path}: cannot write image ({_short_itk_error(error)})") from error


# ------------------------------------------------------------------------------------------------ cases

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def sanitize_case_name(name: str) -> str:
    """Return ``name`` if it is a safe file stem, else raise ``ValueError``.

    Allowed: letters, digits, '.', '_', '-', not starting with '.' or '-', no path separators, no '..'.
    Case names become file names inside output folders, so this keeps outputs inside them.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"invalid case name {name!r}: must be a non-empty string")
    if "/" in name or "\\" in name or ".." in name or not _SAFE_NAME.match(name):
        raise ValueError(f"invalid case name {name!r}: use only letters, digits, '.', '_' and '-' "
                         f"(no path separators, no '..', not starting with '.' or '-')")
    return name


def case_paths(out_dir: str | os.PathLike, name: str) -> tuple[str, str]:
    """``(NAME.npz, NAME.json)`` paths of a case inside ``out_dir`` (name checked)."""
    name = sanitize_case_name(name)
    out_dir = os.fspath(out_dir)
    return os.path.join(out_dir, name + ".npz"), os.path.join(out_dir, name + ".json")


def is_case_complete(out_dir: str | os.PathLike, name: str) -> bool:
    """True when both files of the case exist (the JSON is written last, so it marks completion)."""
    npz_path, json_path = case_paths(out_dir, name)
    return os.path.isfile(npz_path) and os.path.isfile(json_path)


def _seg_storage_dtype(seg: np.ndarray) -> np.dtype:
    if seg.size == 0:
        return np.dtype(np.int8)
    lo, hi = int(seg.min()), int(seg.max())
    if lo >= -128 and hi <= 127:
        return np.dtype(np.int8)
    if lo >= -32768 and hi <= 32767:
        return np.dtype(np.int16)
    return np.dtype(np.int32)


def save_case(out_dir: str | os.PathLike, name: str, data: np.ndarray, seg: np.ndarray | None,
              props: dict[str, Any]) -> tuple[str, str]:
    """Write a preprocessed case as ``NAME.npz`` (compressed, keys ``data``/``seg``) + ``NAME.json``.

    Args:
        data: ``(C, Z, Y, X)`` image channels, stored as float32.
        seg: ``(1, Z, Y, X)`` integer labels (``-1`` = outside the image region) or None (unlabelled case);
            stored as int8 (int16/int32 when the labels need it).
        props: JSON-serialisable properties (numpy values are converted); ``name`` is set to ``name``.

    Both files are written atomically; the JSON is written last so its presence marks a complete case.
    Returns the two paths.
    """
    npz_path, json_path = case_paths(out_dir, name)
    data = np.asarray(data)
    if data.ndim != 4:
        raise ValueError(f"case {name}: data must be (C, Z, Y, X), got shape {data.shape}")
    arrays = {"data": data.astype(np.float32, copy=False)}
    if seg is not None:
        seg = np.asarray(seg)
        if seg.ndim != 4 or seg.shape[0] != 1 or seg.shape[1:] != data.shape[1:]:
            raise ValueError(f"case {name}: seg must be (1, Z, Y, X) matching data {data.shape}, got {seg.shape}")
        if not np.issubdtype(seg.dtype, np.integer):
            if not np.all(np.isfinite(seg)) or not np.array_equal(seg, np.round(seg)):
                raise ValueError(f"case {name}: seg must hold integer labels")
        arrays["seg"] = seg.astype(_seg_storage_dtype(seg), copy=False)
    props = dict(props)
    props["name"] = name
    text = dumps_readable_json(props)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(json_path):
        # Overwriting: drop the old JSON first so a crash between the two writes leaves an incomplete case
        # (redone on the next run), never a new .npz paired with old properties.
        os.remove(json_path)
    with atomic_path(npz_path) as tmp:
        np.savez_compressed(tmp, **arrays)
    with atomic_path(json_path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
    return npz_path, json_path


def load_case_properties(npz_path: str | os.PathLike) -> dict[str, Any]:
    """Read the ``NAME.json`` that belongs to ``NAME.npz``."""
    npz_path = os.fspath(npz_path)
    if not npz_path.endswith(".npz"):
        raise ValueError(f"{npz_path}: expected a .npz case file")
    return load_json(npz_path[:-4] + ".json")


def load_case(npz_path: str | os.PathLike, load_seg: bool = True,
              load_properties: bool = True) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any] | None]:
    """Load a preprocessed case without pickle.

    Returns:
        ``(data float32 (C, Z, Y, X), seg (1, Z, Y, X) or None, properties dict or None)``. ``seg`` is None
        when the file has none or ``load_seg`` is False; properties are None when ``load_properties`` is False.
    """
    npz_path = os.fspath(npz_path)
    if not os.path.isfile(npz_path):
        raise FileNotFoundError(f"{npz_path}: preprocessed case not found")
    if not zipfile.is_zipfile(npz_path):
        # np.load would try to unpickle anything that is not a zip/.npy file and say "pickled data" instead
        raise ValueError(f"{npz_path}: cannot read preprocessed case, the file is corrupt or truncated (not a "
                         f".npz archive); delete it and re-run preprocessing")
    try:
        with np.load(npz_path, allow_pickle=False) as archive:
            if "data" not in archive.files:
                raise ValueError(f"{npz_path}: no 'data' array in the file (keys: {archive.files})")
            data = archive["data"]
            seg = archive["seg"] if (load_seg and "seg" in archive.files) else None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        if isinstance(error, ValueError) and str(error).startswith(npz_path):
            raise
        if isinstance(error, ValueError) and "pickle" in str(error):
            raise ValueError(f"{npz_path}: holds pickled Python objects, which are never loaded (a preprocessed "
                             f"case has plain numeric arrays only)") from error
        raise ValueError(f"{npz_path}: cannot read preprocessed case, the file is corrupt or truncated "
                         f"({error}); delete it and re-run preprocessing") from error
    if data.ndim != 4:
        raise ValueError(f"{npz_path}: 'data' must be (C, Z, Y, X), got shape {data.shape}")
    if seg is not None and seg.shape != (1,) + data.shape[1:]:
        raise ValueError(f"{npz_path}: 'seg' shape {seg.shape} does not match data {data.shape}")
    props = load_case_properties(npz_path) if load_properties else None
    return data.astype(np.float32, copy=False), seg, props


def check_finite_input(data: np.ndarray, source: str | os.PathLike) -> None:
    """Raise ``ValueError`` naming ``source`` when the array holds NaN or Inf (a model would turn them into a
    silently wrong prediction)."""
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise ValueError(f"{os.fspath(source)}: the image data hold {bad} NaN or Inf value(s); re-run the "
                         f"preprocessing for this case")


def read_images_as_channels(paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, ImageGeometry]:
    """Read co-registered 3D images into one ``(C, Z, Y, X)`` float32 array.

    All images must have the same size, spacing, origin and direction (else ``ImageReadError`` naming
    the first file and the one that differs).
    """
    arrays, reference = [], None
    for path in paths:
        array, geometry = read_image(path)
        if reference is None:
            reference = (paths[0], array.shape, geometry)
        else:
            ref_path, ref_shape, ref_geometry = reference
            if array.shape != ref_shape:
                raise ImageReadError(f"{path}: shape (Z, Y, X) {array.shape} differs from {ref_path} {ref_shape}")
            problems = ref_geometry.differences(geometry)
            if problems:
                raise ImageReadError(f"{path}: geometry differs from {ref_path}: " + "; ".join(problems))
        arrays.append(array.astype(np.float32, copy=False))
    if reference is None:
        raise ValueError("read_images_as_channels: no image paths given")
    return np.stack(arrays), reference[2]
