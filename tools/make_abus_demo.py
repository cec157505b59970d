#!/usr/bin/env python
"""Generate a small synthetic ABUS-like (automated breast ultrasound) dataset in the raw TDSC-ABUS layout.

Layout written (what ``abus_preprocessing.py`` reads)::

    <root>/data/{Train,Validation,Test}/DATA/DATA_<id>.nrrd     uint8 volumes
    <root>/data/{Train,Validation,Test}/MASK/MASK_<id>.nrrd     uint8 masks, 255 = lesion (as in TDSC-ABUS)

Each volume imitates an ABUS scan: a bright skin line, a hypo-echoic fat layer, brighter fibroglandular tissue
with smooth texture, depth-dependent attenuation, multiplicative Rayleigh speckle, and a zero (unscanned)
border outside a rounded field of view. Lesions are 1 or 2 irregular hypo-echoic ellipsoids with a darker
acoustic shadow below them. Some cases have no lesion at all (the preprocessing must skip and list them).
Spacing, origin and direction are written into the NRRD headers.

Everything is seeded: the same flags give the same files. Example::

    python tools/make_abus_demo.py --num_cases 12 --num_without_lesion 2 --shape 48 64 64
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from light_training.io import ImageGeometry, write_image  # noqa: E402

# Defaults (edit here or pass the flags).
OUTPUT_ROOT = "./data/raw_data/ABUS"
NUM_CASES = 12
NUM_WITHOUT_LESION = 2
SHAPE_ZYX = (48, 64, 64)
SPACING_XYZ = (0.5, 0.5, 0.5)
SEED = 0
FOLDER_SHARES = (("Train", 0.6), ("Validation", 0.2), ("Test", 0.2))


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std random field with correlation length about ``sigma`` voxels."""
    from scipy.ndimage import gaussian_filter
    field = gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return (field - field.mean()) / (field.std() + 1e-8)


