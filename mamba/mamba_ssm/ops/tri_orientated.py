"""The three scan directions of the tri-orientated Mamba block as one autograd function that keeps little for
the backward pass.

``tri_orientated_inner(xz, grid, ops, params)`` computes, from the block's in_proj output xz (B, 2*d_inner, L),
``y = y_forward + unreverse(y_reverse) + unslice(y_slice)`` (B, d_inner, L), each direction being
conv1d + SiLU -> x_proj -> dt_proj -> selective scan (softplus, D skip, SiLU(z) gate), exactly as
:func:`mamba_ssm.ops.selective_scan_interface.mamba_inner_fn_no_out_proj` composes them.

What the composition of separate autograd functions keeps per direction, and this function does not:

* u = silu(conv1d(x)) and delta = dt_proj(x_proj(u)[:dt_rank]), each (B, d_inner, L): recomputed in the
  backward pass from xz and x_dbl = x_proj(u) (B, dt_rank + 2N, L), which is kept (one conv1d pass and one
  rank-``dt_rank`` GEMM per direction, both memory-bound and cheap next to the scan);
* the through-slice reordered copy of xz (B, 2*d_inner, L): made again in the backward pass;
* B and C as contiguous copies (B, 1, N, L).

So per direction only x_dbl and the scan's own per-chunk states stay, plus xz once for all three; at SegMamba's
stage 0 (batch 2, 64³ tokens, fp16) that is about 0.7 instead of 1.5 GiB per Mamba layer. The backward pass also
assembles the gradient of xz itself (one concatenation, then in-place additions) instead of autograd's
zero-filled full-size buffer per channel slice and direction.

``ops`` are the four non-differentiable building blocks (:class:`InnerOps`): the CUDA kernels
(:func:`cuda_ops`), or pure-PyTorch versions (:data:`REFERENCE_OPS`, differentiated by autograd; what the tests
run this function with on the CPU).
"""
from __future__ import annotations

import functools
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

from mamba_ssm.ops.orderings import slice_order, slice_view_inverse, validate_grid
from mamba_ssm.ops.selective_scan_interface import _autocast_dtype, channels_first_weight_grad

# (reverse, through-slice) of the three directions, in the order of their parameters
DIRECTIONS = ((False, False), (True, False), (False, True))
PARAMS_PER_DIRECTION = 7  # conv1d weight, conv1d bias, x_proj weight, dt_proj weight, A, D, delta_bias


class InnerOps(NamedTuple):
    """The building blocks, without autograd. SiLU after the conv and softplus on delta are fixed (the block's).

    * ``conv_fwd(x, weight, bias, reverse) -> silu(causal_conv1d(x))``: x (B, d, L) (a channel slice of a larger
      tensor), weight (d, W) and bias (d,) or None in float32;
    * ``conv_bwd(x, weight, bias, dout, reverse) -> (dx, dweight, dbias)`` (dbias None without a bias);
    * ``scan_fwd(u, delta, A, B, C, D, z, delta_bias, reverse) -> (out, saved)``: B, C (B, 1, N, L);
      ``saved`` a tuple of tensors for ``scan_bwd``;
    * ``scan_bwd(u, delta, A, B, C, D, z, delta_bias, dout, saved, reverse)
      -> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)``.
    """
    conv_fwd: Callable
    conv_bwd: Callable
    scan_fwd: Callable
    scan_bwd: Callable


@functools.lru_cache(maxsize=1)
def cuda_ops() -> InnerOps:
    """The compiled CUDA kernels of both packages (callers check that they are built)."""
    from causal_conv1d import cuda_backend as conv
    from mamba_ssm.ops import cuda_backend as scan

    def scan_fwd(u, delta, A, B, C, D, z, delta_bias, reverse):
        out, _, saved = scan.scan_forward(u, delta, A, B, C, D, z, delta_bias, True, False, reverse)
        return out, saved

    return InnerOps(
        conv_fwd=lambda x, w, b, reverse: conv.conv_forward(x, w, b, True, reverse),
        conv_bwd=lambda x, w, b, dout, reverse: conv.conv_backward(x, w, b, dout, True, reverse),
        scan_fwd=scan_fwd,
        scan_bwd=lambda u, delta, A, B, C, D, z, bias, dout, saved, reverse: scan.scan_backward(
            u, delta, A, B, C, D, z, bias, True, dout, saved, reverse))


