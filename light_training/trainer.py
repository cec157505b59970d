"""The training loop shared by the BraTS and ABUS scripts.

``Trainer`` owns optimisation (SGD + Nesterov, poly LR per iteration, gradient clipping, AMP on CUDA),
non-finite-step protection, whole-volume validation with model selection, checkpoints that resume exactly,
and what the user sees (tqdm, ``train.log``, TensorBoard, ``progress.png``). It knows nothing about the model
or the data beyond two hooks a subclass may override:

* :meth:`Trainer.training_step` — batch → scalar loss (default: ``loss_fn(model(batch["data"]), batch["seg"])``);
* a :class:`Validator` — model → metric dict per validation case, plus the key used for model selection.

On CUDA in a single process (``TrainerConfig.cuda_graphs``) the forward pass, the loss and the backward pass
of each batch are replayed from a CUDA graph (:class:`light_training.cuda_graphs.GraphedTrainingStep`); a
subclass that overrides ``training_step`` trains without (it may override ``batch_tensors`` /
``compute_loss`` instead and keep them).

Under ``torchrun`` every process runs the same loop on its own shard of the patch stream (seeded by rank);
DDP averages gradients, validation cases are split over ranks and gathered, and only rank 0 writes files.

Exact resume: the training data are given as a factory ``start_batch -> iterable of batches`` (e.g.
``functools.partial(make_patch_loader, ..., rank=rank)``, called as ``factory(start_batch=n)``). The trainer calls it
once per ``fit()`` with the number of steps already done, so a resumed run draws the same batches as an
uninterrupted one; Python/NumPy/torch RNGs are re-seeded at every epoch start from (seed, rank, epoch).
"""
from __future__ import annotations

import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from model_segmamba.channels_last import CHOICES as CHANNELS_LAST_CHOICES, should_use_channels_last, use_channels_last

from .checkpoint import (CHECKPOINT_FORMAT, CheckpointError, capture_rng_state, load_checkpoint,
                         restore_rng_state, save_checkpoint_atomic, tensors_are_finite)
from .distributed import DistributedContext, all_gather_objects, all_reduce_mean
from .lr_scheduler import PolyLRScheduler
from .compile import CHOICES as COMPILE_CHOICES, check_memory_budget, compile_network, should_compile
from .cuda_graphs import GraphedTrainingStep
from .prediction import SlidingWindowConfig, SlidingWindowPredictor, labels_from_probabilities
from .progress import TrainingHistory, plot_progress, setup_logging
from .utils.files import remove_stale_temporaries