def make_case(rng: np.random.Generator, shape_zyx, num_lesions: int):
    """One synthetic volume.

    Returns ``(image uint8 (Z, Y, X), mask uint8 (Z, Y, X) with 255 on lesions)``. The Y axis is the
    ultrasound depth (skin at y = 0).
    """
    z_size, y_size, x_size = shape_zyx
    z, y, x = np.meshgrid(np.arange(z_size), np.arange(y_size), np.arange(x_size), indexing="ij")
    depth = y / max(y_size - 1, 1)

    # Tissue echogenicity: skin line, fat layer, glandular tissue with smooth texture.
    skin = np.exp(-((y - 2.0) / 1.2) ** 2)
    fat_end = 0.25 + 0.05 * _smooth_noise(rng, (z_size, 1, x_size), 6.0)
    glandular = 1.0 / (1.0 + np.exp(-(depth - fat_end) * 25.0))
    texture = 0.15 * _smooth_noise(rng, shape_zyx, 2.0)
    echo = 0.35 + 0.3 * glandular + texture + 0.9 * skin

    mask = np.zeros(shape_zyx, dtype=bool)
    for _ in range(num_lesions):
        radii = rng.uniform(0.10, 0.18, size=3) * np.array([z_size, y_size, x_size])
        radii = np.maximum(radii, 3.0)
        centre = np.array([rng.uniform(radii[0] + 2, z_size - radii[0] - 2),
                           rng.uniform(max(0.35 * y_size, radii[1] + 4), y_size - radii[1] - 4),
                           rng.uniform(radii[2] + 2, x_size - radii[2] - 2)])
        distance = np.sqrt(((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
                           + ((x - centre[2]) / radii[2]) ** 2)
        irregular = distance + 0.12 * _smooth_noise(rng, shape_zyx, 1.5)
        lesion = irregular < 1.0
        mask |= lesion
        echo = np.where(lesion, 0.12 + 0.04 * texture, echo)
        # Posterior acoustic shadow: darker column below the lesion.
        lateral = np.sqrt(((z - centre[0]) / radii[0]) ** 2 + ((x - centre[2]) / radii[2]) ** 2)
        shadow = (lateral < 0.8) & (y > centre[1] + radii[1] * 0.8)
        echo = np.where(shadow & ~mask, echo * 0.6, echo)

    attenuation = np.exp(-1.2 * depth)
    speckle = rng.rayleigh(scale=1.0, size=shape_zyx) / np.sqrt(np.pi / 2)  # mean-one multiplicative speckle
    image = 170.0 * np.clip(echo, 0.02, None) * attenuation * speckle

    # Unscanned border: zero outside a rounded field of view (the preprocessing crops it away).
    radial = np.sqrt(((z - (z_size - 1) / 2) / (0.55 * z_size)) ** 2 + ((x - (x_size - 1) / 2) / (0.55 * x_size)) ** 2)
    field_of_view = (radial <= 1.0) & (y < y_size - 2)
    image = np.where(field_of_view, np.clip(image, 1, 255), 0)
    mask &= field_of_view
    return image.astype(np.uint8), (mask.astype(np.uint8) * 255)


def folder_for(index: int, num_cases: int) -> str:
    """Original folder of case ``index`` (Train first, then Validation, then Test, by the shares above)."""
    fraction = (index + 0.5) / num_cases
    cumulative = 0.0
    for folder, share in FOLDER_SHARES:
        cumulative += share
        if fraction < cumulative:
            return folder
    return FOLDER_SHARES[-1][0]


def generate(root: str, num_cases: int = NUM_CASES, num_without_lesion: int = NUM_WITHOUT_LESION,
             shape_zyx=SHAPE_ZYX, spacing_xyz=SPACING_XYZ, seed: int = SEED, overwrite: bool = False,
             progress: bool = True) -> list[str]:
    """Write the dataset; returns the case ids written (existing ones are kept unless ``overwrite``)."""
    from tqdm.auto import tqdm

    if num_cases < 1 or not 0 <= num_without_lesion <= num_cases:
        raise ValueError(f"need num_cases >= 1 and 0 <= num_without_lesion <= num_cases, got {num_cases}, "
                         f"{num_without_lesion}")
    if min(shape_zyx) < 16:
        raise ValueError(f"every axis of --shape must be >= 16 voxels, got {tuple(shape_zyx)}")
    # Spread the lesion-free cases over the folders (every third case from the end).
    without = set(range(num_cases - 1, -1, -3)[:num_without_lesion]) if num_without_lesion else set()
    if len(without) < num_without_lesion:
        without |= set(sorted(set(range(num_cases)) - without)[:num_without_lesion - len(without)])
    geometry = ImageGeometry(spacing_xyz=spacing_xyz, origin_xyz=(12.5, -40.0, 7.25))
    written = []
    for index in tqdm(range(num_cases), desc="ABUS demo cases", disable=not progress):
        case_id = f"{index:03d}"
        folder = os.path.join(root, "data", folder_for(index, num_cases))
        image_path = os.path.join(folder, "DATA", f"DATA_{case_id}.nrrd")
        mask_path = os.path.join(folder, "MASK", f"MASK_{case_id}.nrrd")
        if not overwrite and os.path.isfile(image_path) and os.path.isfile(mask_path):
            continue
        rng = np.random.default_rng([seed, index])
        num_lesions = 0 if index in without else int(rng.integers(1, 3))
        image, mask = make_case(rng, tuple(shape_zyx), num_lesions)
        write_image(image, image_path, geometry, compress=True)
        write_image(mask, mask_path, geometry, compress=True)
        written.append(case_id)
    return written


# ------------------------------------------------------------------------------- steps of run_demo.py
# Sized for a 2-core CPU (a few minutes); a GPU runs the same settings faster.
DEMO_CASES, DEMO_WITHOUT_LESION = 10, 2          # 8 lesion cases: 6 train / 1 val / 1 test
DEMO_PATCH = (32, 32, 32)
DEMO_MODEL = ["--depths", "2", "2", "2", "2", "--feat_size", "8", "16", "32", "64", "--hidden_size", "64"]
DEMO_SEG_EPOCHS, DEMO_SEG_ITERATIONS = 3, 6
DEMO_RETINA_EPOCHS, DEMO_RETINA_ITERATIONS = 3, 8


def demo_paths(workspace) -> dict:
    """Where the ABUS demo writes (all inside ``<workspace>/abus``)."""
    root = os.path.join(str(workspace), "abus")
    return {"root": root, "raw": os.path.join(root, "raw_data", "ABUS"), "data": os.path.join(root, "data", "abus"),
            "seg_logs": os.path.join(root, "logs", "segmamba_abus"),
            "retina_logs": os.path.join(root, "logs", "segmamba_abus_retina"),
            "predictions": os.path.join(root, "prediction_results")}


def demo_steps(settings, step_type) -> list:
    """The ABUS pipeline 1 → 5 (+ the Seg → Box baseline) as ``run_demo.py`` steps.

    Args:
        settings: run_demo's settings (``workspace``, ``device``, ``python``, ``num_workers``, ``show_progress``).
        step_type: run_demo's step class, called as ``step_type(title, command, outputs=[...])``.
    """
    paths = demo_paths(settings.workspace)
    py, device = settings.python, settings.device
    quiet = [] if settings.show_progress else ["--no_progress"]
    patch = ["--patch_size", *[str(p) for p in DEMO_PATCH]]
    data = paths["data"]
    split_info = os.path.join(data, "split_info.json")
    retina_pred = os.path.join(paths["predictions"], "segmamba_abus_retina")
    seg_box = os.path.join(paths["predictions"], "segmamba_abus_seg_box")
    return [
        step_type("ABUS: synthetic raw data", [py, "tools/make_abus_demo.py", "--output_root", paths["raw"],
                                               "--num_cases", str(DEMO_CASES),
                                               "--num_without_lesion", str(DEMO_WITHOUT_LESION), "--quiet"]),
        step_type("ABUS 1: preprocessing", [py, "abus_preprocessing.py", "--abus_root", paths["raw"],
                                            "--output_base", data, "--num_processes", "2", *quiet],
                  outputs=[os.path.join(data, "split_info.txt")]),
        step_type("ABUS 2: segmentation training", [
            py, "abus_train.py", "--data_dir_train", os.path.join(data, "train"), "--data_dir_val",
            os.path.join(data, "val"), "--logdir", paths["seg_logs"], "--max_epoch", str(DEMO_SEG_EPOCHS),
            "--iterations_per_epoch", str(DEMO_SEG_ITERATIONS), "--val_every", str(DEMO_SEG_EPOCHS),
            "--num_workers", str(settings.num_workers), "--device", device, *patch, *DEMO_MODEL,
            "--compile", "off", *quiet],  # compiling would cost more than the few demo steps gain
            outputs=[os.path.join(paths["seg_logs"], "progress.png")]),
        step_type("ABUS 3: SegMamba-Retina training (frozen backbone)", [
            py, "abus_retina_train.py", "--data_dir_train", os.path.join(data, "train"), "--data_dir_val",
            os.path.join(data, "val"), "--pretrained_seg", os.path.join(paths["seg_logs"], "model", "best_model.pt"),
            "--freeze_backbone", "--full_volume_val", "--save_dir", paths["retina_logs"],
            "--max_epoch", str(DEMO_RETINA_EPOCHS), "--iterations_per_epoch", str(DEMO_RETINA_ITERATIONS),
            "--val_every", str(DEMO_RETINA_EPOCHS), "--det_warmup_epochs", "1", "--lr", "1e-3",
            "--fpn_channels", "32", "--num_head_convs", "2", "--num_workers", str(settings.num_workers),
            "--device", device, *patch, *quiet],
            outputs=[os.path.join(paths["retina_logs"], "progress.png")]),
        step_type("ABUS 4: detection + segmentation of the test cases", [
            py, "abus_retina_predict.py", "--model_path", os.path.join(paths["retina_logs"], "model", "best_model.pt"),
            "--data_dir_test", os.path.join(data, "test"), "--save_path", retina_pred, "--save_seg",
            "--device", device, *quiet], outputs=[os.path.join(retina_pred, "detections.json")]),
        step_type("ABUS 5a: segmentation metrics", [
            py, "abus_compute_metrics.py", "--pred_name", "segmamba_abus_retina", "--split_info", split_info,
            "--results_root", paths["predictions"], *quiet],
            outputs=[os.path.join(paths["predictions"], "result_metrics", "segmamba_abus_retina.csv")]),
        step_type("ABUS 5b: detection metrics", [
            py, "abus_det_compute_metrics.py", "--pred_file", os.path.join(retina_pred, "detections.json"),
            "--split_info", split_info, *quiet], outputs=[os.path.join(retina_pred, "metrics", "froc.png")]),
        step_type("ABUS baseline: Seg -> Box", [
            py, "abus_seg_box_eval.py", "--model_path", os.path.join(paths["seg_logs"], "model", "best_model.pt"),
            "--data_dir_test", os.path.join(data, "test"), "--pred_dir", seg_box, "--split_info", split_info,
            "--device", device, *patch, *quiet], outputs=[os.path.join(seg_box, "seg_box_metrics", "detection_metrics.json")]),
    ]


def demo_report(settings) -> str:
    """Both metric summaries of the ABUS demo (segmentation and detection, detector vs Seg → Box)."""
    import json

    paths = demo_paths(settings.workspace)
    with open(os.path.join(paths["predictions"], "result_metrics", "segmamba_abus_retina.json"), encoding="utf-8") as f:
        seg = json.load(f)
    lines = [f"ABUS test split ({seg['num_cases']} case(s)), SegMamba-Retina masks: Dice "
             f"{seg['summary']['dice']['mean']:.4f}, HD95 {seg['summary']['hd95_mm']['mean']:.2f} mm, "
             f"HD {seg['summary']['hausdorff_mm']['mean']:.2f} mm"]
    for title, path in (("SegMamba-Retina", os.path.join(paths["predictions"], "segmamba_abus_retina", "metrics")),
                        ("Seg -> Box", os.path.join(paths["predictions"], "segmamba_abus_seg_box", "seg_box_metrics"))):
        with open(os.path.join(path, "detection_metrics.json"), encoding="utf-8") as f:
            summary = json.load(f)["summary"]
        show = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"{title:<16} AP@0.1 {show(summary['AP']['0.1'])}  AP@0.25 {show(summary['AP']['0.25'])}  "
                     f"mAP {show(summary['mAP'])}  FROC@0.3 {show(summary['FROC']['0.3']['score'])}  "
                     f"FROC@0.1 {show(summary['FROC']['0.1']['score'])}  "
                     f"recall@0.25 {show(summary['lesion_recall']['0.25'])}  ({summary['num_predictions']} boxes)")
    lines.append(f"FROC curve: {os.path.join(paths['predictions'], 'segmamba_abus_retina', 'metrics', 'froc.png')}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output_root", default=OUTPUT_ROOT,
                        help="dataset root; files go to <root>/data/{Train,Validation,Test}/{DATA,MASK}")
    parser.add_argument("--num_cases", type=int, default=NUM_CASES, help="number of cases")
    parser.add_argument("--num_without_lesion", type=int, default=NUM_WITHOUT_LESION,
                        help="how many of them have an empty mask")
    parser.add_argument("--shape", type=int, nargs=3, default=list(SHAPE_ZYX), metavar=("Z", "Y", "X"),
                        help="volume size in voxels (array order Z, Y, X)")
    parser.add_argument("--spacing", type=float, nargs=3, default=list(SPACING_XYZ), metavar=("X", "Y", "Z"),
                        help="voxel spacing in mm (SimpleITK order x, y, z)")
    parser.add_argument("--seed", type=int, default=SEED, help="random seed")
    parser.add_argument("--overwrite", action="store_true", help="regenerate cases that already exist")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = generate(args.output_root, args.num_cases, args.num_without_lesion, tuple(args.shape),
                           tuple(args.spacing), args.seed, args.overwrite, progress=not args.quiet)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} case(s) to {os.path.join(args.output_root, 'data')} "
          f"({args.num_cases - len(written)} already present)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
