#!/usr/bin/env python
"""ABUS step 3: train SegMamba-Retina (segmentation + 3D RetinaNet detection) on the preprocessed ABUS cases.

The backbone is usually initialised from the segmentation model of step 2 (``--pretrained_seg``; a missing
file is an error) and frozen (``--freeze_backbone``: only the FPN and the detection head train). Training uses
the shared trainer: AdamW, poly learning rate per iteration, foreground-biased patches (``--fg_ratio``) with
mirror augmentation, ATSS matching, hard-negative mining, focal (``--focal_alpha``, ``--focal_gamma``) +
smooth-L1 + GIoU losses, a linear detection-loss warm-up (``--det_warmup_epochs``), validation every
``--val_every`` epochs on whole volumes (``--full_volume_val``) or on fixed lesion-centred patches, resume with
``--resume``, TensorBoard, ``train.log`` and ``progress.png`` in ``--save_dir``.

Model selection (``best_model.pt``) with ``--selection_metric auto``: the FROC score at IoU 0.3 (mean lesion
sensitivity at 1/8 … 8 false positives per volume, TDSC-ABUS 2023) when the backbone is frozen, because the
Dice cannot change then; ``combined`` = (Dice + FROC@0.3) / 2 when the whole model trains.
``final_model.pt`` is the last epoch. Both hold the architecture (``model_config``) and the training window, so
``abus_retina_predict.py`` rebuilds the same model.

One epoch is one pass over the training cases (``ceil(cases / batch_size)`` iterations) unless
``--iterations_per_epoch`` says otherwise. A step with a NaN/Inf loss or gradient is skipped, counted and logged;
``--max_nonfinite_steps`` such steps in a row stop training. Exit codes: 0 done; 1 stopped with an error (printed);
2 impossible settings (e.g. more GPUs than exist).
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from typing import List, Optional

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DATA_DIR_TRAIN = "./data/abus/train"
DATA_DIR_VAL = "./data/abus/val"
SAVE_DIR = "./logs/segmamba_abus_retina"
PATCH_SIZE = (128, 128, 128)
EXIT_OK, EXIT_ERROR, EXIT_BAD_SETTINGS = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--data_dir_train", default=DATA_DIR_TRAIN, help="preprocessed training cases (.npz + .json)")
    add("--data_dir_val", default=DATA_DIR_VAL, help="preprocessed validation cases")
    add("--pretrained_seg", default="", help="SegMamba checkpoint (abus_train.py) to initialise the backbone from; "
                                             "a given path that does not exist is an error")
    add("--fpn_channels", type=int, default=128, help="FPN and detection-head width")
    add("--num_head_convs", type=int, default=4, help="convolutions per head tower")
    add("--max_epoch", type=int, default=500, help="training epochs")
    add("--batch_size", type=int, default=2, help="patches per iteration")
    add("--lr", type=float, default=1e-4, help="AdamW learning rate")
    add("--weight_decay", type=float, default=1e-5, help="AdamW weight decay")
    add("--fg_ratio", type=float, default=0.5, help="probability that a training patch is centred on a lesion")
    add("--seg_weight", type=float, default=1.0, help="weight of the segmentation loss (CE + Dice)")
    add("--det_weight", type=float, default=1.0, help="weight of the detection loss")
    add("--det_warmup_epochs", type=int, default=50,
        help="epochs of linear ramp-up of the detection weight, min(1, epoch / N) (0 = none)")
    add("--focal_alpha", type=float, default=0.25, help="focal-loss alpha (weight of positive anchors)")
    add("--focal_gamma", type=float, default=2.0, help="focal-loss gamma")
    add("--atss_candidates", type=int, default=9, help="ATSS candidate locations per pyramid level")
    add("--sampler_batch_size", type=int, default=256, help="anchors sampled per patch for the classification loss")
    add("--sampler_pos_fraction", type=float, default=0.25, help="maximum fraction of positives among them")
    add("--full_volume_val", action="store_true",
        help="validate on whole volumes (sliding window) instead of fixed lesion-centred patches")
    add("--freeze_backbone", action="store_true",
        help="train only the FPN and detection head (encoder, decoder and segmentation head frozen)")
    add("--save_dir", default=SAVE_DIR, help="run folder: model/{best,final}_model.pt, train.log, progress.png")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add("--num_workers", type=int, default=4, help="background processes preparing patches")
    add("--seed", type=int, default=42, help="random seed (patches, initialisation, sampling)")
    # Beyond the reference's flags.
    add("--patch_size", type=int, nargs=3, default=list(PATCH_SIZE), metavar=("Z", "Y", "X"),
        help="training patch and validation window (multiples of 16, at least 32)")
    add("--iterations_per_epoch", type=int, default=0, help="iterations per epoch (0 = one pass over the cases)")
    add("--val_every", type=int, default=1, help="validate every N epochs (and after the last)")
    add("--overlap", type=float, default=0.5, help="sliding-window overlap for whole-volume validation")
    add("--score_threshold", type=float, default=0.05, help="detection score threshold during validation")
    add("--nms_threshold", type=float, default=0.5, help="NMS IoU threshold during validation")
    add("--selection_metric", default="auto", choices=("auto", "froc_iou0.3", "ap_iou0.25", "dice", "combined"),
        help="validation metric that picks best_model.pt (auto: froc_iou0.3 if frozen, else combined)")
    add("--depths", type=int, nargs=4, default=None,
        help="Mamba layers per encoder stage (default: from --pretrained_seg's checkpoint, else 2 2 2 2)")
    add("--feat_size", type=int, nargs=4, default=None,
        help="encoder widths (default: from --pretrained_seg's checkpoint, else 48 96 192 384)")
    add("--hidden_size", type=int, default=None, help="bottleneck width (default: from the checkpoint, else 768)")
    add("--no_mirror", action="store_true", help="no mirror augmentation of training patches")
    add("--amp", default="fp16", choices=("fp16", "bf16", "none"), help="mixed precision on CUDA")
    add("--num_gpus", type=int, default=1, help="GPUs (more than 1: start with torchrun)")
    add("--resume", action="store_true", help="continue the run in --save_dir from model/final_model.pt")
    add("--overwrite", action="store_true", help="start again even if --save_dir holds a run")
    add("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    add("--max_nonfinite_steps", type=int, default=20,
        help="consecutive steps with a NaN/Inf loss or gradient (each skipped) before training stops")
    add("--no_progress", action="store_true", help="no progress bars")
    return parser


def model_arguments(args, pretrained_config: Optional[dict]) -> dict:
    """Architecture: defaults, then the pretrained checkpoint's backbone, then explicit flags."""
    config = {"in_chans": 1, "out_chans": 2, "depths": [2, 2, 2, 2], "feat_size": [48, 96, 192, 384],
              "hidden_size": 768}
    for key in ("in_chans", "out_chans", "depths", "feat_size", "hidden_size"):
        if pretrained_config and key in pretrained_config:
            config[key] = pretrained_config[key]
    if args.depths is not None:
        config["depths"] = list(args.depths)
    if args.feat_size is not None:
        config["feat_size"] = list(args.feat_size)
    if args.hidden_size is not None:
        config["hidden_size"] = args.hidden_size
    config.update(fpn_channels=args.fpn_channels, num_head_convs=args.num_head_convs)
    return config


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_nonfinite_steps < 1:
        print(f"error: --max_nonfinite_steps must be >= 1, got {args.max_nonfinite_steps}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    from detection.atss_matcher import ATSSMatcher
    from detection.losses import RetinaDetectionLoss
    from detection.retina_training import RetinaTrainer, RetinaValidator, make_retina_patch_loader
    from detection.sampler import HardNegativeSampler
    from detection.sliding_window import RetinaInferenceConfig
    from light_training.dataloading import CaseDataset
    from light_training.distributed import DeviceRequestError, cleanup_distributed, setup_distributed
    from light_training.checkpoint import CheckpointError
    from light_training.trainer import NonFiniteTrainingError, TrainerConfig, TrainingSetupError
    from model_segmamba.segmamba_retina import (PretrainedLoadError, SegMambaWithRetina, freeze_backbone,
                                                load_pretrained_segmamba)
    from model_segmamba.weights import read_checkpoint

    try:
        context = setup_distributed(args.device, args.num_gpus)
    except DeviceRequestError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    try:
        pretrained_config = None
        if args.pretrained_seg:
            if not os.path.isfile(args.pretrained_seg):
                raise FileNotFoundError(f"--pretrained_seg {args.pretrained_seg}: file not found (train the "
                                        "segmentation model first with abus_train.py, or leave the flag out to "
                                        "start from random weights)")
            pretrained_config = read_checkpoint(args.pretrained_seg).get("model_config")
        torch.manual_seed(args.seed)
        model = SegMambaWithRetina(**model_arguments(args, pretrained_config))
        if args.pretrained_seg:
            report = load_pretrained_segmamba(model, args.pretrained_seg)
            if context.is_main_process:
                print(report.summary())
        elif args.freeze_backbone and context.is_main_process:
            print("warning: --freeze_backbone without --pretrained_seg freezes a randomly initialised backbone",
                  file=sys.stderr)
        # The centerness branch is never trained (nor used for scoring); keeping it out of the optimiser also
        # keeps DDP from waiting for its gradients.
        for parameter in model.retina_head.centerness.parameters():
            parameter.requires_grad_(False)
        if args.freeze_backbone:
            freeze_backbone(model)
        elif args.seg_weight <= 0:
            # Without a segmentation loss the decoder and segmentation head cannot learn; freezing them keeps
            # them out of AdamW's weight decay and DDP from waiting for their gradients.
            for name, parameter in model.named_parameters():
                if name.startswith(("encoder", "decoder", "seg_out.")):
                    parameter.requires_grad_(False)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        train_set = CaseDataset.from_folder(args.data_dir_train, cache_arrays=True)
        val_set = CaseDataset.from_folder(args.data_dir_val, cache_arrays=True)
    except (FileNotFoundError, ValueError, PretrainedLoadError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        cleanup_distributed()
        return EXIT_ERROR

    iterations = args.iterations_per_epoch or math.ceil(len(train_set) / args.batch_size)
    selection = args.selection_metric
    if selection == "auto":
        selection = "froc_iou0.3" if args.freeze_backbone else "combined"
    config = TrainerConfig(logdir=args.save_dir, max_epochs=args.max_epoch, iterations_per_epoch=iterations,
                           val_every=args.val_every, learning_rate=args.lr, weight_decay=args.weight_decay,
                           amp_dtype=args.amp, seed=args.seed, deterministic=args.deterministic,
                           selection_key=selection, selection_mode="max", progress_bar=not args.no_progress,
                           max_consecutive_nonfinite=args.max_nonfinite_steps)
    patch = tuple(args.patch_size)
    # Data factory: the trainer opens it once at start_batch = global_step, so a resumed run continues the
    # exact batch sequence of an uninterrupted one.
    batches = functools.partial(make_retina_patch_loader, train_set, patch, args.batch_size, fg_ratio=args.fg_ratio,
                                mirror=not args.no_mirror, seed=args.seed, rank=context.rank,
                                num_workers=args.num_workers, pin_memory=context.device.type == "cuda")
    inference = RetinaInferenceConfig(patch_size=patch, overlap=args.overlap, batch_size=args.batch_size,
                                      score_threshold=args.score_threshold, nms_threshold=args.nms_threshold,
                                      amp=args.amp != "none")
    validator = RetinaValidator(val_set, inference, mode="volume" if args.full_volume_val else "patch",
                                selection_key=selection, seed=args.seed)
    loss = RetinaDetectionLoss(ATSSMatcher(num_candidates=args.atss_candidates),
                               HardNegativeSampler(args.sampler_batch_size, args.sampler_pos_fraction),
                               model.box_coder, focal_alpha=args.focal_alpha, focal_gamma=args.focal_gamma)
    try:
        trainer = RetinaTrainer(model, config, batches, loss, validator=validator, context=context,
                                model_config=model.model_config(), seg_weight=args.seg_weight,
                                det_weight=args.det_weight, det_warmup_epochs=args.det_warmup_epochs,
                                train_segmentation=not args.freeze_backbone and args.seg_weight > 0,
                                inference_settings={"patch_size": list(patch), "overlap": args.overlap,
                                                    "score_threshold": args.score_threshold,
                                                    "nms_threshold": args.nms_threshold,
                                                    "freeze_backbone": args.freeze_backbone,
                                                    "pretrained_seg": args.pretrained_seg},
                                run_settings={key: (list(value) if isinstance(value, tuple) else value)
                                              for key, value in vars(args).items()})
        trainer.logger.info(f"SegMamba-Retina: {sum(p.numel() for p in model.parameters()):,} parameters, "
                            f"{trainable:,} trainable{' (backbone frozen)' if args.freeze_backbone else ''}; "
                            f"{len(train_set)} training / {len(val_set)} validation cases; {iterations} iterations "
                            f"per epoch; model selection on {selection}")
        result = trainer.fit(resume=args.resume, overwrite=args.overwrite)
        trainer.close()
    except (TrainingSetupError, NonFiniteTrainingError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        cleanup_distributed()
    if context.is_main_process:
        print(f"done: best {selection} {result.best_metric:.4f} at epoch {result.best_epoch + 1}; "
              f"checkpoints: {result.best_checkpoint} and {result.final_checkpoint}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
