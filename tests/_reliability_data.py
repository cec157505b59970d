"""Tiny inputs and fault injectors shared by the reliability tests (tests/test_reliability_*.py).

Every builder writes real files in the layouts the scripts read (raw BraTS folders, raw ABUS NRRD folders,
checkpoints in the trainer's format); every injector breaks one file the way it breaks in practice.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from light_training.io import ImageGeometry, load_case, read_image, save_case, write_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BRATS_MODALITIES = ("t2w", "t2f", "t1n", "t1c")
TINY_SEGMAMBA = {"depths": [1, 1, 1, 1], "feat_size": [8, 16, 32, 64], "hidden_size": 32}
TINY_FLAGS = ["--depths", "1", "1", "1", "1", "--feat_size", "8", "16", "32", "64", "--hidden_size", "32"]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per test (import it into a test module to apply it there): tiny tensors run faster
    on the shared 2-core CI machine, and the killed-and-resumed training runs are subprocesses with
    OMP_NUM_THREADS=1, so the in-process reference runs do the same arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_script(filename: str):
    """Import a script (``3_train.py`` is not an importable module name) so that tests can call ``main(argv)``."""
    module_name = "reliability_" + os.path.basename(filename)[:-3].replace("-", "_")
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(ROOT, filename))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------- BraTS raw
def write_brats_case(folder, seed: int = 0, shape=(16, 16, 16), spacing=(1.0, 1.0, 1.0)) -> None:
    """A raw BraTS case with short names: 4 modalities (a bright ball in a zero background) + seg 0/1/2/3."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    centre = np.asarray(shape) / 2
    distance = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
    brain = distance < min(shape) / 2 - 1
    geometry = ImageGeometry(spacing, (1.0, -2.0, 3.0))
    for index, modality in enumerate(BRATS_MODALITIES):
        image = np.where(brain, rng.uniform(50, 100, shape) + 20 * index, 0).astype(np.float32)
        write_image(image, os.path.join(folder, f"{modality}.nii.gz"), geometry)
    seg = np.zeros(shape, np.uint8)
    seg[distance < 4] = 2
    seg[distance < 2.5] = 1
    seg[distance < 1.5] = 3
    write_image(seg, os.path.join(folder, "seg.nii.gz"), geometry)


def make_brats_raw(root, n_cases: int = 3, shape=(16, 16, 16)) -> list[str]:
    names = [f"BraTS-GLI-{index:05d}-000" for index in range(n_cases)]
    for index, name in enumerate(names):
        write_brats_case(os.path.join(root, name), seed=index, shape=shape)
    return names


def preprocess_brats(raw, out, *extra) -> int:
    """Runs step 2 (``2_preprocessing_mri.py``) on raw BraTS folders in one process, without progress bars;
    returns its exit code."""
    return load_script("2_preprocessing_mri.py").main(
        ["--data_dir", str(raw), "--output_dir", str(out), "--num_processes", "1", "--no_progress", *extra])


# ------------------------------------------------------------------------------------------------ ABUS raw
def make_abus_raw(root, num_cases: int = 4, shape=(16, 24, 24), without: int = 0) -> None:
    from tools.make_abus_demo import generate
    generate(str(root), num_cases=num_cases, num_without_lesion=without, shape_zyx=shape, seed=5, progress=False)


def preprocess_abus(raw, out, train_ratio: float, val_ratio: float, *extra) -> int:
    """Runs ``abus_preprocessing.py`` on a raw ABUS folder in one process, without progress bars; returns its
    exit code."""
    return load_script("abus_preprocessing.py").main(
        ["--abus_root", str(raw), "--output_base", str(out), "--num_processes", "1", "--train_ratio",
         str(train_ratio), "--val_ratio", str(val_ratio), "--no_progress", *extra])


def abus_files(root, case_id: str):
    """``(image path, mask path)`` of a raw ABUS case, whatever folder the generator put it in."""
    for folder in ("Train", "Validation", "Test"):
        image = os.path.join(root, "data", folder, "DATA", f"DATA_{case_id}.nrrd")
        if os.path.isfile(image):
            return image, os.path.join(root, "data", folder, "MASK", f"MASK_{case_id}.nrrd")
    raise FileNotFoundError(case_id)


# --------------------------------------------------------------------------------------------- checkpoints
def tiny_segmamba_checkpoint(path, in_chans: int = 4, out_chans: int = 4, bare: bool = False, **overrides) -> dict:
    """A SegMamba checkpoint in the trainer's format (``bare``: the reference's plain state dict)."""
    from light_training.checkpoint import CHECKPOINT_FORMAT, save_checkpoint_atomic
    from model_segmamba import SegMamba

    config = {"in_chans": in_chans, "out_chans": out_chans, **TINY_SEGMAMBA, **overrides}
    torch.manual_seed(0)
    model = SegMamba(**config)
    state = model.state_dict() if bare else {"format": CHECKPOINT_FORMAT, "model": model.state_dict(),
                                            "model_config": config, "epoch": 0}
    if bare:
        torch.save(state, path)
    else:
        save_checkpoint_atomic(state, path)
    return config


def tiny_retina_checkpoint(path, patch=(32, 32, 32)) -> None:
    from light_training.checkpoint import CHECKPOINT_FORMAT, save_checkpoint_atomic
    from model_segmamba.segmamba_retina import SegMambaWithRetina

    torch.manual_seed(0)
    model = SegMambaWithRetina(in_chans=1, out_chans=2, fpn_channels=8, num_head_convs=1, **TINY_SEGMAMBA)
    save_checkpoint_atomic({"format": CHECKPOINT_FORMAT, "model": model.state_dict(),
                            "model_config": model.model_config(), "inference": {"patch_size": list(patch)}},
                           path)


# ------------------------------------------------------------------------------------------ fault injectors
def truncate(path, keep: float = 0.5) -> None:
    """Cut the file (an interrupted copy or download)."""
    content = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(content[:int(len(content) * keep)])


def not_an_image(path) -> None:
    """Text behind an image extension (an HTML error page saved as .nii.gz, say)."""
    with open(path, "w") as handle:
        handle.write("<html>404 Not Found</html>\n")


def rewrite(path, transform, geometry_transform=None) -> None:
    """Read an image, change its array (and geometry) and write it back under the same name."""
    array, geometry = read_image(path)
    write_image(transform(array), path, geometry_transform(geometry) if geometry_transform else geometry)


def write_2d(path) -> None:
    array, _ = read_image(path)
    sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(array[array.shape[0] // 2])), str(path))


def write_4d(path) -> None:
    array, _ = read_image(path)
    image = sitk.JoinSeries([sitk.GetImageFromArray(np.ascontiguousarray(array))] * 2)
    sitk.WriteImage(image, str(path))


def with_nan(array: np.ndarray) -> np.ndarray:
    array = array.astype(np.float32)
    array[tuple(s // 2 for s in array.shape)] = np.nan
    return array


def other_spacing(geometry: ImageGeometry) -> ImageGeometry:
    return ImageGeometry(tuple(s * 1.5 for s in geometry.spacing_xyz), geometry.origin_xyz, geometry.direction)


def cropped(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array[:-2])


def rewrite_case(npz_path, **arrays) -> None:
    """Replace arrays of a preprocessed case (``data=...``, ``seg=...``), keeping its properties."""
    npz_path = os.fspath(npz_path)
    data, seg, properties = load_case(npz_path)
    updated = {"data": data, "seg": seg, **arrays}
    save_case(os.path.dirname(npz_path), os.path.basename(npz_path)[:-4], updated["data"], updated["seg"],
              properties)
