#!/usr/bin/env python
"""ABUS step 2: train SegMamba (1 ultrasound channel -> 2 classes: background, lesion) for segmentation.

Reads the preprocessed cases of ``--data_dir_train`` / ``--data_dir_val`` (``abus_preprocessing.py``), samples
random patches with foreground oversampling and the default augmentation, optimises CE + Dice with SGD
(lr 1e-2, momentum 0.99, Nesterov, weight decay 3e-5), poly decay per iteration, gradient clipping and AMP on
CUDA (the shared trainer). Every ``--val_every`` epochs the WHOLE validation volumes are segmented with a
sliding window; the model with the best mean lesion Dice is kept.

Outputs in ``--logdir``: ``model/best_model.pt``, ``model/final_model.pt`` (latest state, resumable with
``--resume``), ``train.log``, ``progress.png``, TensorBoard events. The checkpoints store the architecture, so
``abus_retina_train.py --pretrained_seg`` and ``abus_seg_box_eval.py --model_path`` rebuild the same network.

Exit codes: 0 done; 1 training stopped with an error; 2 bad settings.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import List, Optional

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DATA_DIR_TRAIN = "./data/abus/train"
DATA_DIR_VAL = "./data/abus/val"
LOGDIR = "./logs/segmamba_abus"
EXIT_OK, EXIT_FAILED, EXIT_BAD_SETTINGS = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--data_dir_train", default=DATA_DIR_TRAIN, help="preprocessed training cases")
    add("--data_dir_val", default=DATA_DIR_VAL, help="preprocessed validation cases")
    add("--logdir", default=LOGDIR, help="run folder: model/{best,final}_model.pt, train.log, progress.png")
    add("--max_epoch", type=int, default=1000, help="training epochs")
    add("--batch_size", type=int, default=2, help="patches per step (per GPU)")
    add("--val_every", type=int, default=2, help="validate every N epochs (and after the last)")
    add("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    add("--lr", type=float, default=0.01, help="initial SGD learning rate")
    add("--num_workers", type=int, default=8, help="patch-loading processes")
    add("--patch_size", type=int, nargs=3, default=[128, 128, 128], metavar=("Z", "Y", "X"),
        help="training patch and sliding-window size (multiples of 16)")
    add("--iterations_per_epoch", type=int, default=250, help="steps per epoch")
    add("--oversample_foreground", type=float, default=0.33, help="fraction of each batch centred on a lesion voxel")
    add("--augmentation", choices=["default", "nomirror", "onlymirror", "onlyspatial", "none"], default="default",
        help="training augmentation")
    add("--val_overlap", type=float, default=0.5, help="sliding-window overlap during validation")
    add("--max_val_cases", type=int, default=0, help="validate on the first N cases only (0 = all)")
    add("--amp", choices=["fp16", "bf16", "none"], default="fp16", help="mixed precision on CUDA")
    add("--compile", choices=["auto", "on", "off"], default="auto",
        help="torch.compile the network (auto: on CUDA only; the first step takes 1-2 min longer)")
    add("--channels_last", choices=["auto", "on", "off"], default="auto",
        help="channels-last (NDHWC) activations, faster convolutions, same results (auto: when compiled on CUDA)")
    add("--compile_memory_budget", type=float, default=1.0, metavar="F",
        help="with --compile: Inductor's activation memory budget in (0, 1]; below 1 cheap operations are recomputed "
             "in the backward pass instead of kept (less memory, slightly slower steps; default: 1.0)")
    add("--cuda_graphs", choices=["auto", "on", "off"], default="auto",
        help="replay each training step (forward, loss, backward) from a CUDA graph; same results, faster "
             "(auto: on CUDA with one GPU)")
    add("--seed", type=int, default=42, help="random seed")
    add("--depths", type=int, nargs=4, default=[2, 2, 2, 2], help="Mamba layers per encoder stage")
    add("--feat_size", type=int, nargs=4, default=[48, 96, 192, 384], help="channels per encoder stage")
    add("--hidden_size", type=int, default=768, help="bottleneck channels")
    add("--num_gpus", type=int, default=1, help="GPUs (more than 1: start with torchrun)")
    add("--resume", action="store_true", help="continue from LOGDIR/model/final_model.pt")
    add("--overwrite", action="store_true", help="start again although LOGDIR already holds a run")
    add("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    add("--max_nonfinite_steps", type=int, default=20,
        help="consecutive steps with a NaN/Inf loss or gradient (each skipped) before training stops")
    add("--no_progress", action="store_true", help="no progress bars")
    return parser


def check_settings(args: argparse.Namespace) -> None:
    if any(s <= 0 or s % 16 for s in args.patch_size):
        raise ValueError(f"--patch_size {args.patch_size}: every size must be a positive multiple of 16")
    for flag in ("max_epoch", "batch_size", "val_every", "iterations_per_epoch", "max_nonfinite_steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not 0.0 <= args.oversample_foreground <= 1.0:
        raise ValueError(f"--oversample_foreground must be in [0, 1], got {args.oversample_foreground}")
    if not 0.0 < args.compile_memory_budget <= 1.0:
        raise ValueError(f"--compile_memory_budget must be in (0, 1], got {args.compile_memory_budget}")


def lesion_dice(prediction, ground_truth) -> dict:
    """Validation metric of one case: Dice of the lesion label (both empty counts as 1)."""
    from light_training.evaluation import dice

    value = dice(prediction > 0, ground_truth > 0, empty="brats")
    return {"dice": value, "mean_dice": value}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from light_training.distributed import run_training_script
    return run_training_script(args, check_settings, train, EXIT_BAD_SETTINGS, EXIT_FAILED)


def train(args: argparse.Namespace, context) -> int:
    from light_training.augment import build_train_transforms
    from light_training.dataloading import CaseDataset, make_patch_loader
    from light_training.prediction import SlidingWindowConfig
    from light_training.trainer import SegmentationLoss, Trainer, TrainerConfig, WholeVolumeValidator
    from model_segmamba import SegMamba

    say = print if context.is_main_process else (lambda *a, **k: None)
    train_set = CaseDataset.from_folder(args.data_dir_train)
    val_set = CaseDataset.from_folder(args.data_dir_val, cache_arrays=True)
    val_count = min(len(val_set), args.max_val_cases) if args.max_val_cases else len(val_set)
    model_config = {"in_chans": 1, "out_chans": 2, "depths": list(args.depths), "feat_size": list(args.feat_size),
                    "hidden_size": args.hidden_size}
    model = SegMamba(**model_config)
    say(f"SegMamba(1 -> 2): {sum(p.numel() for p in model.parameters()):,} parameters; {len(train_set)} training / "
        f"{val_count} validation cases; patch {tuple(args.patch_size)}; device {context.device}")

    transform = build_train_transforms(None if args.augmentation == "none" else args.augmentation)
    # Data factory: opened once by the trainer at start_batch = global_step (exact resume).
    batches = functools.partial(make_patch_loader, train_set, tuple(args.patch_size), args.batch_size,
                                oversample_foreground=args.oversample_foreground, transform=transform,
                                num_workers=args.num_workers, seed=args.seed, rank=context.rank,
                                pin_memory=context.device.type == "cuda")

    def load_validation_case(index: int):
        data, seg = val_set.arrays(index)
        if seg is None:
            raise ValueError(f"{val_set.paths[index]}: validation case has no 'seg' array")
        return data, seg[0]

    window = SlidingWindowConfig(roi_size=tuple(args.patch_size), overlap=args.val_overlap, sw_batch_size=1,
                                 amp_dtype=args.amp)
    validator = WholeVolumeValidator(load_validation_case, val_count, window, lesion_dice, selection_key="mean_dice")
    config = TrainerConfig(logdir=args.logdir, max_epochs=args.max_epoch, iterations_per_epoch=args.iterations_per_epoch,
                           val_every=args.val_every, learning_rate=args.lr, amp_dtype=args.amp, seed=args.seed,
                           deterministic=args.deterministic, selection_key="mean_dice",
                           max_consecutive_nonfinite=args.max_nonfinite_steps, progress_bar=not args.no_progress,
                           compile=args.compile, channels_last=args.channels_last,
                           cuda_graphs=args.cuda_graphs, compile_memory_budget=args.compile_memory_budget)
    # Kept in the checkpoint: abus_seg_box_eval.py takes the training patch as its window from here.
    run_settings = {key: (list(value) if isinstance(value, tuple) else value) for key, value in vars(args).items()}
    trainer = Trainer(model, config, batches, loss_fn=SegmentationLoss("dice_ce"), validator=validator,
                      context=context, model_config=model_config, run_settings=run_settings)
    result = trainer.fit(resume=args.resume, overwrite=args.overwrite)
    trainer.close()
    say(f"done: best lesion Dice {result.best_metric:.4f} at epoch {result.best_epoch + 1}; checkpoints: "
        f"{result.best_checkpoint} and {result.final_checkpoint}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
