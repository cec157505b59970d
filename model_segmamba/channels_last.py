"""Channels-last 3D (NDHWC) activations for SegMamba and the other 3D networks here.

On a GPU, cuDNN's fast fp16/bf16 3D convolutions work on NDHWC tensors. Fed the default NCDHW layout, every
convolution converts its input to NDHWC and its output back (a compiled SegMamba training step on an H200
spent 26 ms of 190 ms in those conversions). :func:`use_channels_last` keeps the activations channels-last
from the input to the logits instead:

* the weights of every 3D convolution are stored channels-last (``module.to(memory_format=...)``);
* every ``nn.InstanceNorm3d`` becomes :class:`InstanceNorm3dAnyLayout`, whose output keeps its input's layout
  (PyTorch's instance norm makes its input contiguous, so it returns NCDHW and the next convolution converts
  again). Same state dict, same numbers;
* SegMamba's Mamba layers notice a channels-last input and have their output projection write token-major
  rows, which is the channels-last layout of the feature map (no copy on the way in or out);
* the model converts its 5-D inputs to channels-last itself (a forward pre-hook), so callers pass ordinary
  tensors. Outputs are channels-last tensors of the usual shape and values.

Measured on an H200 (``bench/bench_model.py``, SegMamba 4→4, batch 2 × 128³, fp16 autocast, SGD step):
compiled 183 → 162 ms per step, 14.2 → 13.8 GiB; compiled inference (1 × 128³) 41 → 39 ms. Without
``torch.compile`` inference is faster too (66 → 55 ms; a whole-volume sliding window 0.41 → 0.34 s), but a
training step, about as fast (258 → 254 ms), needs 28 GiB instead of 15 GiB (the norm above then runs as
separate float32 operations that autograd keeps). So the scripts' ``auto`` setting uses channels-last on
CUDA for prediction, and for training only together with ``--compile``.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def is_channels_last_3d(x: torch.Tensor) -> bool:
    """True for a 5-D tensor laid out NDHWC (and not also plainly contiguous, as tensors with C == 1 are)."""
    return x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)


class InstanceNorm3dAnyLayout(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` whose output has its input's memory layout.

    A channels-last input is normalised with per-(sample, channel) statistics computed in at least float32 and
    returned in the input's dtype, as PyTorch's kernel does; other inputs go to PyTorch's kernel. Only the
    input-statistics mode is reimplemented (``track_running_stats=False``, or training); running statistics
    use PyTorch's kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_input_stats = self.training or not self.track_running_stats
        if not (use_input_stats and is_channels_last_3d(x)):
            return super().forward(x)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        var, mean = torch.var_mean(xf, dim=(2, 3, 4), keepdim=True, correction=0)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            shape = (1, -1, 1, 1, 1)
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


CHOICES = ("auto", "on", "off")


def should_use_channels_last(setting: str, device: torch.device, compiled: bool, training: bool = True) -> bool:
    """Resolve ``auto``/``on``/``off``: ``auto`` is on for a CUDA device, when training only if the network is
    compiled (see the module docstring for why); ValueError for anything else."""
    if setting not in CHOICES:
        raise ValueError(f"channels_last setting must be one of {', '.join(CHOICES)}; got {setting!r}")
    if setting == "auto":
        return torch.device(device).type == "cuda" and (compiled or not training)
    return setting == "on"


def _inputs_channels_last(module: nn.Module, args: tuple) -> tuple:
    return tuple(channels_last_input(a) if isinstance(a, torch.Tensor) and a.dim() == 5 else a for a in args)


def use_channels_last(model: nn.Module) -> nn.Module:
    """Switch ``model`` (in place) to channels-last 3D activations as described in the module docstring and
    return it. State-dict keys and values are unchanged; 5-D inputs are converted on the way in."""
    for module in model.modules():
        if type(module) is nn.InstanceNorm3d:  # exact type: a user subclass may do something else
            module.__class__ = InstanceNorm3dAnyLayout  # adds no state: parameters, buffers, hooks stay
    if not getattr(model, "_segmamba_channels_last", False):
        model.register_forward_pre_hook(_inputs_channels_last)
        model._segmamba_channels_last = True
    return model.to(memory_format=torch.channels_last_3d)


def channels_last_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, D, H, W) laid out channels-last (a copy unless it already is)."""
    return x.contiguous(memory_format=torch.channels_last_3d)
