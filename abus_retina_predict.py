#!/usr/bin/env python
"""ABUS step 4: detect (and optionally segment) lesions in the preprocessed test cases with SegMamba-Retina.

The model is rebuilt from the checkpoint's stored architecture (so non-default ``--fpn_channels`` /
``--num_head_convs`` / widths work) and loaded once. Every case is covered by sliding windows (steps that
always end at the volume's edge, ``--overlap``); per window the anchors scoring above ``--score_threshold``
(score = sigmoid of the classification logit; the untrained centerness is not used) are decoded and
suppressed by NMS; all windows' boxes then go through one global NMS (``--nms_threshold``) that keeps at most
``--max_detections`` boxes per case.

Outputs in ``--save_path``:

* ``detections.json`` — the project's one detection schema (``detection/detections_file.py``): per case name,
  boxes ``[z1, y1, x1, z2, y2, x2]`` in voxel coordinates of the ORIGINAL raw volume (half-open; the crop of the
  preprocessing and any resampling are undone), scores sorted descending, the raw image shape and spacing.
* with ``--save_seg``: ``ABUS_<id>.nii.gz`` lesion masks (0/1, uint8) on the raw image grid with the raw
  image's spacing, origin and direction.

``detections.json`` is rewritten atomically after every case (``source.complete`` is false until the last one),
so an interrupted run keeps what it finished; running the same command again skips the cases already in the
file when the model file and all settings are unchanged (``--overwrite`` predicts everything again). A case
whose files are unreadable, hold NaN/Inf or disagree about the case name fails (listed at the end).

Exit codes: 0 all cases done; 3 some cases failed (listed at the end; the others are written); 1 nothing could
be done, or ``--strict`` and a case failed; 2 impossible settings (a device that does not exist).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DATA_DIR_TEST = "./data/abus/test"
SAVE_PATH = "./prediction_results/segmamba_abus_retina"
EXIT_OK, EXIT_NOTHING, EXIT_BAD_SETTINGS, EXIT_SOME_FAILED = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--model_path", required=True, help="SegMamba-Retina checkpoint (abus_retina_train.py's best_model.pt)")
    add("--data_dir_test", default=DATA_DIR_TEST, help="preprocessed test cases (.npz + .json)")
    add("--save_path", default=SAVE_PATH, help="output folder (detections.json, masks)")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add("--overlap", type=float, default=0.5, help="sliding-window overlap")
    add("--score_threshold", type=float, default=0.05, help="detection score threshold")
    add("--nms_threshold", type=float, default=0.5, help="NMS IoU threshold")
    add("--save_seg", action="store_true", help="also write the lesion masks as NIfTI")
    add("--batch_size", type=int, default=2, help="windows per forward pass")
    add("--max_detections", type=int, default=100, help="boxes kept per case after NMS")
    add("--pre_nms_top_k", type=int, default=1000, help="best anchors per window entering NMS")
    add("--patch_size", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
        help="window size (default: the training patch stored in the checkpoint, else 128 128 128)")
    add("--amp", choices=["fp16", "none"], default="fp16", help="mixed precision on CUDA")
    add("--overwrite", action="store_true",
        help="predict every case again (default: reuse the cases of an existing detections.json written with the "
             "same model and settings)")
    add("--strict", action="store_true", help="stop at the first failing case (exit code 1)")
    add("--no_progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from detection.detections_file import CasePrediction, write_detections_json
    from detection.sliding_window import RetinaInferenceConfig, boxes_in_original_volume, predict_volume
    from light_training.checkpoint import CheckpointError, load_checkpoint
    from light_training.dataloading import list_case_files
    from light_training.distributed import DeviceRequestError, resolve_device
    from light_training.io import ImageGeometry, check_finite_input, load_case, sanitize_case_name, write_image
    from light_training.prediction import labels_from_probabilities, paste_into_original, resize_probabilities
    from light_training.progress import print_case_failures
    from light_training.utils.files import remove_stale_temporaries
    from model_segmamba.segmamba_retina import build_retina_from_checkpoint

    try:
        device = resolve_device(args.device)
    except DeviceRequestError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    try:
        checkpoint = load_checkpoint(args.model_path)
        model = build_retina_from_checkpoint(checkpoint, source=args.model_path).to(device).eval()
        case_files = list_case_files(args.data_dir_test)
        if not case_files:
            raise FileNotFoundError(f"{args.data_dir_test}: no preprocessed cases (*.npz)")
    except (CheckpointError, FileNotFoundError, ValueError, TypeError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NOTHING
    stored = checkpoint.get("inference") or {}
    patch = tuple(args.patch_size or stored.get("patch_size") or (128, 128, 128))
    config = RetinaInferenceConfig(patch_size=patch, overlap=args.overlap, batch_size=args.batch_size,
                                   score_threshold=args.score_threshold, nms_threshold=args.nms_threshold,
                                   pre_nms_top_k=args.pre_nms_top_k, max_detections=args.max_detections,
                                   amp=args.amp != "none", segmentation=args.save_seg)
    print(f"model {args.model_path} ({sum(p.numel() for p in model.parameters()):,} parameters) on {device}; "
          f"{len(case_files)} case(s); window {patch}, overlap {args.overlap}")
    os.makedirs(args.save_path, exist_ok=True)
    output = os.path.join(args.save_path, "detections.json")
    leftovers = remove_stale_temporaries(args.save_path)
    if leftovers:
        print(f"removed {len(leftovers)} unfinished file(s) of an interrupted run from {args.save_path}")
    settings = {"model_path": os.path.abspath(args.model_path), "model_size": os.path.getsize(args.model_path),
                "model_mtime_ns": os.stat(args.model_path).st_mtime_ns, "patch_size": list(patch),
                "overlap": args.overlap, "score_threshold": args.score_threshold,
                "nms_threshold": args.nms_threshold, "max_detections": args.max_detections,
                "pre_nms_top_k": args.pre_nms_top_k, "save_seg": bool(args.save_seg)}
    predictions = {} if args.overwrite else previous_predictions(output, settings)
    failed: dict = {}
    started = time.time()

    def save(pending: List[str]) -> None:
        # Rewritten (atomically) after every case: a killed run keeps what it finished, and a re-run goes on
        # from there. "complete" tells a finished file from one of an interrupted run.
        write_detections_json(output, predictions, {
            "script": "abus_retina_predict.py", "model_path": os.path.abspath(args.model_path),
            "data_dir_test": os.path.abspath(args.data_dir_test), "patch_size": list(patch),
            "overlap": args.overlap, "score_threshold": args.score_threshold, "nms_threshold": args.nms_threshold,
            "max_detections": args.max_detections, "score": "sigmoid(classification logit)",
            "settings": settings, "complete": not pending, "pending_cases": pending, "failed_cases": failed})

    names = [os.path.basename(path)[:-len(".npz")] for path in case_files]
    reused = [n for n in names if n in predictions and (not args.save_seg or os.path.isfile(mask_path(args, n)))]
    predictions = {n: predictions[n] for n in reused}
    if reused:
        print(f"{len(reused)} case(s) already in {output} with the same model and settings: skipped "
              f"(--overwrite predicts them again)")
    for path in tqdm(case_files, desc="cases", unit="case", disable=args.no_progress):
        name = os.path.basename(path)[:-len(".npz")]
        if name in reused:
            continue
        try:
            sanitize_case_name(name)
            data, _, properties = load_case(path, load_seg=False)
            check_finite_input(data, path)
            stored_name = properties.get("name", name)
            if stored_name != name:
                raise ValueError(f"{path}: the properties ({name}.json) name the case {stored_name!r}; the file "
                                 f"name says {name!r} (a renamed or copied case?)")
            result = predict_volume(model, data, config, device)
            boxes = boxes_in_original_volume(result.boxes, properties)
            spacing_zyx = list(reversed(properties["spacing_xyz"]))
            prediction = CasePrediction(boxes, result.scores.double().numpy(), properties["shape_before_cropping"],
                                        spacing_zyx)
            if args.save_seg:
                probabilities = resize_probabilities(result.probabilities,
                                                     properties["shape_after_cropping_before_resample"])
                labels = labels_from_probabilities(probabilities)
                mask = paste_into_original((labels > 0).astype(np.uint8), properties["shape_before_cropping"],
                                           properties["bbox_used_for_cropping"], fill_value=0)
                write_image(mask, mask_path(args, name), ImageGeometry.from_dict(properties))
            predictions[name] = prediction
            save([n for n in names if n not in predictions and n not in failed])
        except Exception as error:  # one bad case must not cost the others
            failed[name] = f"{path}: {type(error).__name__}: {error}"
            print(f"error: {failed[name]}", file=sys.stderr)
            if args.strict:
                print("stopped at the first failing case (--strict)", file=sys.stderr)
                if predictions:
                    save([n for n in names if n not in predictions])
                return EXIT_NOTHING
    if not predictions:
        print("error: no case could be predicted", file=sys.stderr)
        return EXIT_NOTHING
    save([])
    total = sum(p.boxes.shape[0] for p in predictions.values())
    print(f"{len(predictions)} case(s), {total} box(es) in {time.time() - started:.1f} s -> {output}"
          + (f"; masks in {args.save_path}" if args.save_seg else ""))
    if failed:
        print_case_failures(f"{len(failed)} case(s) failed (not in {output}; the other cases are):", failed)
        return EXIT_SOME_FAILED
    return EXIT_OK


def mask_path(args: argparse.Namespace, name: str) -> str:
    return os.path.join(args.save_path, f"{name}.nii.gz")


def previous_predictions(path: str, settings: dict) -> dict:
    """Cases of an existing detections.json written with the same model and settings (else none)."""
    import json

    from detection.detections_file import read_detections_json

    if not os.path.isfile(path):
        return {}
    try:
        with open(path, "r", encoding="utf-8") as handle:
            previous_settings = (json.load(handle).get("source") or {}).get("settings")
        cases = read_detections_json(path)
    except (ValueError, OSError, AttributeError) as error:
        print(f"note: {path} cannot be reused ({error}); every case is predicted again", file=sys.stderr)
        return {}
    if previous_settings != settings:
        print(f"note: {path} was written with another model or other settings; every case is predicted again",
              file=sys.stderr)
        return {}
    return cases


if __name__ == "__main__":
    sys.exit(main())
