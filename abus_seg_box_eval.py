#!/usr/bin/env python
"""ABUS "Pipeline A: Seg → Box": detection boxes from segmentation masks, scored like the detector.

The baseline SegMamba-Retina must beat. Two phases, either or both:

1. (with ``--model_path``) segment the preprocessed test cases with a SegMamba checkpoint from
   ``abus_train.py`` (sliding window, Gaussian blending, optional mirror TTA) and write the lesion masks
   ``ABUS_<id>.nii.gz`` into ``--pred_dir`` on the raw image grid (spacing, origin, direction kept);
2. read the masks of the ``--split`` cases from ``--pred_dir``, split them into connected components
   (``--connectivity``), drop components smaller than ``--min_volume`` voxels, and turn each into a box
   ``[z1, y1, x1, z2, y2, x2]`` (raw-volume voxels, half-open) with a confidence: the mean lesion probability
   inside the component when phase 1 ran, otherwise the size heuristic of the reference, min(1, voxels / 10000)
   floored at 0.01 (masks alone carry no confidence).

The boxes are written as ``{pred_dir}/detections.json`` (the project's one schema) and scored with exactly the
metrics of ``abus_det_compute_metrics.py`` (AP, mAP, lesion recall/precision, FROC) into ``--output_dir``
(default ``{pred_dir}/seg_box_metrics``). Exit codes: 0 all cases; 3 some missing or failed (listed at the end,
the rest is scored); 1 stopped: nothing could be scored, or --strict and a case was missing or failed.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from abus_common import load_split_info  # noqa: E402

PRED_DIR = "./prediction_results/segmamba_abus"
DATA_DIR_TEST = "./data/abus/test"
SPLIT_INFO = "./data/abus/split_info.json"
EXIT_OK, EXIT_NOTHING, EXIT_INCOMPLETE = 0, 1, 3


def component_boxes(mask: np.ndarray, probabilities: Optional[np.ndarray], min_volume: int, connectivity: int):
    """Boxes (file format), scores and voxel counts of the connected components of ``mask > 0``."""
    from scipy import ndimage

    from detection.boxes import mask_to_boxes

    boxes, volumes = mask_to_boxes(mask > 0, connectivity=connectivity, min_voxels=min_volume)
    if probabilities is None:
        scores = np.clip(volumes / 10000.0, 0.01, 1.0)
    else:
        rank = {6: 1, 18: 2, 26: 3}[connectivity]
        labels, _ = ndimage.label(mask > 0, structure=ndimage.generate_binary_structure(3, rank))
        scores = []
        for box in boxes:
            window = tuple(slice(box[a], box[a + 3]) for a in range(3))
            # the component whose box this is: the most frequent label inside its own box
            inside = labels[window]
            ids, counts = np.unique(inside[inside > 0], return_counts=True)
            component = ids[np.argmax(counts)]
            scores.append(float(probabilities[window][inside == component].mean()))
        scores = np.asarray(scores, dtype=np.float64)
    return boxes, scores, volumes


def segment_cases(args, names: List[str]) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Phase 1: segment the test cases, write masks; returns the lesion probabilities on the raw grid and the
    cases that failed (``{name: reason}``; with ``--strict`` the first failure raises instead)."""
    import torch
    from tqdm.auto import tqdm

    from light_training.dataloading import list_case_files
    from light_training.distributed import resolve_device
    from light_training.io import ImageGeometry, check_finite_input, load_case, sanitize_case_name, write_image
    from light_training.prediction import (SlidingWindowConfig, SlidingWindowPredictor, labels_from_probabilities,
                                           paste_into_original, resize_probabilities)
    from model_segmamba import SegMamba
    from model_segmamba.weights import load_model_weights, read_checkpoint

    device = resolve_device(args.device)
    checkpoint = read_checkpoint(args.model_path)
    import inspect

    # A checkpoint of another model (e.g. SegMamba-Retina) keeps only the settings SegMamba knows; the strict
    # weight loading below then refuses it with the differing keys listed.
    accepted = inspect.signature(SegMamba).parameters
    stored = checkpoint.get("model_config") or {"in_chans": 1, "out_chans": 2}
    model = SegMamba(**{key: value for key, value in stored.items() if key in accepted})
    load_model_weights(model, checkpoint, strict=True, name=args.model_path)
    model.to(device).eval()
    settings = checkpoint.get("run_settings") or {}
    patch = tuple(args.patch_size or settings.get("patch_size") or (128, 128, 128))
    predictor = SlidingWindowPredictor(SlidingWindowConfig(roi_size=patch, overlap=args.overlap, sw_batch_size=1,
                                                           mirror_axes=(0, 1, 2) if args.mirror else ()), device)
    wanted = set(names)
    paths = [p for p in list_case_files(args.data_dir_test) if os.path.basename(p)[:-4] in wanted]
    if not paths:
        raise FileNotFoundError(f"{args.data_dir_test}: none of the {len(names)} {args.split} cases is there")
    os.makedirs(args.pred_dir, exist_ok=True)
    probabilities_by_case: Dict[str, np.ndarray] = {}
    failed: Dict[str, str] = {}
    with torch.no_grad():
        for path in tqdm(paths, desc="segmenting", unit="case", disable=args.no_progress):
            name = os.path.basename(path)[:-len(".npz")]
            try:
                data, _, properties = load_case(path, load_seg=False)
                check_finite_input(data, path)
                if properties.get("name", name) != name:
                    raise ValueError(f"{path}: the properties name the case {properties.get('name')!r}, the file "
                                     f"name says {name!r}")
                probabilities = predictor.predict_probabilities(model, data)
                probabilities = resize_probabilities(probabilities, properties["shape_after_cropping_before_resample"])
                labels = labels_from_probabilities(probabilities)
                shape, bbox = properties["shape_before_cropping"], properties["bbox_used_for_cropping"]
                mask = paste_into_original((labels > 0).astype(np.uint8), shape, bbox, 0)
                write_image(mask, os.path.join(args.pred_dir, f"{sanitize_case_name(name)}.nii.gz"),
                            ImageGeometry.from_dict(properties))
                probabilities_by_case[name] = paste_into_original(probabilities[1].numpy().astype(np.float32),
                                                                  shape, bbox, 0)
            except Exception as error:  # one bad case must not cost the others
                if args.strict:
                    raise ValueError(f"{path}: {type(error).__name__}: {error} (--strict)") from error
                failed[name] = f"{path}: {type(error).__name__}: {error}"
                print(f"error: {failed[name]}", file=sys.stderr)
    print(f"segmented {len(probabilities_by_case)} case(s) with {args.model_path} -> {args.pred_dir}")
    return probabilities_by_case, failed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--pred_dir", default=PRED_DIR, help="folder of predicted masks ABUS_<id>.nii.gz (written by phase 1)")
    add("--model_path", default="", help="SegMamba checkpoint: run phase 1 (segmentation) first")
    add("--data_dir_test", default=DATA_DIR_TEST, help="preprocessed cases segmented in phase 1")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N (phase 1)")
    add("--overlap", type=float, default=0.5, help="sliding-window overlap (phase 1)")
    add("--patch_size", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
        help="sliding-window size (default: the checkpoint's training patch, else 128 128 128)")
    add("--mirror", action="store_true", help="mirror test-time augmentation (phase 1, 8x slower)")
    add("--min_volume", type=int, default=100, help="smallest component (voxels) that becomes a box")
    add("--connectivity", type=int, default=6, choices=(6, 18, 26), help="component connectivity")
    add("--split_info", default=SPLIT_INFO, help="split_info.json written by abus_preprocessing.py")
    add("--split", default="test", choices=("train", "val", "test"), help="cases to evaluate")
    add("--abus_root", default=None, help="raw dataset root (default: the root recorded in split_info.json)")
    add("--output_dir", default=None, help="metrics folder (default: <pred_dir>/seg_box_metrics)")
    add("--num_processes", type=int, default=2, help="parallel processes reading ground-truth masks")
    add("--strict", action="store_true", help="stop at the first missing or failing case (exit code 1)")
    add("--no_progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from abus_det_compute_metrics import evaluate_detection_file, format_report
    from detection.detections_file import CasePrediction, write_detections_json
    from light_training.io import read_label_image
    from light_training.progress import print_case_failures

    try:
        info = load_split_info(args.split_info)
        names = list(info.get(args.split, []))
        if not names:
            raise ValueError(f"{args.split_info}: the {args.split} split is empty")
        probabilities, failed = segment_cases(args, names) if args.model_path else ({}, {})
        predictions = {}
        for name in names:
            path = os.path.join(args.pred_dir, f"{name}.nii.gz")
            if name in failed:
                continue
            if not os.path.isfile(path):
                print(f"warning: no mask {path}", file=sys.stderr)
                if args.strict:
                    raise FileNotFoundError(f"{path}: mask not found (--strict)")
                continue
            try:
                mask, geometry = read_label_image(path, what="predicted mask")
                boxes, scores, _ = component_boxes(mask, probabilities.get(name), args.min_volume, args.connectivity)
                predictions[name] = CasePrediction(boxes, scores, mask.shape, geometry.spacing_zyx)
            except Exception as error:
                if args.strict:
                    raise ValueError(f"{path}: {error} (--strict)") from error
                failed[name] = f"{type(error).__name__}: {error}"
                print(f"error: {path}: {failed[name]}", file=sys.stderr)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NOTHING
    if not predictions:
        print(f"error: no mask of the {args.split} cases found in {args.pred_dir}", file=sys.stderr)
        return EXIT_NOTHING
    pred_file = os.path.join(args.pred_dir, "detections.json")
    score_kind = "mean lesion probability of the component" if probabilities else "min(1, voxels / 10000), floor 0.01"
    write_detections_json(pred_file, predictions, {"script": "abus_seg_box_eval.py", "pred_dir": args.pred_dir,
                                                   "model_path": args.model_path, "min_volume": args.min_volume,
                                                   "connectivity": args.connectivity, "score": score_kind})
    output_dir = args.output_dir or os.path.join(args.pred_dir, "seg_box_metrics")
    try:
        payload, missing, eval_failed = evaluate_detection_file(
            pred_file, args.split_info, args.split, args.abus_root, output_dir, args.connectivity,
            args.num_processes, progress=not args.no_progress, title="FROC (Seg -> Box)", strict=args.strict)
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NOTHING
    failed.update(eval_failed)
    missing = [name for name in missing if name not in failed]
    print(f"Seg -> Box ({score_kind}):")
    print(format_report(payload["summary"]))
    print(f"written: {pred_file}; metrics in {output_dir}")
    if missing or failed:
        print_case_failures(f"incomplete: {len(missing)} missing, {len(failed)} failed:", failed, missing,
                            lambda name: f"no mask in {args.pred_dir}")
        return EXIT_INCOMPLETE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
