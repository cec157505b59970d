#!/usr/bin/env python
"""Generate a small synthetic BraTS-2023-like dataset in the real raw layout.

Each case is a folder ``BraTS-GLI-NNNNN-000/`` with the long BraTS 2023 file names
``BraTS-GLI-NNNNN-000-{t1c,t1n,t2f,t2w,seg}.nii.gz`` (so ``1_rename_mri_data.py`` has work to do):

* a skull-stripped ellipsoid "brain" (zero background) with white matter, grey matter and ventricles,
  smooth tissue texture, a bias field and noise; the four modalities have different contrasts
  (T1: white matter bright; T1c: enhancing tumour bright; T2: fluid bright; FLAIR: oedema bright, fluid dark);
* a tumour of random size and position: necrotic core NCR (label 1) inside an enhancing rim ET (label 3)
  inside oedema ED (label 2), with irregular borders;
* realistic headers: 1 mm or slightly anisotropic spacing, a non-zero origin and a flipped (LPS-style)
  direction, int16 images and a uint8 label map.

Everything is seeded: the same flags give the same files. Example::

    python tools/make_brats_demo.py --n_cases 8 --shape 48 64 64
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from light_training.io import ImageGeometry, write_image  # noqa: E402

# Defaults (edit here or pass the flags).
OUT_DIR = "./data/raw_data/BraTS2023/ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData"
N_CASES = 8
SHAPE_ZYX = (48, 64, 64)
SEED = 0

MODALITIES = ("t1c", "t1n", "t2f", "t2w")
# Relative intensities per tissue: white matter, grey matter, CSF, oedema, necrosis, enhancing tumour.
TISSUE_CONTRAST = {
    "t1n": (0.85, 0.62, 0.22, 0.52, 0.32, 0.58),
    "t1c": (0.85, 0.62, 0.22, 0.55, 0.28, 1.35),
    "t2w": (0.42, 0.62, 1.30, 1.00, 1.20, 0.78),
    "t2f": (0.48, 0.62, 0.12, 1.30, 0.70, 1.00),
}
INTENSITY_SCALE = {"t1n": 600.0, "t1c": 700.0, "t2w": 900.0, "t2f": 500.0}
SPACING_CHOICES_XYZ = ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (0.9, 0.9, 1.1))


def case_name(index: int) -> str:
    return f"BraTS-GLI-{index:05d}-000"


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std random field with correlation length ~sigma voxels."""
    from scipy.ndimage import gaussian_filter
    field = gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-8)


