#!/usr/bin/env python
"""Step 3 of the BraTS 2023 pipeline: train SegMamba (4 MRI channels -> 4 labels) on the preprocessed cases.

Reads ``DATA_DIR/*.npz`` (step 2), the shared ``splits.json`` (created from the sorted case names, 70/10/20
with seed 42, when it does not exist yet), samples random patches with foreground oversampling and
augmentation, and optimises SGD (lr 1e-2, momentum 0.99, Nesterov, weight decay 3e-5) with poly decay per
iteration, gradient clipping at 12 and AMP on CUDA. Every VAL_EVERY epochs the WHOLE validation volumes are
segmented with a sliding window and the model with the best mean Dice of TC/WT/ET is kept.

Outputs in LOGDIR: ``model/best_model.pt``, ``model/final_model.pt`` (the latest state; resumable),
``train.log``, ``progress.png``, TensorBoard events.

  single GPU / CPU:   python 3_train.py
  resume:             python 3_train.py --resume
  several GPUs:       torchrun --standalone --nproc_per_node 2 3_train.py

Exit codes: 0 done; 1 training stopped with an error (message printed); 2 bad settings (e.g. more GPUs
requested than exist).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

# Defaults (edit here or pass the flags).
DATA_DIR = "./data/fullres/train"
SPLITS_FILE = "./data/fullres/splits.json"    # shared with 4_predict.py and 5_compute_metrics.py
LOGDIR = "./logs/segmamba"
MAX_EPOCH = 1000
BATCH_SIZE = 2                                # per GPU
VAL_EVERY = 2                                 # epochs between validations
ROI = (128, 128, 128)                         # training patch = sliding-window size (Z Y X, multiples of 16)
NUM_GPUS = 1                                  # >1: start with torchrun --nproc_per_node N (see above)
DEVICE = "auto"                               # auto (CUDA if present, else CPU), cpu, cuda, cuda:N
ITERATIONS_PER_EPOCH = 250
LEARNING_RATE = 1e-2
LOSS = "ce"                                   # ce (as the reference) or dice_ce
AMP = "fp16"                                  # CUDA autocast dtype: fp16, bf16 or none (CPU: always fp32)
COMPILE = "auto"                              # torch.compile: auto (on CUDA; ~1.4x faster steps), on, off
CHANNELS_LAST = "auto"                        # channels-last 3D activations: auto (= with compile on CUDA), on, off
COMPILE_MEMORY_BUDGET = 1.0                   # < 1: compiled parts recompute cheap ops instead of keeping them
CUDA_GRAPHS = "auto"                          # replay each training step from a CUDA graph: auto (CUDA, 1 GPU), on, off
ACTIVATION_CHECKPOINTING = "off"              # off, mamba (~1.5 GiB less, ~14% slower), full_res, all: see README
NUM_WORKERS = 8                               # patch-loading processes per GPU
SEED = 42
OVERSAMPLE_FOREGROUND = 0.33                  # fraction of each batch centred on a tumour voxel
AUGMENTATION = "default"                      # default, nomirror, onlymirror, onlyspatial, none
VAL_OVERLAP = 0.5
VAL_SW_BATCH_SIZE = 2
MAX_VAL_CASES = 0                             # 0 = every validation case
MAX_NONFINITE_STEPS = 20                      # stop after this many NaN/Inf steps in a row
IN_CHANNELS = 4                               # t2w, t2f, t1n, t1c
NUM_CLASSES = 4                               # 0 background, 1 NCR, 2 ED, 3 ET
DEPTHS = (2, 2, 2, 2)
FEAT_SIZE = (48, 96, 192, 384)
HIDDEN_SIZE = 768


# SegMamba.set_activation_checkpointing modes (model_segmamba.segmamba.CHECKPOINT_MODES) and what they recompute
CHECKPOINT_DESCRIPTIONS = {"off": "nothing", "mamba": "the Mamba layers",
                           "full_res": "the three full-resolution blocks",
                           "all": "the Mamba layers and the three full-resolution blocks"}
EXIT_OK, EXIT_FAILED, EXIT_BAD_SETTINGS = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data_dir", default=DATA_DIR, help=f"preprocessed cases (default: {DATA_DIR})")
    add("--splits", default=SPLITS_FILE, help=f"shared train/val/test split, created if missing (default: {SPLITS_FILE})")
    add("--logdir", default=LOGDIR, help=f"checkpoints, log, plot, TensorBoard (default: {LOGDIR})")
    add("--max_epoch", type=int, default=MAX_EPOCH, help=f"(default: {MAX_EPOCH})")
    add("--batch_size", type=int, default=BATCH_SIZE, help=f"patches per step and GPU (default: {BATCH_SIZE})")
    add("--val_every", type=int, default=VAL_EVERY, help=f"validate every N epochs (default: {VAL_EVERY})")
    add("--roi", type=int, nargs=3, default=list(ROI), metavar=("Z", "Y", "X"),
        help=f"patch and sliding-window size, multiples of 16 (default: {' '.join(map(str, ROI))})")
    add("--num_gpus", type=int, default=NUM_GPUS, help=f"GPUs to use; >1 needs torchrun (default: {NUM_GPUS})")
    add("--device", default=DEVICE, help=f"auto, cpu, cuda or cuda:N (default: {DEVICE})")
    add("--iterations_per_epoch", type=int, default=ITERATIONS_PER_EPOCH,
        help=f"steps per epoch, shared by all GPUs (default: {ITERATIONS_PER_EPOCH})")
    add("--lr", type=float, default=LEARNING_RATE, help=f"initial learning rate (default: {LEARNING_RATE})")
    add("--loss", choices=["ce", "dice_ce"], default=LOSS, help=f"(default: {LOSS})")
    add("--amp", choices=["fp16", "bf16", "none"], default=AMP, help=f"mixed precision on CUDA (default: {AMP})")
    add("--compile", choices=["auto", "on", "off"], default=COMPILE,
        help=f"torch.compile the network; auto = on CUDA only, first step 1-2 min slower (default: {COMPILE})")
    add("--channels_last", choices=["auto", "on", "off"], default=CHANNELS_LAST,
        help="keep activations channels-last (NDHWC) so cuDNN's convolutions need no layout conversions; same "
             "results, ~12%% faster compiled steps on an H200; auto = when compiled on CUDA (without compiling "
             f"it needs about twice the memory) (default: {CHANNELS_LAST})")
    add("--compile_memory_budget", type=float, default=COMPILE_MEMORY_BUDGET, metavar="F",
        help="with --compile: Inductor's activation memory budget in (0, 1]; below 1 the compiled parts recompute "
             "cheap operations (norms, activations) in the backward pass instead of keeping their outputs (same "
             "results; batch 2 x 128^3 on an H200, measured before the fused Mamba function: 0.5 gave "
             "13.7 -> 11.6 GiB for 143 -> 147 ms per step) "
             f"(default: {COMPILE_MEMORY_BUDGET})")
    add("--cuda_graphs", choices=["auto", "on", "off"], default=CUDA_GRAPHS,
        help="capture the forward pass, loss and backward pass of a training step once as a CUDA graph and replay "
             "it, so the GPU never waits for Python (same results; batch 2 x 128^3 on an H200, compiled, "
             "channels-last: 158 -> 141 ms per step); auto = on CUDA with one GPU (default: "
             f"{CUDA_GRAPHS})")
    add("--activation_checkpointing", nargs="?", const="mamba", choices=list(CHECKPOINT_DESCRIPTIONS),
        default=ACTIVATION_CHECKPOINTING,
        help="recompute blocks in the backward pass instead of keeping their activations (same results, less "
             "memory, slower steps): mamba = the Mamba layers (the flag alone; batch 2 x 128^3 on an H200, "
             "compiled, channels-last, CUDA graphs: 11.9 -> 10.2 GiB, +14%% step time), full_res = the three "
             "full-resolution "
             f"blocks, all = both (default: {ACTIVATION_CHECKPOINTING})")
    add("--num_workers", type=int, default=NUM_WORKERS, help=f"patch-loading processes (default: {NUM_WORKERS})")
    add("--seed", type=int, default=SEED, help=f"(default: {SEED})")
    add("--oversample_foreground", type=float, default=OVERSAMPLE_FOREGROUND,
        help=f"(default: {OVERSAMPLE_FOREGROUND})")
    add("--augmentation", choices=["default", "nomirror", "onlymirror", "onlyspatial", "none"],
        default=AUGMENTATION, help=f"(default: {AUGMENTATION})")
    add("--val_overlap", type=float, default=VAL_OVERLAP, help=f"sliding-window overlap (default: {VAL_OVERLAP})")
    add("--val_sw_batch_size", type=int, default=VAL_SW_BATCH_SIZE, help=f"(default: {VAL_SW_BATCH_SIZE})")
    add("--max_val_cases", type=int, default=MAX_VAL_CASES,
        help=f"validate on the first N validation cases only; 0 = all (default: {MAX_VAL_CASES})")
    add("--max_nonfinite_steps", type=int, default=MAX_NONFINITE_STEPS,
        help=f"consecutive NaN/Inf steps before stopping (default: {MAX_NONFINITE_STEPS})")
    add("--depths", type=int, nargs=4, default=list(DEPTHS), help=f"Mamba layers per stage (default: {DEPTHS})")
    add("--feat_size", type=int, nargs=4, default=list(FEAT_SIZE),
        help=f"channels per encoder stage (default: {' '.join(map(str, FEAT_SIZE))})")
    add("--hidden_size", type=int, default=HIDDEN_SIZE, help=f"bottleneck channels (default: {HIDDEN_SIZE})")
    add("--resume", action="store_true", help="continue from LOGDIR/model/final_model.pt")
    add("--overwrite", action="store_true", help="start again although LOGDIR already holds a run")
    add("--deterministic", action="store_true", help="deterministic algorithms (slower; for exact resume on GPU)")
    add("--no_progress", action="store_true", help="no progress bars")
    add("--no_tensorboard", action="store_true", help="no TensorBoard events")
    return parser


def check_settings(args: argparse.Namespace) -> None:
    """Refuse impossible settings before anything heavy starts (ValueError with the flag named)."""
    bad = [s for s in args.roi if s <= 0 or s % 16]
    if bad:
        raise ValueError(f"--roi {' '.join(map(str, args.roi))}: every size must be a positive multiple of 16 "
                         "(SegMamba downsamples four times), e.g. 64, 96 or 128")
    for flag in ("max_epoch", "batch_size", "val_every", "iterations_per_epoch", "val_sw_batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.num_workers < 0 or args.max_val_cases < 0:
        raise ValueError("--num_workers and --max_val_cases must be >= 0")
    if not 0.0 <= args.oversample_foreground <= 1.0:
        raise ValueError(f"--oversample_foreground must be in [0, 1], got {args.oversample_foreground}")
    if not 0.0 < args.compile_memory_budget <= 1.0:
        raise ValueError(f"--compile_memory_budget must be in (0, 1], got {args.compile_memory_budget}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from light_training.distributed import run_training_script
    return run_training_script(args, check_settings, train, EXIT_BAD_SETTINGS, EXIT_FAILED)


def train(args: argparse.Namespace, context) -> int:
    import torch

    from light_training.augment import build_train_transforms
    from light_training.dataloading import CaseDataset, make_patch_loader
    from light_training.distributed import barrier
    from light_training.evaluation import brats_validation_dice
    from light_training.io import load_case
    from light_training.prediction import SlidingWindowConfig
    from light_training.splits import case_names_in_dir, load_or_create_splits
    from light_training.trainer import SegmentationLoss, Trainer, TrainerConfig, WholeVolumeValidator
    from model_segmamba import SegMamba

    main_process = context.is_main_process
    say = print if main_process else (lambda *a, **k: None)
    print(f"[rank {context.rank}/{context.world_size}] device {context.device}"
          + (f" ({torch.cuda.get_device_name(context.device)})" if context.device.type == "cuda" else ""), flush=True)

    names = case_names_in_dir(args.data_dir)
    if not names:
        raise FileNotFoundError(f"{args.data_dir}: no preprocessed cases (*.npz); run 2_preprocessing_mri.py first")
    if main_process:  # rank 0 creates the split file once; the others read it
        splits = load_or_create_splits(args.splits, names)
    barrier(context)
    if not main_process:
        splits = load_or_create_splits(args.splits, names, create=False)
    if not splits["train"]:
        raise ValueError(f"{args.splits}: the training split is empty")
    val_names = splits["val"][:args.max_val_cases] if args.max_val_cases else splits["val"]
    say(f"data: {args.data_dir} ({len(names)} cases) | split {args.splits}: {len(splits['train'])} train / "
        f"{len(splits['val'])} val / {len(splits['test'])} test" + (f" (validating on {len(val_names)})"
                                                                     if len(val_names) != len(splits['val']) else ""))

    model_config = {"in_chans": IN_CHANNELS, "out_chans": NUM_CLASSES, "depths": list(args.depths),
                    "feat_size": list(args.feat_size), "hidden_size": args.hidden_size}
    torch.manual_seed(args.seed)  # the same --seed gives the same initial weights (and DDP ranks agree anyway)
    model = SegMamba(**model_config)
    model.set_activation_checkpointing(args.activation_checkpointing)
    hardware = f"{context.world_size} GPU(s)" if context.device.type == "cuda" else "CPU"
    say(f"model: SegMamba({IN_CHANNELS} -> {NUM_CLASSES}), feat_size {args.feat_size}, depths {args.depths}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters | patch {tuple(args.roi)} | "
        f"batch {args.batch_size} per process | {hardware}"
        + ("" if args.activation_checkpointing == "off" else
           f" | activation checkpointing: {CHECKPOINT_DESCRIPTIONS[args.activation_checkpointing]}"))

    train_dataset = CaseDataset.from_folder(args.data_dir, splits["train"])
    transform = build_train_transforms(None if args.augmentation == "none" else args.augmentation)
    batches = functools.partial(make_patch_loader, train_dataset, tuple(args.roi), args.batch_size,
                                oversample_foreground=args.oversample_foreground, transform=transform,
                                num_workers=args.num_workers, seed=args.seed, rank=context.rank,
                                pin_memory=context.device.type == "cuda")

    validator = None
    if val_names:
        val_paths = [os.path.join(args.data_dir, f"{name}.npz") for name in val_names]

        def load_validation_case(index: int):
            data, seg, _ = load_case(val_paths[index], load_properties=False)
            if seg is None:
                raise ValueError(f"{val_paths[index]}: validation case has no 'seg' array")
            return data, seg[0]

        window = SlidingWindowConfig(roi_size=tuple(args.roi), overlap=args.val_overlap,
                                     sw_batch_size=args.val_sw_batch_size, amp_dtype=args.amp)
        validator = WholeVolumeValidator(load_validation_case, len(val_paths), window, brats_validation_dice,
                                         selection_key="mean_dice")
    else:
        say("warning: no validation cases: no model selection, only final_model.pt is written")

    config = TrainerConfig(logdir=args.logdir, max_epochs=args.max_epoch, iterations_per_epoch=args.iterations_per_epoch,
                           val_every=args.val_every, learning_rate=args.lr, amp_dtype=args.amp, seed=args.seed,
                           deterministic=args.deterministic, max_consecutive_nonfinite=args.max_nonfinite_steps,
                           selection_key="mean_dice", progress_bar=not args.no_progress,
                           tensorboard=not args.no_tensorboard, compile=args.compile,
                           channels_last=args.channels_last, cuda_graphs=args.cuda_graphs,
                           compile_memory_budget=args.compile_memory_budget)
    run_settings = {key: (list(value) if isinstance(value, tuple) else value) for key, value in vars(args).items()}
    trainer = Trainer(model, config, batches, loss_fn=SegmentationLoss(args.loss), validator=validator,
                      context=context, model_config=model_config, run_settings=run_settings)
    if trainer.compiled and args.activation_checkpointing in ("full_res", "all"):
        say("note: with --compile, checkpointing the full-resolution blocks was measured to save no memory (H200, "
            "batch 2 x 128^3: compiled full_res 15.4 GiB vs 14.7 GiB without; all 11.2 GiB vs mamba 11.0 GiB, "
            "and slower); --activation_checkpointing mamba is the better choice there")
    say(f"training {args.max_epoch} epochs x {trainer.steps_per_epoch} steps, loss {args.loss}, validation every "
        f"{args.val_every} epochs on whole volumes -> {args.logdir}")
    result = trainer.fit(resume=args.resume, overwrite=args.overwrite)
    trainer.close()
    if main_process:
        print(f"done: best mean Dice (TC/WT/ET) {result.best_metric:.4f} at epoch {result.best_epoch + 1}; "
              f"{result.nonfinite_steps} non-finite step(s) skipped")
        for path in (result.best_checkpoint, result.final_checkpoint):
            if path is not None:
                print(f"  {path}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
