"""Seam between the public scan API and the compiled CUDA kernels (``mamba_ssm._selective_scan_cuda``).

:func:`mamba_ssm.ops.selective_scan_fn` asks :func:`available` and, for CUDA tensors, calls
:func:`selective_scan_cuda_fn` (same signature as ``selective_scan_fn``). The kernels cover float32, float16
and bfloat16 inputs with input-dependent B and C in one group and d_state ≤ 64; anything else (constant or
grouped B/C, float64, larger d_state) runs the chunked PyTorch scan instead, with one log line.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

logger = logging.getLogger("mamba_ssm")

_AVAILABLE: Optional[bool] = None
_EXT = None
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FALLBACK_LOGGED: set = set()


def available() -> bool:
    """True when the compiled extension ``mamba_ssm._selective_scan_cuda`` can be imported
    (always False while the environment variable SEGMAMBA_FORCE_PYTORCH=1 is set, to compare or debug)."""
    global _AVAILABLE, _EXT
    if os.environ.get("SEGMAMBA_FORCE_PYTORCH", "0") == "1":
        return False
    if _AVAILABLE is None:
        try:
            from mamba_ssm import _selective_scan_cuda
            _EXT = _selective_scan_cuda
            _AVAILABLE = True
            # Comparison switches (speed only): cross-chunk prefetch in the state-split walks; 0 for
            # SEGMAMBA_SCAN_LANE runs the state-split kernels for d_state <= 16 too.
            for name, setter in (("SEGMAMBA_SCAN_PREFETCH", "set_prefetch"),
                                 ("SEGMAMBA_SCAN_LANE", "set_lane_kernels")):
                value = os.environ.get(name)
                if value is not None and hasattr(_EXT, setter):
                    getattr(_EXT, setter)(value != "0")
            value = os.environ.get("SEGMAMBA_SCAN_BWD_MAIN")  # backward main kernel: 0 previous, 1 default
            if value is not None and hasattr(_EXT, "set_bwd_main_variant"):
                _EXT.set_bwd_main_variant(int(value))
            value = os.environ.get("SEGMAMBA_SCAN_CPG")  # chunks per group (0 = chosen from the GPU's size)
            if value is not None and hasattr(_EXT, "set_chunks_per_group"):
                _EXT.set_chunks_per_group(int(value))
        except ImportError:
            _AVAILABLE = False
    return _AVAILABLE


def kernel_supports(u, delta, B, C, A, z=None) -> Optional[str]:
    """None when the kernels handle these arguments, else the reason they do not."""
    dtype = _kernel_dtype(u, delta, B, C, z)
    if dtype not in KERNEL_DTYPES:
        return f"dtype {dtype}"
    if B.dim() != 4 or C.dim() != 4:
        return "constant (dim, N) B/C"
    if B.shape[1] != 1 or C.shape[1] != 1:
        return f"{B.shape[1]} B/C groups"
    if A.shape[1] > 64:
        return f"d_state {A.shape[1]} > 64"
    if u.numel() == 0:
        return "empty input"
    return None


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (batch, dim, L) with contiguous (dim, L) rows; a channel slice of a bigger tensor is kept."""
    b, d, length = t.shape
    if t.stride(2) == 1 and t.stride(1) == length and t.stride(0) >= d * length:
        return t
    return t.contiguous()


def _kernel_dtype(u, delta, B, C, z) -> torch.dtype:
    """One storage dtype for the per-token inputs: the widest of them (e.g. fp16 + fp32 -> fp32)."""
    dtype = u.dtype
    for t in (delta, B, C, z):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _kernel_inputs(u, delta, A, B, C, D, z, delta_bias):
    """The arguments as the kernels take them: per-token tensors in one dtype with contiguous rows (z may stay
    a channel slice), A, D and delta_bias float32 contiguous."""
    dtype = _kernel_dtype(u, delta, B, C, z)
    return (u.to(dtype).contiguous(), delta.to(dtype).contiguous(), A.float().contiguous(),
            B.to(dtype).contiguous(), C.to(dtype).contiguous(), None if D is None else D.float().contiguous(),
            None if z is None else _rows(z.to(dtype)),
            None if delta_bias is None else delta_bias.float().contiguous())


def _forward(inputs, delta_softplus, return_last_state, reverse):
    """The forward kernels on :func:`_kernel_inputs`' tuple: (out, last_state or None, (carry, dsum))."""
    out, last_state, carry, dsum = _EXT.fwd(*inputs, bool(delta_softplus), bool(return_last_state), bool(reverse))
    return out, (last_state if return_last_state else None), (carry, dsum)


