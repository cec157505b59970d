"""Loading model weights safely from our checkpoints and from reference-layout state dicts.

Accepted files:
* a plain state dict (the published SegMamba checkpoints),
* a dict wrapping one under ``"model"``, ``"state_dict"`` or ``"module"`` (our checkpoints use ``"model"``),
* keys prefixed with ``module.`` (saved from DistributedDataParallel) or ``_orig_mod.`` (torch.compile).

Files are read with ``torch.load(weights_only=True)``: no arbitrary code runs while loading.
"""
from __future__ import annotations

import os
from typing import Dict, Mapping

import torch
import torch.nn as nn

_WRAPPER_KEYS = ("model", "state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointMismatchError(RuntimeError):
    """The checkpoint does not fit the model (missing/unexpected keys or shape mismatches)."""


def read_checkpoint(path: str) -> dict:
    """Read a checkpoint file with ``weights_only=True``; clear errors for missing or unreadable files."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise RuntimeError(f"could not read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, Mapping):
        raise RuntimeError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def extract_state_dict(obj: Mapping) -> Dict[str, torch.Tensor]:
    """Unwrap a checkpoint object to a flat ``{name: tensor}`` state dict without wrapper prefixes."""
    sd = obj
    for _ in range(3):  # a wrapper inside a wrapper is possible (e.g. {"state_dict": {"module": ...}})
        inner = next((sd[k] for k in _WRAPPER_KEYS if k in sd and isinstance(sd[k], Mapping)), None)
        if inner is None or any(isinstance(v, torch.Tensor) for v in sd.values()):
            break
        sd = inner
    out = {}
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def describe_mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor], limit: int = 20) -> str:
    """Human-readable list of missing keys, unexpected keys and shape mismatches ('' when they fit)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    parts = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            shown = "\n    ".join(items[:limit])
            more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"  {len(items)} {title}:\n    {shown}{more}")
    return "\n".join(parts)


def load_model_weights(model: nn.Module, source, strict: bool = True, name: str | None = None) -> nn.Module:
    """Load weights from a path or an in-memory checkpoint into ``model``.

    With ``strict=True`` (default) any missing/unexpected key or shape mismatch raises
    :class:`CheckpointMismatchError` listing them, before the model is modified. ``name`` is how the
    checkpoint is called in that message (default: the path, or "<state dict>" for an in-memory one).
    """
    name = name or (source if isinstance(source, str) else "<state dict>")
    obj = read_checkpoint(source) if isinstance(source, str) else source
    sd = extract_state_dict(obj)
    report = describe_mismatch(model, sd)
    if report and strict:
        raise CheckpointMismatchError(
            f"checkpoint {name} does not fit {type(model).__name__}:\n{report}")
    own = model.state_dict()
    fitting = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    model.load_state_dict(fitting, strict=False)
    return model
