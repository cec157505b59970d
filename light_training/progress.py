"""What a training run shows the user: the log file, the per-epoch history and ``progress.png``."""
from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Union

from tqdm.auto import tqdm

from .utils.files import atomic_path

LOGGER_NAME = "light_training.training"  # a leaf logger: its settings never affect other modules' loggers


class _TqdmHandler(logging.StreamHandler):
    """Console handler that prints through ``tqdm.write`` so messages do not break a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # logging must never kill training
            self.handleError(record)


def setup_logging(logdir: Union[str, Path, None], is_main_process: bool = True, rank: int = 0,
                  name: str = LOGGER_NAME) -> logging.Logger:
    """Logger writing to the console and, on rank 0, appending to ``logdir/train.log``.

    Other ranks only print warnings and errors, prefixed with their rank. Calling it again replaces the
    handlers (one run per process, several runs per test session).
    """
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    console = _TqdmHandler()
    if is_main_process:
        console.setFormatter(logging.Formatter("%(message)s"))
        console.setLevel(logging.INFO)
    else:
        console.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(message)s"))
        console.setLevel(logging.WARNING)
    logger.addHandler(console)
    if is_main_process and logdir is not None:
        Path(logdir).mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(Path(logdir) / "train.log", mode="a", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(file_handler)
    return logger


@dataclass
class TrainingHistory:
    """Per-epoch curves, kept in the checkpoint so a resumed run keeps drawing the same plot.

    ``train_loss[i]`` / ``learning_rate[i]`` belong to ``epochs[i]`` (mean loss over the epoch's finite
    steps, learning rate at the epoch's last step); ``validation[key][j]`` belongs to ``validation_epochs[j]``.
    """

    epochs: List[int] = field(default_factory=list)
    train_loss: List[float] = field(default_factory=list)
    learning_rate: List[float] = field(default_factory=list)
    validation_epochs: List[int] = field(default_factory=list)
    validation: Dict[str, List[float]] = field(default_factory=dict)

    def add_epoch(self, epoch: int, mean_loss: float, learning_rate: float) -> None:
        self.epochs.append(int(epoch))
        self.train_loss.append(float(mean_loss))
        self.learning_rate.append(float(learning_rate))

    def add_validation(self, epoch: int, metrics: Mapping[str, float]) -> None:
        index = len(self.validation_epochs)
        self.validation_epochs.append(int(epoch))
        for key, value in metrics.items():
            # a metric that appears late is padded with NaN so every list stays aligned with validation_epochs
            series = self.validation.setdefault(key, [math.nan] * index)
            series.append(float(value))
        for key, series in self.validation.items():
            if len(series) < index + 1:
                series.append(math.nan)

    def to_dict(self) -> Dict[str, Any]:
        return {"epochs": list(self.epochs), "train_loss": list(self.train_loss),
                "learning_rate": list(self.learning_rate), "validation_epochs": list(self.validation_epochs),
                "validation": {k: list(v) for k, v in self.validation.items()}}

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]]) -> "TrainingHistory":
        if not data:
            return cls()
        return cls(epochs=[int(e) for e in data.get("epochs", [])],
                   train_loss=[float(v) for v in data.get("train_loss", [])],
                   learning_rate=[float(v) for v in data.get("learning_rate", [])],
                   validation_epochs=[int(e) for e in data.get("validation_epochs", [])],
                   validation={k: [float(x) for x in v] for k, v in data.get("validation", {}).items()})


def print_case_failures(header: str, failed: Mapping[str, str], missing: Iterable[str] = (),
                        missing_reason: Callable[[str], str] = lambda name: "missing") -> None:
    """The end-of-run list of a stage on stderr: ``header``, then one ``  NAME: why`` line per missing case
    (in the given order, ``missing_reason(name)``) and per failed case (sorted by name)."""
    print(header, file=sys.stderr)
    for name in missing:
        print(f"  {name}: {missing_reason(name)}", file=sys.stderr)
    for name, reason in sorted(failed.items()):
        print(f"  {name}: {reason}", file=sys.stderr)


def plot_progress(history: TrainingHistory, path: Union[str, Path], selection_key: Optional[str] = None) -> Path:
    """Draw loss, learning rate and validation metrics per epoch into a PNG, written atomically.

    Epochs are shown 1-based (epoch index 0 is "epoch 1").
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display needed
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    figure = Figure(figsize=(8, 9), dpi=100)
    FigureCanvasAgg(figure)
    loss_axes, lr_axes, val_axes = figure.subplots(3, 1, sharex=True)
    shown_epochs = [e + 1 for e in history.epochs]
    loss_axes.plot(shown_epochs, history.train_loss, color="tab:blue", marker="." if len(shown_epochs) < 50 else None)
    loss_axes.set_ylabel("training loss")
    loss_axes.grid(alpha=0.3)
    lr_axes.plot(shown_epochs, history.learning_rate, color="tab:orange")
    lr_axes.set_ylabel("learning rate")
    lr_axes.grid(alpha=0.3)
    shown_val_epochs = [e + 1 for e in history.validation_epochs]
    for key, values in sorted(history.validation.items()):
        style = {"linewidth": 2.5, "color": "black"} if key == selection_key else {"linewidth": 1.2}
        val_axes.plot(shown_val_epochs, values, marker="o", markersize=3, label=key, **style)
    if history.validation:
        val_axes.legend(loc="lower right", fontsize=8)
    val_axes.set_ylabel("validation")
    val_axes.set_xlabel("epoch")
    val_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    val_axes.grid(alpha=0.3)
    figure.suptitle("training progress" + (f" (model selection: {selection_key})" if selection_key else ""))
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    return path


BRATS_LABEL_COLOURS = {1: ("NCR", (0.90, 0.10, 0.10)), 2: ("ED", (0.10, 0.80, 0.20)), 3: ("ET", (1.00, 0.85, 0.00))}


def plot_segmentation_overlay(image: "np.ndarray", ground_truth: "np.ndarray", prediction: "np.ndarray",
                              path: Union[str, Path], title: str = "",
                              label_colours: Optional[Mapping[int, tuple]] = None,
                              slice_index: Optional[int] = None) -> Path:
    """PNG of one axial slice: the image, the image with the ground truth, the image with the prediction.

    ``image``, ``ground_truth`` and ``prediction`` are ``(Z, Y, X)`` arrays on the same grid. The slice is
    ``slice_index`` or the one with the most ground-truth foreground. ``label_colours``: ``{label: (name,
    rgb)}`` (default: BraTS NCR/ED/ET). Written atomically.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    image, ground_truth, prediction = np.asarray(image), np.asarray(ground_truth), np.asarray(prediction)
    if not image.shape == ground_truth.shape == prediction.shape or image.ndim != 3:
        raise ValueError(f"overlay needs three (Z, Y, X) arrays of one shape, got {image.shape}, "
                         f"{ground_truth.shape}, {prediction.shape}")
    colours = dict(label_colours or BRATS_LABEL_COLOURS)
    if slice_index is None:
        slice_index = int(np.argmax((ground_truth > 0).sum(axis=(1, 2))))
    picture = image[slice_index].astype(np.float64)
    low, high = np.percentile(picture, [0.5, 99.5])
    picture = np.clip((picture - low) / (high - low if high > low else 1.0), 0, 1)

    def blend(labels: "np.ndarray") -> "np.ndarray":
        rgb = np.repeat(picture[..., None], 3, axis=2)
        for label, (_, colour) in colours.items():
            mask = labels[slice_index] == label
            rgb[mask] = 0.45 * rgb[mask] + 0.55 * np.asarray(colour)
        return rgb

    figure = Figure(figsize=(12, 4.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3)
    panels = [(np.repeat(picture[..., None], 3, axis=2), "image"), (blend(ground_truth), "ground truth"),
              (blend(prediction), "prediction")]
    for axis, (rgb, name) in zip(axes, panels):
        axis.imshow(rgb, origin="lower", interpolation="nearest")
        axis.set_title(name)
        axis.axis("off")
    figure.legend(handles=[Patch(color=colour, label=f"{label} {name}") for label, (name, colour) in colours.items()],
                  loc="lower center", ncol=len(colours), frameon=False)
    figure.suptitle((title + " — " if title else "") + f"axial slice z = {slice_index}")
    figure.tight_layout(rect=(0, 0.06, 1, 0.95))
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    return path