def _grads_of(fn, inputs: Sequence[Optional[torch.Tensor]], dout: torch.Tensor):
    """Gradients of ``fn(*inputs)`` against ``dout`` for every tensor input (None for None inputs)."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    with torch.enable_grad():
        out = fn(*leaves)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, present, dout))
    return tuple(None if t is None else next(grads) for t in leaves)


def _reference_ops() -> InnerOps:
    from causal_conv1d import causal_conv1d_ref
    from mamba_ssm.ops.selective_scan_chunked import selective_scan_chunked

    def conv(x, w, b, reverse):
        return causal_conv1d_ref(x, w, b, "silu", reverse=reverse)

    def scan(reverse):
        return lambda u, delta, A, B, C, D, z, bias: selective_scan_chunked(u, delta, A, B, C, D, z, bias, True,
                                                                             reverse=reverse)

    return InnerOps(
        conv_fwd=conv,
        conv_bwd=lambda x, w, b, dout, reverse: _grads_of(lambda *a: conv(*a, reverse), (x, w, b), dout),
        scan_fwd=lambda u, delta, A, B, C, D, z, bias, reverse: (scan(reverse)(u, delta, A, B, C, D, z, bias), ()),
        scan_bwd=lambda u, delta, A, B, C, D, z, bias, dout, saved, reverse: _grads_of(
            scan(reverse), (u, delta, A, B, C, D, z, bias), dout))


REFERENCE_OPS = _reference_ops()


def _operands(weight: torch.Tensor, x: torch.Tensor, gemm_dtype: Optional[torch.dtype]):
    """weight and x in the dtype a projection runs in: autocast's when it is on (as F.linear would), else the
    wider of the two."""
    dtype = gemm_dtype or torch.promote_types(weight.dtype, x.dtype)
    return weight.to(dtype), x.to(dtype)


def _left(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight @ x[b] for every b (a broadcast-weight bmm: x read in place, the result channel-first)."""
    return torch.bmm(weight.expand(x.shape[0], *weight.shape), x)


