"""Seam between the public API and the compiled CUDA kernel (``causal_conv1d._causal_conv1d_cuda``).

The public function :func:`causal_conv1d.causal_conv1d_fn` asks :func:`available` and, for CUDA tensors,
calls :func:`causal_conv1d_cuda_fn`. The kernel takes float32/float16/bfloat16 ``x`` (a channel slice of a
larger tensor is read in place); the weight and bias are used in float32 and their gradients are returned
in their own dtypes.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

_AVAILABLE: Optional[bool] = None
_EXT = None
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def available() -> bool:
    """True when the compiled extension ``causal_conv1d._causal_conv1d_cuda`` can be imported
    (always False while the environment variable SEGMAMBA_FORCE_PYTORCH=1 is set, to compare or debug)."""
    global _AVAILABLE, _EXT
    if os.environ.get("SEGMAMBA_FORCE_PYTORCH", "0") == "1":
        return False
    if _AVAILABLE is None:
        try:
            from causal_conv1d import _causal_conv1d_cuda
            _EXT = _causal_conv1d_cuda
            _AVAILABLE = True
        except ImportError:
            _AVAILABLE = False
    return _AVAILABLE


def _rows(t: torch.Tensor) -> torch.Tensor:
    b, d, length = t.shape
    if t.stride(2) == 1 and t.stride(1) == length and t.stride(0) >= d * length:
        return t
    return t.contiguous()


def conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], silu: bool,
                 reverse: bool = False) -> torch.Tensor:
    """The forward kernel, without autograd: ``x`` (B, D, L) with contiguous rows (a channel slice is read in
    place; other layouts are copied), ``weight`` (D, W) float32 contiguous, ``bias`` (D,) float32 or None.
    Returns (B, D, L) in x's dtype."""
    return _EXT.fwd(_rows(x), weight, bias, bool(silu), bool(reverse))


def conv_backward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dout: torch.Tensor,
                  silu: bool, reverse: bool = False):
    """The backward kernel, without autograd (arguments as :func:`conv_forward`; ``dout`` like ``x``, made
    contiguous here). Returns ``(dx, dweight (D, W) float32, dbias (D,) float32 or None)``."""
    return _EXT.bwd(_rows(x), weight, bias, dout.to(x.dtype).contiguous(), bool(silu), bool(reverse))


class CausalConv1dCudaFn(torch.autograd.Function):
    """Autograd wrapper of the forward/backward kernels (the backward recomputes the pre-activation)."""

    @staticmethod
    def forward(ctx, x, weight, bias, silu, reverse):
        ctx.w_dtype, ctx.b_dtype, ctx.w_shape = weight.dtype, (None if bias is None else bias.dtype), weight.shape
        x_r = _rows(x)
        w32 = weight.reshape(weight.shape[0], -1).float().contiguous()
        b32 = None if bias is None else bias.float().contiguous()
        out = conv_forward(x_r, w32, b32, silu, reverse)
        ctx.silu, ctx.reverse = bool(silu), bool(reverse)
        ctx.save_for_backward(x_r, w32, b32)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w32, b32 = ctx.saved_tensors
        dx, dw, db = conv_backward(x, w32, b32, dout, ctx.silu, ctx.reverse)
        dw = dw.to(ctx.w_dtype).reshape(ctx.w_shape)
        db = None if b32 is None else db.to(ctx.b_dtype)
        return dx, dw, db, None, None


def causal_conv1d_cuda_fn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                          activation: Optional[str] = None, reverse: bool = False) -> torch.Tensor:
    """Causal depthwise conv1d on CUDA tensors with the compiled kernel. ``x`` (B, D, L), ``weight`` (D, W);
    ``reverse`` convolves the sequence read last-to-first (indexing, no flipped copies).

    Inputs the kernel does not cover (other dtypes) go to the PyTorch reference."""
    if x.dtype not in KERNEL_DTYPES:
        from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref
        return causal_conv1d_ref(x, weight, bias, activation, reverse=reverse)
    return CausalConv1dCudaFn.apply(x, weight, bias, activation in ("silu", "swish"), reverse)