CUDA_GRAPHS_CHOICES = ("auto", "on", "off")
BEST_CHECKPOINT = "best_model.pt"
FINAL_CHECKPOINT = "final_model.pt"


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive steps produced a NaN/Inf loss or gradient."""


class TrainingSetupError(RuntimeError):
    """The run cannot start as asked (e.g. it would overwrite an existing run)."""


@dataclass
class TrainerConfig:
    """Every knob of the loop (plain types: stored in checkpoints).

    ``iterations_per_epoch`` is the global count; under DDP each of ``world_size`` ranks runs
    ``iterations_per_epoch // world_size`` steps (as the reference did), so an epoch sees the same number of
    patches whatever the GPU count. ``amp_dtype`` applies on CUDA only; the CPU always trains in fp32.
    """

    logdir: str = "./logs/run"
    max_epochs: int = 1000
    iterations_per_epoch: int = 250
    val_every: int = 2
    learning_rate: float = 1e-2
    momentum: float = 0.99
    nesterov: bool = True
    weight_decay: float = 3e-5
    poly_exponent: float = 0.9
    grad_clip_norm: float = 12.0
    amp_dtype: str = "fp16"
    seed: int = 42
    deterministic: bool = False
    max_consecutive_nonfinite: int = 20
    selection_key: str = "mean_dice"
    selection_mode: str = "max"
    save_every: int = 1
    tensorboard: bool = True
    progress_bar: bool = True
    compile: str = "off"  # torch.compile the network: auto (CUDA only), on, off (light_training.compile)
    channels_last: str = "auto"  # channels-last 3D activations: auto (= when compiled on CUDA), on, off
    cuda_graphs: str = "off"  # replay forward+loss+backward from CUDA graphs: auto (CUDA, one process), on, off
    compile_memory_budget: float = 1.0  # (0, 1]: Inductor's activation memory budget when compiled (compile.py)

    def __post_init__(self) -> None:
        if self.amp_dtype not in ("fp16", "bf16", "none"):
            raise ValueError(f"amp_dtype must be fp16, bf16 or none, got {self.amp_dtype!r}")
        if self.compile not in COMPILE_CHOICES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {self.compile!r}")
        if self.channels_last not in CHANNELS_LAST_CHOICES:
            raise ValueError(f"channels_last must be one of {', '.join(CHANNELS_LAST_CHOICES)}, "
                             f"got {self.channels_last!r}")
        check_memory_budget(self.compile_memory_budget)
        if self.cuda_graphs not in CUDA_GRAPHS_CHOICES:
            raise ValueError(f"cuda_graphs must be one of {', '.join(CUDA_GRAPHS_CHOICES)}, "
                             f"got {self.cuda_graphs!r}")
        if self.selection_mode not in ("max", "min"):
            raise ValueError(f"selection_mode must be max or min, got {self.selection_mode!r}")
        for name in ("max_epochs", "iterations_per_epoch", "val_every", "save_every", "max_consecutive_nonfinite"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class Validator(Protocol):
    """Whole-volume validation: one metric dict per case; the trainer averages them (NaN-aware)."""

    selection_key: str

    def num_cases(self) -> int: ...

    def evaluate_case(self, model: torch.nn.Module, index: int, device: torch.device) -> Dict[str, float]: ...


@dataclass
class TrainingResult:
    """What :meth:`Trainer.fit` returns."""

    last_epoch: int
    best_metric: float
    best_epoch: int
    last_metrics: Dict[str, float]
    nonfinite_steps: int
    best_checkpoint: Optional[Path]
    final_checkpoint: Optional[Path]


# ------------------------------------------------------------------------------------------------ losses
class SegmentationLoss(torch.nn.Module):
    """``ce`` (the reference's BraTS loss) or ``dice_ce`` (CE + soft Dice over the foreground classes).

    ``logits`` ``(B, K, *S)``; ``target`` ``(B, 1, *S)`` or ``(B, *S)`` integer labels (negative values,
    the preprocessing's "outside the image" marker, count as background).
    """

    def __init__(self, kind: str = "ce") -> None:
        super().__init__()
        if kind not in ("ce", "dice_ce"):
            raise ValueError(f"loss must be 'ce' or 'dice_ce', got {kind!r}")
        self.kind = kind
        self.dice = None
        if kind == "dice_ce":
            from monai.losses import DiceLoss
            self.dice = DiceLoss(to_onehot_y=True, softmax=True, include_background=False,
                                 smooth_nr=1e-5, smooth_dr=1e-5, batch=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == logits.ndim:
            target = target[:, 0]
        target = target.long().clamp_min(0)
        loss = F.cross_entropy(logits.float(), target)
        if self.dice is not None:
            loss = loss + self.dice(logits.float(), target[:, None])
        return loss


# ------------------------------------------------------------------------------------------- validation
class WholeVolumeValidator:
    """Validation on whole preprocessed volumes with sliding-window inference (not random patches).

    Args:
        case_loader: index → ``(data (C, Z, Y, X) float32, seg (Z, Y, X) or (1, Z, Y, X) int)``.
        num_cases: how many validation cases ``case_loader`` serves.
        window: sliding-window settings (ROI = the training patch size).
        metric_fn: ``(predicted labels, ground-truth labels)`` both ``(Z, Y, X)`` → metric dict.
        selection_key: the metric used to pick ``best_model.pt`` (e.g. ``mean_dice``).
    """

    def __init__(self, case_loader: Callable[[int], Tuple[np.ndarray, np.ndarray]], num_cases: int,
                 window: SlidingWindowConfig, metric_fn: Callable[[np.ndarray, np.ndarray], Dict[str, float]],
                 selection_key: str = "mean_dice") -> None:
        self.case_loader = case_loader
        self._num_cases = int(num_cases)
        self.window = window
        self.metric_fn = metric_fn
        self.selection_key = selection_key

    def num_cases(self) -> int:
        return self._num_cases

    def evaluate_case(self, model: torch.nn.Module, index: int, device: torch.device) -> Dict[str, float]:
        data, seg = self.case_loader(index)
        seg = np.asarray(seg)
        if seg.ndim == 4:
            seg = seg[0]
        predictor = SlidingWindowPredictor(self.window, device=device)
        labels = labels_from_probabilities(predictor.predict_probabilities(model, np.asarray(data, np.float32)))
        return {k: float(v) for k, v in self.metric_fn(labels, np.maximum(seg, 0)).items()}


def nanmean_metrics(rows: Sequence[Mapping[str, float]]) -> Dict[str, float]:
    """Mean of every key over cases, ignoring NaN (a key that is NaN everywhere stays NaN)."""
    keys = sorted({key for row in rows for key in row})
    summary = {}
    for key in keys:
        values = np.array([row.get(key, math.nan) for row in rows], dtype=np.float64)
        finite = values[~np.isnan(values)]
        summary[key] = float(finite.mean()) if finite.size else math.nan
    return summary


# ---------------------------------------------------------------------------------------------- trainer
def _epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """A 31-bit seed unique to (run seed, rank, epoch): each rank draws its own patches every epoch, and a
    resumed run re-derives exactly the seeds of an uninterrupted one."""
    return int(np.random.SeedSequence([int(seed), int(rank), int(epoch)]).generate_state(1)[0] & 0x7FFFFFFF)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Training loop with resume, DDP and model selection.

    Args:
        model: the network (not yet wrapped in DDP; the trainer wraps it under ``torchrun``).
        config: loop settings.
        train_data: batches ``{"data": (B, C, *patch) float, "seg": (B, 1, *patch) int, ...}``, either as a
            factory ``f(start_batch=n) -> iterable`` (resumes exactly: called with the steps already done)
            or as a plain iterable (iterated from its start; restarted when exhausted).
        loss_fn: ``(logits, seg) -> scalar`` used by the default :meth:`training_step`.
        validator: whole-volume validator (or ``None``: no validation, no ``best_model.pt``).
        context: device / rank / world size from :func:`light_training.distributed.setup_distributed`.
        model_config: plain keyword arguments that rebuild the model (stored in checkpoints for prediction).
        run_settings: plain-typed settings of the calling script (patch size, data paths...) kept in the
            checkpoint for provenance and for the prediction script's defaults.
    """

    def __init__(self, model: torch.nn.Module, config: TrainerConfig,
                 train_data: Union[Iterable[Mapping[str, Any]], Callable[[int], Iterable[Mapping[str, Any]]]],
                 loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                 validator: Optional[Validator] = None, context: Optional[DistributedContext] = None,
                 model_config: Optional[Dict[str, Any]] = None,
                 run_settings: Optional[Dict[str, Any]] = None) -> None:
        self.config = config
        self.context = context or DistributedContext(device=torch.device("cpu"))
        self.device = self.context.device
        self.model = model.to(self.device)
        self.network: torch.nn.Module = self.model  # the DDP wrapper once fit() starts
        self.train_data = train_data
        self._batch_iterator: Optional[Iterator[Mapping[str, Any]]] = None
        self.loss_fn = loss_fn or SegmentationLoss("ce")
        self.validator = validator
        self.model_config = dict(model_config or {})
        self.run_settings = dict(run_settings or {})
        self.logdir = Path(config.logdir)
        self.model_dir = self.logdir / "model"
        self.logger = setup_logging(self.logdir, self.context.is_main_process, self.context.rank)
        self.channels_last = should_use_channels_last(config.channels_last, self.device,
                                                      should_compile(config.compile, self.device))
        if self.channels_last:  # before compiling, so the compiled graphs see the final layout
            use_channels_last(self.model)
            self.logger.info("channels-last 3D activations (--channels_last off to disable)")
        self.compiled = compile_network(self.model, config.compile, self.device, say=self.logger.info,
                                        memory_budget=config.compile_memory_budget)

        self.steps_per_epoch = max(1, config.iterations_per_epoch // self.context.world_size)
        self.total_steps = config.max_epochs * self.steps_per_epoch
        self.optimizer = self.build_optimizer(self.model.parameters())
        self.scheduler = self.build_scheduler(self.optimizer, self.total_steps)
        self.use_cuda_amp = self.device.type == "cuda" and config.amp_dtype != "none"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_cuda_amp and config.amp_dtype == "fp16")
        self.cuda_graphs = self._resolve_cuda_graphs()
        self._graphed_step: Optional[GraphedTrainingStep] = None
        if self.cuda_graphs:
            self._graphed_step = GraphedTrainingStep(
                self.compute_loss, self.model.parameters(), scale=self.scaler.scale,
                autocast=lambda: self._autocast(cache_enabled=False), say=self.logger.warning)
            self.logger.info("training steps replayed from CUDA graphs: forward, loss and backward captured once per "
                             "batch shape (--cuda_graphs off to disable)")

        self.epoch = -1                 # last completed epoch
        self.global_step = 0
        self.best_metric = -math.inf if config.selection_mode == "max" else math.inf
        self.best_epoch = -1
        self.last_metrics: Dict[str, float] = {}
        self.history = TrainingHistory()
        self.nonfinite_total = 0
        self.nonfinite_consecutive = 0
        self.writer = None

    # ------------------------------------------------------------------------------------ overridable hooks
    def build_optimizer(self, parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """SGD, momentum 0.99, Nesterov, weight decay 3e-5 (nnU-Net / SegMamba)."""
        c = self.config
        return torch.optim.SGD(parameters, lr=c.learning_rate, momentum=c.momentum, nesterov=c.nesterov,
                               weight_decay=c.weight_decay)

    def build_scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> PolyLRScheduler:
        """Poly decay stepped once per iteration over the whole run."""
        return PolyLRScheduler(optimizer, total_steps=total_steps, exponent=self.config.poly_exponent)

    def training_step(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Forward one batch and return the scalar loss (runs inside autocast on CUDA).

        A subclass that overrides this hook trains without CUDA graphs (``cuda_graphs``); one that overrides
        :meth:`batch_tensors` / :meth:`compute_loss` instead keeps them (``compute_loss`` must then not
        synchronise with the host)."""
        return self.compute_loss(*self.batch_tensors(batch))

    def batch_tensors(self, batch: Mapping[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The batch's network input (float32) and target on the training device."""
        data = torch.as_tensor(batch["data"]).to(self.device, non_blocking=True).float()
        target = torch.as_tensor(batch["seg"]).to(self.device, non_blocking=True)
        return data, target

    def compute_loss(self, data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar loss of the network on one batch of device tensors."""
        return self.loss_fn(self.network(data), target)

    def on_epoch_end(self, epoch: int) -> None:
        """Called after the epoch's checkpoint is written (hook for subclasses and tests)."""

    # --------------------------------------------------------------------------------------------- set-up
    @property
    def _is_main(self) -> bool:
        return self.context.is_main_process

    def _autocast(self, cache_enabled: bool = True):
        if self.use_cuda_amp:
            return torch.autocast("cuda", dtype=torch.float16 if self.config.amp_dtype == "fp16" else torch.bfloat16,
                                  cache_enabled=cache_enabled)
        return nullcontext()

    def _resolve_cuda_graphs(self) -> bool:
        """Whether training steps go through CUDA graphs: ``cuda_graphs`` on/auto and nothing against it."""
        setting = self.config.cuda_graphs
        if setting == "off":
            return False
        why_not = None
        if self.device.type != "cuda":
            why_not = "they need a CUDA device"
        elif self.context.is_distributed:
            why_not = "not under DistributedDataParallel (its gradient all-reduce runs inside the backward pass)"
        elif type(self).training_step is not Trainer.training_step:
            why_not = f"{type(self).__name__} overrides training_step"
        if why_not is None:
            return True
        if setting == "on" or self.device.type == "cuda":
            (self.logger.warning if setting == "on" else self.logger.info)(
                f"CUDA graphs for training steps not used: {why_not}")
        return False

    def _configure_determinism(self) -> Callable[[], None]:
        """Apply the determinism settings; returns a function restoring the previous global settings."""
        previous = (torch.are_deterministic_algorithms_enabled(),
                    torch.is_deterministic_algorithms_warn_only_enabled(),
                    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
        if self.config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        def restore() -> None:
            torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2], previous[3]
        return restore

    def _wrap_distributed(self) -> None:
        if self.context.is_distributed and not isinstance(self.network, torch.nn.parallel.DistributedDataParallel):
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.network = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)

    def _open_tensorboard(self) -> None:
        if self._is_main and self.config.tensorboard and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step drops events a killed run wrote after its last checkpoint
            self.writer = SummaryWriter(log_dir=str(self.logdir), purge_step=self.global_step or None)

    def _scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None and math.isfinite(value):
            self.writer.add_scalar(tag, value, step)

    # ------------------------------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> Dict[str, Any]:
        """Everything needed to continue the run (see :mod:`light_training.checkpoint`)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "config": asdict(self.config),
            "model_config": self.model_config,
            "run_settings": self.run_settings,
            "metrics": dict(self.last_metrics),
            "best_metric": float(self.best_metric),
            "best_epoch": self.best_epoch,
            "history": self.history.to_dict(),
            "nonfinite_total": self.nonfinite_total,
            "rng": capture_rng_state(),
        }

    def save_checkpoint(self, name: str) -> Optional[Path]:
        """Write ``logdir/model/<name>`` atomically on rank 0; refuse to write non-finite weights."""
        if not self._is_main:
            return None
        if not tensors_are_finite(self.model.state_dict().values()):
            raise NonFiniteTrainingError(f"refusing to write {self.model_dir / name}: the model weights contain "
                                         "NaN/Inf (this should have been caught by the non-finite step guard)")
        return save_checkpoint_atomic(self.checkpoint_state(), self.model_dir / name)

    def load_checkpoint(self, path: Path) -> None:
        """Restore model, optimiser, scheduler, scaler, counters, history and RNG from a trainer checkpoint."""
        checkpoint = load_checkpoint(path, map_location="cpu")
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} is a bare weight file, not a training checkpoint; it cannot be resumed")
        try:
            self.model.load_state_dict(checkpoint["model"], strict=True)
        except RuntimeError as error:
            raise CheckpointError(f"{path} does not fit the model {type(self.model).__name__} "
                                  f"(different model settings?): {error}") from error
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.scheduler.total_steps != self.total_steps:
            self.logger.warning(f"max_epochs/iterations changed since the checkpoint: the poly schedule now ends "
                                f"at step {self.total_steps} (was {self.scheduler.total_steps})")
            self.scheduler.total_steps = self.total_steps
            if hasattr(self.scheduler, "lr_at"):
                # The optimiser still holds the rate the OLD schedule set for the next step (0 at its end):
                # recompute it on the new schedule, or the first step after the resume would use it.
                rates = [self.scheduler.lr_at(base, self.scheduler.last_epoch) for base in self.scheduler.base_lrs]
                for group, rate in zip(self.optimizer.param_groups, rates):
                    group["lr"] = rate
                self.scheduler._last_lr = rates
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.epoch = int(checkpoint["epoch"])
        self.global_step = int(checkpoint["global_step"])
        self.last_metrics = dict(checkpoint.get("metrics", {}))
        self.best_metric = float(checkpoint.get("best_metric", self.best_metric))
        self.best_epoch = int(checkpoint.get("best_epoch", -1))
        self.history = TrainingHistory.from_dict(checkpoint.get("history"))
        self.nonfinite_total = int(checkpoint.get("nonfinite_total", 0))
        restore_rng_state(checkpoint.get("rng"))
        changed = {k: (v, getattr(self.config, k)) for k, v in checkpoint.get("config", {}).items()
                   if hasattr(self.config, k) and getattr(self.config, k) != v}
        if changed:
            self.logger.info("settings changed since the checkpoint: "
                             + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in sorted(changed.items())))

    # ----------------------------------------------------------------------------------------------- loop
    def fit(self, resume: bool = False, overwrite: bool = False) -> TrainingResult:
        """Train from scratch (or from ``final_model.pt`` with ``resume``) up to ``max_epochs``.

        A fresh run refuses to start over an existing checkpoint unless ``overwrite`` is set.
        """
        latest = self.model_dir / FINAL_CHECKPOINT
        if self._is_main:
            leftovers = remove_stale_temporaries(self.model_dir)
            if leftovers:
                self.logger.info(f"removed {len(leftovers)} partial checkpoint file(s) that an interrupted run left "
                                 f"in {self.model_dir}: {', '.join(leftovers)}")
        if resume and latest.is_file():
            self.load_checkpoint(latest)
            self.logger.info(f"resuming from {latest}: epoch {self.epoch + 2} of {self.config.max_epochs}, "
                             f"step {self.global_step}, best {self.config.selection_key} {self.best_metric:.4f}")
        elif resume:
            self.logger.warning(f"--resume: no checkpoint at {latest}; starting from scratch")
        elif latest.is_file() and not overwrite:
            raise TrainingSetupError(f"{latest} already exists (a previous run in {self.logdir}); pass --resume "
                                     "to continue it, --overwrite to start again, or choose another --logdir")
        self._wrap_distributed()
        # opened before the per-epoch seeding: a DataLoader draws its base seed from torch's RNG when iterated
        self._batch_iterator = iter(self._open_batches())
        self._open_tensorboard()
        self._log_start()
        restore_determinism = self._configure_determinism()
        try:
            for epoch in range(self.epoch + 1, self.config.max_epochs):
                self._train_epoch(epoch)
                self.epoch = epoch
                is_last = epoch == self.config.max_epochs - 1
                validated = False
                if self.validator is not None and ((epoch + 1) % self.config.val_every == 0 or is_last):
                    self._validate_and_select(epoch)
                    validated = True
                if validated or is_last or (epoch + 1) % self.config.save_every == 0:
                    self.save_checkpoint(FINAL_CHECKPOINT)
                self.on_epoch_end(epoch)
        finally:
            restore_determinism()
            if self.writer is not None:
                self.writer.flush()
        self.logger.info(f"training finished after epoch {self.epoch + 1}; best {self.config.selection_key} "
                         f"{self.best_metric:.4f} at epoch {self.best_epoch + 1}; checkpoints in {self.model_dir}")
        best = self.model_dir / BEST_CHECKPOINT
        return TrainingResult(last_epoch=self.epoch, best_metric=self.best_metric, best_epoch=self.best_epoch,
                              last_metrics=dict(self.last_metrics), nonfinite_steps=self.nonfinite_total,
                              best_checkpoint=best if best.is_file() else None,
                              final_checkpoint=latest if latest.is_file() else None)

    def close(self) -> None:
        """Close the TensorBoard writer (fit() leaves it open so a caller may log more) and free the memory of
        the training step's CUDA graphs."""
        if self._graphed_step is not None:
            self._graphed_step.release()
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _log_start(self) -> None:
        parameters = sum(p.numel() for p in self.model.parameters())
        amp = (self.config.amp_dtype if self.use_cuda_amp else "off (fp32)")
        self.logger.info(f"device {self.device} | world size {self.context.world_size} | "
                         f"{parameters:,} parameters | AMP {amp} | {self.steps_per_epoch} steps/epoch per rank | "
                         f"{self.total_steps} steps in total | logdir {self.logdir}")

    def _open_batches(self) -> Iterable[Mapping[str, Any]]:
        is_factory = callable(self.train_data) and not hasattr(self.train_data, "__iter__")
        return self.train_data(start_batch=self.global_step) if is_factory else self.train_data

    def _next_batch(self) -> Mapping[str, Any]:
        if self._batch_iterator is None:
            self._batch_iterator = iter(self._open_batches())
        try:
            return next(self._batch_iterator)
        except StopIteration:  # a finite iterable is simply restarted
            self._batch_iterator = iter(self._open_batches())
            return next(self._batch_iterator)

    def _any_rank(self, flag: bool) -> bool:
        """True when ``flag`` holds on at least one rank (keeps every rank taking the same branch)."""
        if not self.context.is_distributed:
            return flag
        return all_reduce_mean(1.0 if flag else 0.0, self.context) > 0.0

    def _train_epoch(self, epoch: int) -> None:
        self.network.train()
        config = self.config
        seed_everything(_epoch_seed(config.seed, self.context.rank, epoch))
        losses: List[float] = []
        skipped = 0
        started = time.time()
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{config.max_epochs}",
                   disable=not (self._is_main and config.progress_bar), leave=False, dynamic_ncols=True)
        for _ in range(self.steps_per_epoch):
            batch = self._next_batch()
            self.optimizer.zero_grad(set_to_none=True)
            if self._graphed_step is not None:  # forward, loss and the scaled backward pass in one replay
                loss = self._graphed_step(*self.batch_tensors(batch))
            else:
                with self._autocast():
                    loss = self.training_step(batch)
            loss_is_finite = bool(torch.isfinite(loss.detach()).all())
            if self._any_rank(not loss_is_finite):
                self._register_nonfinite(f"loss {loss.item() if loss.numel() == 1 else 'tensor'}")
                skipped += 1
            else:
                if self._graphed_step is None:
                    self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip_norm)
                if not bool(torch.isfinite(grad_norm)):  # identical on every rank: gradients are all-reduced
                    what = f"gradient norm {float(grad_norm)}"
                    if self.scaler.is_enabled():
                        self.scaler.update()  # fp16 overflow: lower the loss scale, skip the step
                        what += f" (fp16 overflow; loss scale lowered to {self.scaler.get_scale():g})"
                    self.optimizer.zero_grad(set_to_none=True)
                    self._register_nonfinite(what)
                    skipped += 1
                else:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.nonfinite_consecutive = 0
                    losses.append(float(loss.detach()))
                    self._scalar("train/loss", losses[-1], self.global_step)
            learning_rate = self.optimizer.param_groups[0]["lr"]
            self._scalar("train/lr", learning_rate, self.global_step)
            with warnings.catch_warnings():
                # a skipped first step makes torch warn that the scheduler stepped before the optimiser
                warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step", category=UserWarning)
                self.scheduler.step()
            self.global_step += 1
            bar.update(1)
            if losses:
                bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{learning_rate:.2e}")
        bar.close()
        mean_loss = all_reduce_mean(float(np.mean(losses)) if losses else math.nan, self.context)
        self.history.add_epoch(epoch, mean_loss, learning_rate)
        self._scalar("train/epoch_loss", mean_loss, epoch)
        note = f", {skipped} non-finite step(s) skipped" if skipped else ""
        self.logger.info(f"epoch {epoch + 1}/{config.max_epochs}: loss {mean_loss:.4f}, lr {learning_rate:.6f}, "
                         f"{time.time() - started:.1f} s{note}")

    def _register_nonfinite(self, what: str) -> None:
        self.nonfinite_total += 1
        self.nonfinite_consecutive += 1
        limit = self.config.max_consecutive_nonfinite
        self.logger.warning(f"step {self.global_step}: non-finite {what}; step skipped "
                            f"({self.nonfinite_consecutive} in a row, {self.nonfinite_total} in total, limit {limit})")
        if self.nonfinite_consecutive >= limit:
            raise NonFiniteTrainingError(
                f"{self.nonfinite_consecutive} consecutive training steps had a non-finite loss or gradient "
                f"(step {self.global_step}); stopping. The last good state is {self.model_dir / FINAL_CHECKPOINT} "
                "(if written). Try a lower learning rate, --amp bf16/none, or check the data for NaN/Inf.")

    # ------------------------------------------------------------------------------------------ validation
    def evaluate_validation_cases(self) -> List[Any]:
        """The validator's result for every validation case, in case order: the cases are split across ranks
        (each evaluates its share in eval mode, without gradients) and gathered on all of them."""
        assert self.validator is not None
        count = self.validator.num_cases()
        mine = list(range(self.context.rank, count, self.context.world_size))
        rows: List[Tuple[int, Any]] = []
        self.model.eval()
        with torch.no_grad():
            for index in tqdm(mine, desc="validation", leave=False, dynamic_ncols=True,
                              disable=not (self._is_main and self.config.progress_bar)):
                rows.append((index, self.validator.evaluate_case(self.model, index, self.device)))
        self.model.train()
        gathered = [row for part in all_gather_objects(rows, self.context) for row in part]
        gathered.sort(key=lambda item: item[0])
        return [result for _, result in gathered]

    def validate(self) -> Dict[str, float]:
        """Run the validator over its cases (split across ranks) and return the NaN-aware mean metrics."""
        return nanmean_metrics(self.evaluate_validation_cases())

    def _is_better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        return value > self.best_metric if self.config.selection_mode == "max" else value < self.best_metric

    def _validate_and_select(self, epoch: int) -> None:
        if self._graphed_step is not None:  # validation gets the graph's memory; the next step captures again
            self._graphed_step.release()
        started = time.time()
        metrics = self.validate()
        key = self.config.selection_key
        if key not in metrics:
            raise KeyError(f"the validator returned {sorted(metrics)} but model selection uses {key!r}")
        self.last_metrics = metrics
        self.history.add_validation(epoch, metrics)
        for name, value in metrics.items():
            self._scalar(f"val/{name}", value, epoch)
        improved = self._is_better(metrics[key])
        if improved:
            self.best_metric, self.best_epoch = metrics[key], epoch
        shown = ", ".join(f"{name} {value:.4f}" for name, value in sorted(metrics.items()))
        self.logger.info(f"validation after epoch {epoch + 1} ({time.time() - started:.1f} s): {shown}"
                         + (f"  -> new best {key}" if improved else f"  (best {self.best_metric:.4f} "
                                                                     f"at epoch {self.best_epoch + 1})"))
        if improved:
            self.save_checkpoint(BEST_CHECKPOINT)
        if self._is_main:
            plot_progress(self.history, self.logdir / "progress.png", selection_key=key)