def _conv_weights(weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """The conv1d weight as (d_inner, W) and its bias, contiguous, in at least float32 (the kernels' float32)."""
    def wide(t):
        return t.to(torch.promote_types(t.dtype, torch.float32)).contiguous()
    return wide(weight.reshape(weight.shape[0], -1)), None if bias is None else wide(bias)


def _recompute(ops: InnerOps, src: torch.Tensor, p, reverse: bool, gemm_dtype, x_dbl=None):
    """u, x_dbl, delta, B, C and z of one direction from its (B, 2*d_inner, L) input in scan order (x_dbl is
    computed from u unless given)."""
    conv_w, conv_b, x_proj_w, dt_proj_w, A = p[:5]
    d_inner = src.shape[1] // 2
    x, z = src[:, :d_inner], src[:, d_inner:]
    u = ops.conv_fwd(x, *_conv_weights(conv_w, conv_b), reverse)
    if x_dbl is None:
        x_dbl = _left(*_operands(x_proj_w, u, gemm_dtype))
    rank, n = dt_proj_w.shape[1], A.shape[1]
    delta = _left(*_operands(dt_proj_w, x_dbl[:, :rank], gemm_dtype))
    B = x_dbl[:, rank:rank + n].unsqueeze(1)
    C = x_dbl[:, rank + n:].unsqueeze(1)
    return x, z, u, x_dbl, delta, B, C


def _direction_backward(ops: InnerOps, src, p, x_dbl, saved, dout, reverse, gemm_dtype):
    """Gradients of one direction: (dx, dz, parameter gradients in the order of ``p``)."""
    conv_w, conv_b, x_proj_w, dt_proj_w, A, D, delta_bias = p
    x, z, u, x_dbl, delta, B, C = _recompute(ops, src, p, reverse, gemm_dtype, x_dbl)
    du, ddelta, dA, dB, dC, dD, dz, dbias = ops.scan_bwd(u, delta, A, B, C, D, z, delta_bias, dout, saved, reverse)
    rank, n = dt_proj_w.shape[1], A.shape[1]
    batch, length = x_dbl.shape[0], x_dbl.shape[-1]
    # delta = W_dt @ x_dbl[:, :rank]
    w_dt, dt_low = _operands(dt_proj_w, x_dbl[:, :rank], gemm_dtype)
    ddelta = ddelta.to(w_dt.dtype)
    g_dt_proj = channels_first_weight_grad(ddelta, dt_low).to(dt_proj_w.dtype)
    dx_dbl = torch.cat([_left(w_dt.mT, ddelta).to(x_dbl.dtype), dB.reshape(batch, n, length).to(x_dbl.dtype),
                        dC.reshape(batch, n, length).to(x_dbl.dtype)], dim=1)
    # x_dbl = W_x @ u; u also enters the scan: du = du_scan + W_x^T dx_dbl (one GEMM adding into du_scan)
    w_x, u_g = _operands(x_proj_w, u, gemm_dtype)
    dx_dbl = dx_dbl.to(w_x.dtype)
    g_x_proj = channels_first_weight_grad(dx_dbl, u_g).to(x_proj_w.dtype)
    du = torch.baddbmm(du.to(w_x.dtype), w_x.mT.expand(batch, *w_x.mT.shape), dx_dbl)
    dx, g_conv_w, g_conv_b = ops.conv_bwd(x, *_conv_weights(conv_w, conv_b), du.to(x.dtype), reverse)
    grads = (g_conv_w.reshape(conv_w.shape).to(conv_w.dtype),
             None if conv_b is None else g_conv_b.to(conv_b.dtype), g_x_proj, g_dt_proj, dA.to(A.dtype),
             None if D is None else dD.to(D.dtype), None if delta_bias is None else dbias.to(delta_bias.dtype))
    return dx.to(src.dtype), dz.to(src.dtype), grads


class _TriOrientatedInner(torch.autograd.Function):

    @staticmethod
    def forward(ctx, xz: torch.Tensor, grid, ops: InnerOps, *params):
        gemm_dtype = _autocast_dtype(xz.device.type)
        x_dbls: List[torch.Tensor] = []
        scan_saved: List[Tuple[torch.Tensor, ...]] = []
        y = None
        for k, (reverse, through_slice) in enumerate(DIRECTIONS):
            p = params[k * PARAMS_PER_DIRECTION:(k + 1) * PARAMS_PER_DIRECTION]
            src = slice_order(xz, grid) if through_slice else xz
            _, z, u, x_dbl, delta, B, C = _recompute(ops, src, p, reverse, gemm_dtype)
            out, saved = ops.scan_fwd(u, delta, p[4], B, C, p[5], z, p[6], reverse)
            x_dbls.append(x_dbl)
            scan_saved.append(tuple(saved))
            if y is None:
                y = out
            elif through_slice:  # added through a transposed view: no un-sliced copy
                y.view(*y.shape[:2], grid[0], -1).add_(slice_view_inverse(out, grid))
            else:
                y.add_(out)
        ctx.grid, ctx.ops, ctx.gemm_dtype = grid, ops, gemm_dtype
        ctx.n_saved = [len(s) for s in scan_saved]
        ctx.save_for_backward(xz, *x_dbls, *params, *(t for s in scan_saved for t in s))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        xz, *rest = ctx.saved_tensors
        x_dbls, rest = rest[:3], rest[3:]
        n_params = len(DIRECTIONS) * PARAMS_PER_DIRECTION
        params, flat_saved = rest[:n_params], rest[n_params:]
        grid, ops, gemm_dtype = ctx.grid, ctx.ops, ctx.gemm_dtype
        d_inner = xz.shape[1] // 2
        dy = dy.contiguous()
        dxz = None
        grads: List[Optional[torch.Tensor]] = []
        offset = 0
        for k, (reverse, through_slice) in enumerate(DIRECTIONS):
            p = params[k * PARAMS_PER_DIRECTION:(k + 1) * PARAMS_PER_DIRECTION]
            saved = tuple(flat_saved[offset:offset + ctx.n_saved[k]])
            offset += ctx.n_saved[k]
            src = slice_order(xz, grid) if through_slice else xz
            dout = slice_order(dy, grid) if through_slice else dy
            dx, dz, g = _direction_backward(ops, src, p, x_dbls[k], saved, dout, reverse, gemm_dtype)
            grads.extend(g)
            if dxz is None:
                dxz = torch.cat([dx, dz], dim=1)
                continue
            for half, grad in ((dxz[:, :d_inner], dx), (dxz[:, d_inner:], dz)):
                if through_slice:
                    half.view(*half.shape[:2], grid[0], -1).add_(slice_view_inverse(grad, grid))
                else:
                    half.add_(grad)
        return (dxz, None, None, *grads)


def tri_orientated_inner(xz: torch.Tensor, grid: Sequence[int], ops: InnerOps,
                         params: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """The sum of the block's three scan directions in token order, (B, d_inner, L), from xz (B, 2*d_inner, L).

    ``params``: for the forward, reverse and through-slice directions in turn, (conv1d weight (d_inner, 1, W),
    conv1d bias or None, x_proj weight (dt_rank + 2N, d_inner), dt_proj weight (d_inner, dt_rank),
    A = -exp(A_log) (d_inner, N), D (d_inner) or None, dt_proj bias (d_inner) or None): 21 entries.
    ``grid`` = (D, H, W) of the feature map (L = D*H*W) for the through-slice order."""
    if xz.dim() != 3 or xz.shape[1] % 2:
        raise ValueError(f"tri_orientated_inner: xz must be (batch, 2*d_inner, L); got {tuple(xz.shape)}")
    if len(params) != len(DIRECTIONS) * PARAMS_PER_DIRECTION:
        raise ValueError(f"tri_orientated_inner: expected {len(DIRECTIONS) * PARAMS_PER_DIRECTION} parameters "
                         f"(7 per direction); got {len(params)}")
    grid = validate_grid(grid, xz.shape[-1])
    return _TriOrientatedInner.apply(xz, grid, ops, *params)