def _backward(inputs, delta_softplus, dout, saved, reverse):
    """The backward kernels on :func:`_kernel_inputs`' tuple and the forward's ``saved``."""
    carry, dsum = saved
    return tuple(_EXT.bwd(*inputs, bool(delta_softplus), dout.to(inputs[0].dtype).contiguous(), carry, dsum,
                          bool(reverse)))


def scan_forward(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                 return_last_state=False, reverse=False):
    """The forward kernels, without autograd. B, C: (batch, 1, N, L). Returns ``(out, last_state, saved)``:
    out in u's dtype, last_state (batch, dim, N) float32 or None, and ``saved`` = (per-chunk states,
    per-group delta sums), what :func:`scan_backward` needs besides the inputs."""
    out, last_state, saved = _forward(_kernel_inputs(u, delta, A, B, C, D, z, delta_bias), delta_softplus,
                                      return_last_state, reverse)
    return out.to(u.dtype), last_state, saved


def scan_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout, saved, reverse=False):
    """The backward kernels, without autograd (the inputs as given to :func:`scan_forward`, ``saved`` from
    it). Returns ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)``: du, ddelta, dz in the kernels' storage dtype,
    dB and dC float32 (batch, 1, N, L), dA, dD, ddelta_bias float32; None for absent D, z, delta_bias."""
    return _backward(_kernel_inputs(u, delta, A, B, C, D, z, delta_bias), delta_softplus, dout, saved, reverse)


class SelectiveScanCudaFn(torch.autograd.Function):
    """Autograd wrapper of the forward/backward kernels. Saves the per-chunk carried states (float32,
    ``batch·L/64·N·dim`` values) and per-group sums of delta instead of the full ``(batch, dim, N, L)`` state
    history."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse):
        ctx.u_dtype = u.dtype
        ctx.in_dtypes = (delta.dtype, B.dtype, C.dtype, None if z is None else z.dtype)
        ctx.b_shape, ctx.c_shape = B.shape, C.shape
        ctx.a_dtype = A.dtype
        ctx.d_dtype = None if D is None else D.dtype
        ctx.bias_dtype = None if delta_bias is None else delta_bias.dtype
        inputs = _kernel_inputs(u, delta, A, B, C, D, z, delta_bias)
        out, last_state, (carry, dsum) = _forward(inputs, delta_softplus, return_last_state, reverse)
        ctx.reverse = bool(reverse)
        ctx.delta_softplus = bool(delta_softplus)
        ctx.save_for_backward(*inputs, carry, dsum)
        out = out.to(u.dtype)
        if return_last_state:
            ctx.mark_non_differentiable(last_state)
            return out, last_state
        return out

    @staticmethod
    def backward(ctx, dout, *unused):
        *inputs, carry, dsum = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, dz, dbias = _backward(inputs, ctx.delta_softplus, dout, (carry, dsum),
                                                          ctx.reverse)
        D, z, bias = inputs[5], inputs[6], inputs[7]
        delta_dtype, b_dtype, c_dtype, z_dtype = ctx.in_dtypes
        du = du.to(ctx.u_dtype)
        ddelta = ddelta.to(delta_dtype)
        dB = dB.to(b_dtype).reshape(ctx.b_shape)
        dC = dC.to(c_dtype).reshape(ctx.c_shape)
        dA = dA.to(ctx.a_dtype)
        dD = None if D is None else dD.to(ctx.d_dtype)
        dz = None if z is None else dz.to(z_dtype)
        dbias = None if bias is None else dbias.to(ctx.bias_dtype)
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None, None, None


def selective_scan_cuda_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, reverse=False):
    """Selective scan on CUDA tensors with the compiled kernels (arguments as ``selective_scan_fn``;
    ``reverse`` walks the sequence backwards inside the kernels, with no flipped copies).

    Falls back to the chunked PyTorch scan for argument combinations the kernels do not cover."""
    if B.dim() == 3:  # (batch, N, L) shorthand for one group
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    reason = kernel_supports(u, delta, B, C, A, z)
    if reason is not None:
        if reason not in _FALLBACK_LOGGED:
            _FALLBACK_LOGGED.add(reason)
            logger.info("mamba_ssm selective scan: %s is not covered by the CUDA kernels; "
                        "using the chunked PyTorch implementation for it", reason)
        from mamba_ssm.ops.selective_scan_chunked import selective_scan_chunked
        return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                      reverse=reverse)
    return SelectiveScanCudaFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                     reverse)
