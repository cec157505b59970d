"""Depthwise causal 1-D convolution: public API, argument checks and the pure-PyTorch implementation.

``out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (W - 1) + k])`` with ``x`` taken as zero at
negative times (a depthwise convolution with ``W - 1`` zeros of left padding, truncated to ``L``).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F

from causal_conv1d import cuda_backend

logger = logging.getLogger("causal_conv1d")

_ACTIVATIONS = (None, "silu", "swish")
_LOGGED_PATHS: set = set()


def _check_arguments(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     activation: Optional[str]) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be a 3-D tensor (batch, channels, length); got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"causal_conv1d: weight must be a 2-D tensor (channels, width); got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    channels, width = weight.shape
    if channels != x.shape[1]:
        raise ValueError(f"causal_conv1d: weight has {channels} channels but x has {x.shape[1]} "
                         f"(x {tuple(x.shape)}, weight {tuple(weight.shape)})")
    if not 2 <= width <= 4:
        raise ValueError(f"causal_conv1d: kernel width must be 2, 3 or 4; got {width}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != channels):
        raise ValueError(f"causal_conv1d: bias must have shape ({channels},); got {tuple(bias.shape)}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation must be None, 'silu' or 'swish'; got {activation!r}")
    if not (x.is_floating_point() and weight.is_floating_point()):
        raise TypeError(f"causal_conv1d: x and weight must be floating point; got {x.dtype}, {weight.dtype}")
    tensors = [x, weight] + ([bias] if bias is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError("causal_conv1d: x, weight and bias must be on the same device; got "
                         + ", ".join(str(t.device) for t in tensors))


def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      activation: Optional[str] = None, reverse: bool = False) -> torch.Tensor:
    """Pure-PyTorch causal depthwise conv1d (differentiable by autograd).

    x (B, D, L), weight (D, W), bias (D,) or None -> (B, D, L) in x's dtype. fp16/bf16 inputs are computed
    in float32 (as the CUDA kernel does). Written as a sum of ``W`` shifted, per-channel scaled copies of
    ``x``: cheaper on CPU than a grouped convolution and exact. ``reverse``: the conv of ``x.flip(-1)``,
    flipped back (``out[t]`` depends on ``x[t .. t + W - 1]``).
    """
    _check_arguments(x, weight, bias, activation)
    if reverse:
        return causal_conv1d_ref(x.flip(-1), weight, bias, activation).flip(-1)
    length = x.shape[-1]
    width = weight.shape[1]
    out_dtype = x.dtype
    compute = torch.promote_types(x.dtype, torch.float32)
    x = x.to(compute)
    w = weight.to(compute)
    # the last tap multiplies x[t] itself; tap k multiplies x[t - (W - 1 - k)]. In-place accumulation
    # into slices avoids padded temporaries (4x less memory traffic than pad-and-add).
    out = x * w[:, width - 1:width]
    for k in range(width - 1):
        shift = width - 1 - k
        if shift < length:
            out[..., shift:].addcmul_(x[..., : length - shift], w[:, k:k + 1])
    if bias is not None:
        out.add_(bias.to(compute).unsqueeze(-1))
    if activation in ("silu", "swish"):
        out = F.silu(out)
    return out.to(out_dtype)


def backend_name(device) -> str:
    """``"cuda-kernel"`` when :func:`causal_conv1d_fn` would use the compiled kernel on ``device``, else
    ``"pytorch"``."""
    device = torch.device(device)
    return "cuda-kernel" if device.type == "cuda" and cuda_backend.available() else "pytorch"


def causal_conv1d_fn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     activation: Optional[str] = None, reverse: bool = False) -> torch.Tensor:
    """Causal depthwise conv1d. x (B, D, L), weight (D, W) with W in 2..4, bias (D,) or None,
    activation None, "silu" or "swish" -> (B, D, L). ``reverse=True``: the conv of the sequence read
    last-to-first, returned in the original order (``causal_conv1d_fn(x.flip(-1), ...).flip(-1)``; the CUDA
    kernel indexes backwards instead of copying).

    CUDA tensors use the compiled kernel when it is built; everything else uses :func:`causal_conv1d_ref`.
    """
    _check_arguments(x, weight, bias, activation)
    path = backend_name(x.device)
    if path not in _LOGGED_PATHS:
        _LOGGED_PATHS.add(path)
        logger.info("causal_conv1d: using the %s implementation (first call on %s)", path, x.device.type)
    if path == "cuda-kernel":
        return cuda_backend.causal_conv1d_cuda_fn(x, weight, bias, activation, reverse=reverse)
    return causal_conv1d_ref(x, weight, bias, activation, reverse=reverse)
