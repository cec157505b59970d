#!/usr/bin/env python
"""Step 4 of the BraTS 2023 pipeline: segment the test cases with a trained SegMamba.

For every case of the test split in the shared ``splits.json``: sliding-window inference over the whole
preprocessed volume (ROI 128^3, overlap 0.5, Gaussian weighting), optionally mirror test-time augmentation
(the softmax probabilities of all 8 flips averaged), trilinear resize back to the spacing before resampling,
argmax, paste into the uncropped raw grid, and write ``OUTPUT_DIR/<case>.nii.gz``: a 3D uint8 label map
(0 background, 1 NCR, 2 ED, 3 ET) with the raw image's spacing, origin and direction.

The model is built from the settings stored in the checkpoint (feature sizes, channels) and loaded once.
A bare reference state dict also loads (then --feat_size/--depths/--hidden_size describe it).
Finished cases are skipped unless --overwrite; a per-case Dice (TC/WT/ET, preprocessed grid) is printed.

A case whose files are missing, unreadable or hold NaN/Inf fails with the file named; the others are still
written and the failures are listed at the end (``--strict`` stops at the first one instead).

Exit codes: 0 every case written; 1 nothing could be done, or --strict and a case failed (message printed);
2 bad settings; 3 some cases failed (listed at the end).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# Defaults (edit here or pass the flags).
DATA_DIR = "./data/fullres/train"
SPLITS_FILE = "./data/fullres/splits.json"    # written by 3_train.py
SPLIT = "test"
CHECKPOINT = "./logs/segmamba/model/best_model.pt"
OUTPUT_DIR = "./prediction_results/segmamba"
ROI = (128, 128, 128)
OVERLAP = 0.5
SW_BATCH_SIZE = 2
MIRROR_TTA = True                             # average the probabilities of the 8 flips (8x slower)
DEVICE = "auto"                               # auto, cpu, cuda, cuda:N
AMP = "fp16"                                  # CUDA autocast dtype: fp16, bf16 or none
COMPILE = "auto"                              # torch.compile: auto (on CUDA; ~1.8x faster windows), on, off
CHANNELS_LAST = "auto"                        # channels-last 3D activations: auto (= on CUDA), on, off
CUDA_GRAPHS = "auto"                          # replay a captured forward per window batch: auto (= on CUDA), on, off
IN_CHANNELS = 4
NUM_CLASSES = 4
DEPTHS = (2, 2, 2, 2)                         # architecture flags: only used for bare state-dict files
FEAT_SIZE = (48, 96, 192, 384)
HIDDEN_SIZE = 768

EXIT_OK, EXIT_NOTHING, EXIT_BAD_SETTINGS, EXIT_SOME_FAILED = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data_dir", default=DATA_DIR, help=f"preprocessed cases (default: {DATA_DIR})")
    add("--splits", default=SPLITS_FILE, help=f"the shared splits.json (default: {SPLITS_FILE})")
    add("--split", default=SPLIT, choices=["train", "val", "test"], help=f"(default: {SPLIT})")
    add("--checkpoint", default=CHECKPOINT, help=f"(default: {CHECKPOINT})")
    add("--output_dir", default=OUTPUT_DIR, help=f"where NAME.nii.gz go (default: {OUTPUT_DIR})")
    add("--roi", type=int, nargs=3, default=list(ROI), metavar=("Z", "Y", "X"),
        help=f"sliding-window size, multiples of 16 (default: {' '.join(map(str, ROI))})")
    add("--overlap", type=float, default=OVERLAP, help=f"(default: {OVERLAP})")
    add("--sw_batch_size", type=int, default=SW_BATCH_SIZE, help=f"windows per forward pass (default: {SW_BATCH_SIZE})")
    add("--mirror_tta", action=argparse.BooleanOptionalAction, default=MIRROR_TTA,
        help=f"mirror test-time augmentation over z, y, x (default: {MIRROR_TTA})")
    add("--device", default=DEVICE, help=f"(default: {DEVICE})")
    add("--amp", choices=["fp16", "bf16", "none"], default=AMP, help=f"(default: {AMP})")
    add("--compile", choices=["auto", "on", "off"], default=COMPILE,
        help=f"torch.compile the network; auto = on CUDA only, the first windows take 1-2 min longer (default: {COMPILE})")
    add("--channels_last", choices=["auto", "on", "off"], default=CHANNELS_LAST,
        help="keep activations channels-last (NDHWC): faster convolutions, same results; auto = on CUDA "
             f"(default: {CHANNELS_LAST})")
    add("--cuda_graphs", choices=["auto", "on", "off"], default=CUDA_GRAPHS,
        help="capture each window batch's forward pass once as a CUDA graph and replay it (no per-window CPU "
             f"launch cost; falls back to normal runs if capture fails); auto = on CUDA (default: {CUDA_GRAPHS})")
    add("--depths", type=int, nargs=4, default=list(DEPTHS), help="architecture of a bare state-dict checkpoint")
    add("--feat_size", type=int, nargs=4, default=list(FEAT_SIZE), help="architecture of a bare state-dict checkpoint")
    add("--hidden_size", type=int, default=HIDDEN_SIZE, help="architecture of a bare state-dict checkpoint")
    add("--overwrite", action="store_true", help="predict cases whose output already exists")
    add("--strict", action="store_true", help="stop at the first failing case (exit code 1)")
    add("--no_progress", action="store_true", help="no progress bar")
    return parser


def build_model(checkpoint: dict, args: argparse.Namespace):
    """SegMamba with the checkpoint's stored settings (ours) or the flags (bare state dict); weights loaded."""
    from model_segmamba import SegMamba, load_model_weights

    stored = checkpoint.get("model_config") if isinstance(checkpoint.get("model_config"), dict) else None
    model_config = dict(stored) if stored else {"in_chans": IN_CHANNELS, "out_chans": NUM_CLASSES,
                                               "depths": list(args.depths), "feat_size": list(args.feat_size),
                                               "hidden_size": args.hidden_size}
    model = SegMamba(**model_config)
    load_model_weights(model, checkpoint, strict=True, name=args.checkpoint)
    return model.eval(), model_config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if any(s <= 0 or s % 16 for s in args.roi):
        print(f"error: --roi {' '.join(map(str, args.roi))}: sizes must be positive multiples of 16", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    if not 0.0 <= args.overlap < 1.0:
        print(f"error: --overlap must be in [0, 1), got {args.overlap}", file=sys.stderr)
        return EXIT_BAD_SETTINGS

    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from light_training.compile import compile_network, should_compile
    from light_training.distributed import DeviceRequestError, resolve_device
    from light_training.evaluation import brats_validation_dice
    from light_training.io import ImageGeometry, check_finite_input, load_case, sanitize_case_name, write_image
    from light_training.prediction import SlidingWindowConfig, SlidingWindowPredictor, predict_case
    from light_training.progress import print_case_failures
    from light_training.splits import load_splits
    from light_training.utils.files import remove_stale_temporaries
    from model_segmamba import read_checkpoint
    from model_segmamba.channels_last import should_use_channels_last, use_channels_last

    try:
        device = resolve_device(args.device, num_gpus=1)
    except DeviceRequestError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    try:
        names = load_splits(args.splits)[args.split]
        checkpoint = read_checkpoint(args.checkpoint)
        model, model_config = build_model(checkpoint, args)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        hint = ""
        if not os.path.isfile(args.checkpoint) and os.path.basename(args.checkpoint) == "best_model.pt":
            hint = " (no validation ran yet? try --checkpoint " + os.path.join(
                os.path.dirname(args.checkpoint), "final_model.pt") + ")"
        print(f"error: {error}{hint}", file=sys.stderr)
        return EXIT_NOTHING
    if not names:
        print(f"error: {args.splits}: the {args.split!r} split is empty", file=sys.stderr)
        return EXIT_NOTHING
    if not os.path.isdir(args.data_dir):
        print(f"error: {args.data_dir}: preprocessed data directory not found", file=sys.stderr)
        return EXIT_NOTHING
    model = model.to(device)
    if should_use_channels_last(args.channels_last, device, should_compile(args.compile, device), training=False):
        use_channels_last(model)  # before compiling, so the compiled graphs see the final layout
        print("channels-last 3D activations (--channels_last off to disable)")
    compile_network(model, args.compile, device, say=print)
    trained = checkpoint.get("run_settings", {}) or {}
    epoch = checkpoint.get("epoch")
    print(f"model: SegMamba {model_config}, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"from {args.checkpoint}" + (f" (epoch {epoch + 1})" if isinstance(epoch, int) else "") + f" | device {device}")
    if trained.get("roi") and list(trained["roi"]) != list(args.roi):
        print(f"note: the model was trained on {tuple(trained['roi'])} patches; predicting with --roi {tuple(args.roi)}")
    graphs = args.cuda_graphs == "on" or (args.cuda_graphs == "auto" and device.type == "cuda")
    window = SlidingWindowConfig(roi_size=tuple(args.roi), overlap=args.overlap, sw_batch_size=args.sw_batch_size,
                                 mirror_axes=(0, 1, 2) if args.mirror_tta else (), amp_dtype=args.amp,
                                 cuda_graphs=graphs)
    predictor = SlidingWindowPredictor(window, device=device)
    print(f"predicting {len(names)} {args.split} case(s) from {args.data_dir} -> {args.output_dir} | ROI {tuple(args.roi)}, "
          f"overlap {args.overlap}, Gaussian weighting, mirror TTA {'on (8 flips)' if args.mirror_tta else 'off'}"
          + (", CUDA graphs on" if predictor.uses_cuda_graphs else ""))

    leftovers = remove_stale_temporaries(args.output_dir)
    if leftovers:
        print(f"removed {len(leftovers)} unfinished file(s) of an interrupted run from {args.output_dir}")
    written, skipped, failed, scores = [], [], {}, []
    started = time.time()
    for name in tqdm(names, desc="cases", unit="case", disable=args.no_progress):
        try:
            output = os.path.join(args.output_dir, sanitize_case_name(name) + ".nii.gz")
            if os.path.isfile(output) and not args.overwrite:
                skipped.append(name)
                continue
            case_path = os.path.join(args.data_dir, f"{name}.npz")
            data, seg, properties = load_case(case_path)
            check_finite_input(data, case_path)
            if data.shape[0] != model_config.get("in_chans", IN_CHANNELS):
                raise ValueError(f"{case_path}: {data.shape[0]} channels, the model expects "
                                 f"{model_config.get('in_chans', IN_CHANNELS)}")
            prediction = predict_case(predictor, model, data, properties)
            geometry = ImageGeometry.from_dict(properties)
            raw_shape = tuple(reversed(properties.get("raw_size_xyz", prediction.labels_original.shape[::-1])))
            if tuple(prediction.labels_original.shape) != raw_shape:
                raise ValueError(f"{name}: un-cropped prediction {prediction.labels_original.shape} differs from the "
                                 f"raw image size {raw_shape} (properties inconsistent?)")
            write_image(prediction.labels_original.astype(np.uint8), output, geometry)
            written.append(name)
            if seg is not None:
                dice = brats_validation_dice(prediction.labels_preprocessed, seg[0])
                scores.append(dice)
                tqdm.write(f"{name}: Dice TC {dice['tc']:.4f}  WT {dice['wt']:.4f}  ET {dice['et']:.4f}  "
                           f"(preprocessed grid)")
        except Exception as error:  # one bad case must not cost the others; the message names the file
            failed[name] = f"{type(error).__name__}: {error}"
            if isinstance(error, KeyError):
                failed[name] = f"{os.path.join(args.data_dir, name + '.json')}: property {error} missing"
            tqdm.write(f"{name}: FAILED: {error}")
            if args.strict:
                print(f"error: {name}: {failed[name]}; stopped at the first failing case (--strict)", file=sys.stderr)
                return EXIT_NOTHING
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print(f"done in {time.time() - started:.1f} s: {len(written)} written, {len(skipped)} already there (skipped; "
          f"--overwrite redoes them), {len(failed)} failed -> {args.output_dir}")
    if scores:
        means = {key: float(np.mean([s[key] for s in scores])) for key in ("tc", "wt", "et", "mean_dice")}
        print(f"mean Dice over {len(scores)} case(s) (preprocessed grid): TC {means['tc']:.4f}  WT {means['wt']:.4f}  "
              f"ET {means['et']:.4f}  mean {means['mean_dice']:.4f}")
    if failed:
        print_case_failures(f"{len(failed)} case(s) failed:", failed)
        return EXIT_SOME_FAILED if (written or skipped) else EXIT_NOTHING
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
