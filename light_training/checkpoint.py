"""Checkpoint files: atomic writing, safe reading, RNG capture and strict weight loading.

A training checkpoint is a plain dict that ``torch.load(weights_only=True)`` can read back:

==================  =========================================================================
key                 content
==================  =========================================================================
``format``          ``"segmamba-checkpoint"`` (tells a full checkpoint from a bare state dict)
``model``           the model's ``state_dict`` (no ``module.`` prefix)
``optimizer``       ``optimizer.state_dict()``
``scheduler``       ``scheduler.state_dict()`` (plain numbers)
``scaler``          ``GradScaler.state_dict()`` (empty when AMP scaling is off)
``epoch``           index of the last *completed* epoch (0-based); resume starts at ``epoch + 1``
``global_step``     optimiser iterations done so far
``config``          the trainer configuration (plain types)
``model_config``    keyword arguments that rebuild the model (plain types), may be empty
``run_settings``    the training script's settings (patch size, paths...; plain types), may be empty
``metrics``         the latest validation metrics; ``best_metric`` / ``best_epoch`` the selection state
``history``         per-epoch lists used by ``progress.png``
``rng``             python / numpy / torch (CPU and CUDA) generator states
==================  =========================================================================
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Union

import numpy as np
import torch

from .utils.files import atomic_path

CHECKPOINT_FORMAT = "segmamba-checkpoint"
PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or does not fit the model."""


def save_checkpoint_atomic(state: Mapping[str, Any], path: PathLike) -> Path:
    """Write ``state`` with ``torch.save`` to a temporary file next to ``path`` (:func:`atomic_path`), then
    rename it into place.

    A process killed mid-write leaves the previous file (or none), never a truncated one; its temporary is
    removed by :func:`light_training.utils.files.remove_stale_temporaries` when training starts again.
    """
    path = Path(path)
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            torch.save(dict(state), handle)
            handle.flush()
            os.fsync(handle.fileno())
    return path


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; raise :class:`CheckpointError` naming the file on failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        loaded = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated / foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {type(error).__name__}: {error}") from error
    if not isinstance(loaded, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(loaded).__name__}, expected a dict")
    return loaded


def is_training_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """True for a full checkpoint written by the trainer, False for a bare state dict."""
    return checkpoint.get("format") == CHECKPOINT_FORMAT


def tensors_are_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when no floating-point tensor holds NaN or Inf."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


# ----------------------------------------------------------------------------------------------- RNG states
def capture_rng_state() -> Dict[str, Any]:
    """Python, NumPy and torch generator states as ``weights_only``-loadable objects."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Optional[Mapping[str, Any]]) -> None:
    """Inverse of :func:`capture_rng_state` (missing parts are left alone)."""
    if not state:
        return
    if "python" in state:
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
    if "numpy" in state:
        numpy_state = state["numpy"]
        np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                             numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