def _ellipsoid_distance(grid: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Normalised ellipsoid distance: < 1 inside. ``grid`` is (3, Z, Y, X) voxel coordinates."""
    return np.sqrt(sum(((grid[a] - centre[a]) / radii[a]) ** 2 for a in range(3)))


def make_case(rng: np.random.Generator, shape_zyx: tuple[int, int, int]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One synthetic case: ``({modality: int16 (Z, Y, X)}, uint8 label map (Z, Y, X))``."""
    from scipy.ndimage import gaussian_filter
    shape = tuple(int(s) for s in shape_zyx)
    grid = np.indices(shape).astype(np.float32)
    size = np.array(shape, np.float32)

    # Brain: a slightly irregular ellipsoid filling most of the field of view.
    centre = size / 2 + rng.uniform(-0.04, 0.04, 3) * size
    radii = size * rng.uniform([0.36, 0.38, 0.34], [0.42, 0.44, 0.40])
    brain_distance = _ellipsoid_distance(grid, centre, radii) + 0.05 * _smooth_field(rng, shape, 6)
    brain = brain_distance < 1.0

    texture = _smooth_field(rng, shape, 2.5)
    white_matter = brain & (brain_distance < 0.78) & (texture > -0.3)
    ventricles = np.zeros(shape, bool)
    for side in (-1, 1):
        v_centre = centre + np.array([0.0, -0.05 * size[1], side * 0.09 * size[2]])
        v_radii = np.array([0.12, 0.16, 0.05]) * size
        ventricles |= _ellipsoid_distance(grid, v_centre, v_radii) < 1.0
    ventricles &= brain

    # Tumour: centre well inside the brain, oedema of random radius, rim of enhancement around a necrotic core.
    for _ in range(100):
        t_centre = centre + rng.uniform(-0.45, 0.45, 3) * radii
        if _ellipsoid_distance(t_centre[:, None, None, None], centre, radii)[0, 0, 0] < 0.55:
            break
    scale = max(0.5, min(shape) / 48.0)  # tiny test volumes still get a tumour of a few voxels per label
    edema_radii = rng.uniform(7.0, 12.0, 3) * scale
    tumour_distance = _ellipsoid_distance(grid, t_centre, edema_radii) + 0.08 * _smooth_field(rng, shape, 2.0)
    enhancing_outer = rng.uniform(0.55, 0.7)
    necrosis_outer = enhancing_outer * rng.uniform(0.5, 0.7)
    labels = np.zeros(shape, np.uint8)
    labels[(tumour_distance < 1.0) & brain] = 2
    labels[(tumour_distance < enhancing_outer) & brain] = 3
    labels[(tumour_distance < necrosis_outer) & brain] = 1

    # Tissue index: 0 WM, 1 GM, 2 CSF, 3 ED, 4 NCR, 5 ET (tumour overrides normal tissue).
    tissue = np.where(white_matter, 0, 1)
    tissue[ventricles] = 2
    tissue[labels == 2], tissue[labels == 1], tissue[labels == 3] = 3, 4, 5

    bias = 1.0 + 0.08 * _smooth_field(rng, shape, 10)
    images = {}
    for modality in MODALITIES:
        contrast = np.asarray(TISSUE_CONTRAST[modality], np.float32) * rng.uniform(0.95, 1.05, 6)
        image = contrast[tissue] * (1.0 + 0.06 * texture)
        image = gaussian_filter(image, 0.6) * bias
        image = image + rng.normal(0.0, 0.03, shape)
        image = np.clip(image, 0.01, None) * INTENSITY_SCALE[modality] * rng.uniform(0.9, 1.1)
        image[~brain] = 0.0  # skull-stripped: background exactly zero
        images[modality] = np.round(image).astype(np.int16)
    return images, labels


def case_geometry(rng: np.random.Generator, shape_zyx: tuple[int, int, int]) -> ImageGeometry:
    spacing = SPACING_CHOICES_XYZ[int(rng.integers(len(SPACING_CHOICES_XYZ)))]
    size_xyz = np.array(shape_zyx[::-1], np.float64)
    # LPS-style header as BraTS files read through ITK: x and y axes flipped, origin at a corner.
    origin = (size_xyz * spacing / 2) * np.array([1.0, 1.0, -1.0]) + rng.uniform(-5, 5, 3)
    return ImageGeometry(spacing, tuple(np.round(origin, 3)), (-1, 0, 0, 0, -1, 0, 0, 0, 1))


def make_brats_demo(out_dir: str, n_cases: int = N_CASES, shape_zyx: tuple[int, int, int] = SHAPE_ZYX,
                    seed: int = SEED, overwrite: bool = False, progress: bool = True) -> list[str]:
    """Write ``n_cases`` synthetic cases into ``out_dir``; returns the case names (existing complete cases are
    kept unless ``overwrite``)."""
    from tqdm.auto import tqdm
    if n_cases < 1:
        raise ValueError(f"--n_cases must be at least 1, got {n_cases}")
    if len(shape_zyx) != 3 or min(shape_zyx) < 16:
        raise ValueError(f"--shape must be three sizes >= 16 (Z Y X), got {tuple(shape_zyx)}")
    names = []
    for index in tqdm(range(n_cases), desc="demo cases", unit="case", disable=not progress):
        name = case_name(index)
        folder = os.path.join(out_dir, name)
        files = {m: os.path.join(folder, f"{name}-{m}.nii.gz") for m in (*MODALITIES, "seg")}
        names.append(name)
        if not overwrite and all(os.path.isfile(f) for f in files.values()):
            continue
        rng = np.random.default_rng([seed, index])
        images, labels = make_case(rng, tuple(shape_zyx))
        geometry = case_geometry(rng, tuple(shape_zyx))
        os.makedirs(folder, exist_ok=True)
        for modality, image in images.items():
            write_image(image, files[modality], geometry)
        write_image(labels, files["seg"], geometry)
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=OUT_DIR, help="output folder (the raw BraTS training-data folder)")
    parser.add_argument("--n_cases", type=int, default=N_CASES, help="number of cases")
    parser.add_argument("--shape", type=int, nargs=3, default=list(SHAPE_ZYX), metavar=("Z", "Y", "X"),
                        help="array shape Z Y X (the NIfTI header lists it as X Y Z)")
    parser.add_argument("--seed", type=int, default=SEED, help="random seed")
    parser.add_argument("--overwrite", action="store_true", help="regenerate cases that already exist")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = make_brats_demo(args.out, args.n_cases, tuple(args.shape), args.seed, args.overwrite)
    print(f"{len(names)} synthetic BraTS cases ({' x '.join(map(str, args.shape))} voxels, Z x Y x X) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
