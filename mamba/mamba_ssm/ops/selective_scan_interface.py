"""Public selective-scan API: argument checks, dispatch (CUDA kernel or chunked PyTorch scan), and the
"inner" function of one Mamba scan direction (conv -> x_proj -> dt_proj -> scan -> gate)."""
from __future__ import annotations

import logging
from typing import Optional

import torch

from causal_conv1d import causal_conv1d_fn
from mamba_ssm.ops import cuda_backend
from mamba_ssm.ops.selective_scan_chunked import selective_scan_chunked

logger = logging.getLogger("mamba_ssm")

CUDA_KERNEL = "cuda-kernel"
PYTORCH_CHUNKED = "pytorch-chunked"
_LOGGED_PATHS: set = set()


def active_backend(device) -> str:
    """Which selective-scan implementation runs for tensors on ``device``: ``"cuda-kernel"`` (compiled
    kernels, CUDA tensors only) or ``"pytorch-chunked"`` (everything else)."""
    device = torch.device(device)
    return CUDA_KERNEL if device.type == "cuda" and cuda_backend.available() else PYTORCH_CHUNKED


def _log_path_once(path: str, device: torch.device) -> None:
    if path not in _LOGGED_PATHS:
        _LOGGED_PATHS.add(path)
        how = ("compiled CUDA kernels" if path == CUDA_KERNEL
               else "chunked PyTorch implementation (no compiled kernel for this device)")
        logger.info("mamba_ssm selective scan: using the %s [%s] on %s", how, path, device.type)


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_scan_arguments(u, delta, A, B, C, D=None, z=None, delta_bias=None) -> None:
    """Raise ValueError/TypeError naming the argument when shapes, dtypes or devices do not fit."""
    if not isinstance(u, torch.Tensor) or u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, L); got {_shape(u)}")
    batch, dim, length = u.shape
    if not isinstance(delta, torch.Tensor) or tuple(delta.shape) != tuple(u.shape):
        raise ValueError(f"selective_scan: delta must have u's shape {tuple(u.shape)}; got {_shape(delta)}")
    if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (dim={dim}, N); got {_shape(A)}")
    if A.is_complex():
        raise TypeError("selective_scan: complex A is not supported")
    n = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        if not isinstance(M, torch.Tensor):
            raise ValueError(f"selective_scan: {name} must be a tensor; got {type(M).__name__}")
        if M.dim() == 2:
            if tuple(M.shape) != (dim, n):
                raise ValueError(f"selective_scan: constant {name} must be (dim, N) = {(dim, n)}; "
                                 f"got {tuple(M.shape)}")
        elif M.dim() == 4:
            g = M.shape[1]
            if M.shape[0] != batch or M.shape[2] != n or M.shape[3] != length or g < 1 or dim % g:
                raise ValueError(f"selective_scan: input-dependent {name} must be (batch, G, N, L) = "
                                 f"({batch}, G, {n}, {length}) with dim={dim} divisible by G; "
                                 f"got {tuple(M.shape)}")
        else:
            raise ValueError(f"selective_scan: {name} must be (dim, N) or (batch, G, N, L); got {_shape(M)}")
    if B.dim() == 4 and C.dim() == 4 and B.shape[1] != C.shape[1]:
        raise ValueError(f"selective_scan: B and C must have the same number of groups; got "
                         f"{B.shape[1]} and {C.shape[1]}")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and (not isinstance(v, torch.Tensor) or tuple(v.shape) != (dim,)):
            raise ValueError(f"selective_scan: {name} must be ({dim},); got {_shape(v)}")
    if z is not None and (not isinstance(z, torch.Tensor) or tuple(z.shape) != tuple(u.shape)):
        raise ValueError(f"selective_scan: z must have u's shape {tuple(u.shape)}; got {_shape(z)}")
    tensors = {k: v for k, v in dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias).items()
               if v is not None}
    for k, v in tensors.items():
        if not v.is_floating_point():
            raise TypeError(f"selective_scan: {k} must be a floating-point tensor; got {v.dtype}")
    devices = {str(v.device) for v in tensors.values()}
    if len(devices) != 1:
        raise ValueError("selective_scan: all tensors must be on one device; got "
                         + ", ".join(f"{k} on {v.device}" for k, v in tensors.items()))


def selective_scan_fn(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                      C: torch.Tensor, D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                      delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                      return_last_state: bool = False, reverse: bool = False):
    """Selective scan (Mamba's S6 recurrence); differentiable.

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (dim, N) or (batch, G, N, L); D, delta_bias: (dim,).
    ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t``, ``y_t = C_t . h_t + D u_t``, ``out = y * silu(z)`` with
    ``dt = softplus(delta + delta_bias)`` (softplus only if ``delta_softplus``). Computed in float32
    (float64 for float64 inputs); ``out`` has u's dtype. With ``return_last_state`` returns
    ``(out, last_state)``, last_state (batch, dim, N) without gradient.

    ``reverse=True`` runs the recurrence from the last token to the first: equal to flipping every per-token
    input along L, scanning, and flipping ``out`` back (``last_state`` is then the state after token 0). The
    CUDA kernels do this by indexing, without flipped copies.

    CUDA tensors use the compiled kernels when built; everything else the chunked PyTorch scan.
    """
    check_scan_arguments(u, delta, A, B, C, D, z, delta_bias)
    path = active_backend(u.device)
    _log_path_once(path, u.device)
    if path == CUDA_KERNEL:
        return cuda_backend.selective_scan_cuda_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                   return_last_state, reverse=reverse)
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  reverse=reverse)


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast casts GEMMs to on ``device_type`` right now, or None when it is off there (or does not
    exist there, e.g. on the meta device)."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        if not torch.amp.is_autocast_available(device_type):
            return None
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return None


def channels_first_weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The weight gradient of ``weight @ x[b]`` for every b: ``sum_b grad[b] @ x[b]^T`` for grad (batch, out, L)
    and x (batch, in, L), accumulated in at least float32. One (out, L) x (L, in) GEMM per batch element:
    ``bmm(grad, x^T).sum(0)``, what autograd does for a broadcast weight, makes cuBLAS pick a batched kernel
    that is several times slower for these long reductions."""
    grad_weight = torch.mm(grad[0], x[0].mT).to(torch.promote_types(grad.dtype, torch.float32))
    for b in range(1, x.shape[0]):
        grad_weight += torch.mm(grad[b], x[b].mT)
    return grad_weight


class _ChannelsFirstLinear(torch.autograd.Function):
    """``weight @ x[b]`` for every batch element b, with a backward pass that computes the weight gradient as
    one long-reduction GEMM per batch element (see :func:`channels_first_linear`)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, x: torch.Tensor, token_major: bool = False) -> torch.Tensor:
        ctx.dtypes = (weight.dtype, x.dtype)
        dtype = _autocast_dtype(x.device.type)
        if dtype is not None:  # the projection is a GEMM: run it in the autocast dtype, as F.linear would
            weight, x = weight.to(dtype), x.to(dtype)  # (autocast then has nothing left to cast)
        if token_major:  # (x^T W^T)^T: the same GEMM with the operands swapped writes (batch, L, out) rows
            out = torch.bmm(x.mT, weight.mT.expand(x.shape[0], *weight.mT.shape)).mT
        else:
            out = torch.bmm(weight.expand(x.shape[0], *weight.shape), x)
        ctx.save_for_backward(weight, x)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, x = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        grad_weight = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_weight = channels_first_weight_grad(grad, x).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_x = torch.bmm(weight.mT.expand(x.shape[0], *weight.mT.shape), grad).to(ctx.dtypes[1])
        return grad_weight, grad_x, None


def channels_first_linear(weight: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor] = None,
                          token_major: bool = False) -> torch.Tensor:
    """A linear layer's ``weight`` (out, in) (and ``bias``) applied per token to channel-first ``x``
    (batch, in, L): returns the (batch, out, L) result, contiguous, or with ``token_major=True`` laid out as
    contiguous (batch, L, out) rows (``result.transpose(1, 2)`` is then contiguous: what a channels-last
    feature map needs). Under autocast the GEMMs run in the autocast dtype, as ``F.linear`` would.

    One batched GEMM with the weight broadcast over the batch (a stride-0 batch dimension) reads ``x`` in
    place and writes the channel-first result directly. ``torch.matmul(weight, x)`` gives the same numbers
    but folds the batch into one GEMM by transposing ``x``: a token-major copy of ``x`` on the way in and a
    channel-first copy of the result on the way out (and more copies in its backward pass).
    """
    out = _ChannelsFirstLinear.apply(weight, x, token_major)
    return out if bias is None else out + bias[:, None]


def mamba_inner_fn_no_out_proj(xz: torch.Tensor, conv1d_weight: torch.Tensor,
                               conv1d_bias: Optional[torch.Tensor], x_proj_weight: torch.Tensor,
                               delta_proj_weight: torch.Tensor, A: torch.Tensor,
                               D: Optional[torch.Tensor] = None, delta_bias: Optional[torch.Tensor] = None,
                               delta_softplus: bool = True, reverse: bool = False) -> torch.Tensor:
    """One Mamba scan direction without the output projection.

    xz: (batch, 2*d_inner, L), x = first half of the channels, z = second half (the gate).
    conv1d_weight: (d_inner, 1, W) or (d_inner, W); x_proj_weight: (dt_rank + 2N, d_inner);
    delta_proj_weight: (d_inner, dt_rank); A: (d_inner, N); D, delta_bias: (d_inner,).
    Returns ``selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)`` (batch, d_inner, L) with
    u = silu(causal_conv1d(x)), [dt | B | C] = x_proj(u), delta = delta_proj_weight @ dt (its bias enters
    as delta_bias), B and C input dependent with one group. Under autocast the projections run in the
    autocast dtype and the scan in float32.

    ``reverse=True`` is the same direction on the token sequence read last-to-first (an anti-causal conv and
    a backwards scan), with the output in the original token order: equal to flipping xz, running the
    forward direction and flipping the result, but the CUDA kernels index backwards instead of copying.
    """
    if xz.dim() != 3 or xz.shape[1] % 2:
        raise ValueError(f"mamba_inner_fn_no_out_proj: xz must be (batch, 2*d_inner, L); got {tuple(xz.shape)}")
    batch, two_d, length = xz.shape
    d_inner = two_d // 2
    n = A.shape[-1]
    dt_rank = delta_proj_weight.shape[1]
    if x_proj_weight.shape != (dt_rank + 2 * n, d_inner):
        raise ValueError(f"mamba_inner_fn_no_out_proj: x_proj_weight must be (dt_rank + 2N, d_inner) = "
                         f"{(dt_rank + 2 * n, d_inner)}; got {tuple(x_proj_weight.shape)}")
    x, z = xz[:, :d_inner], xz[:, d_inner:]
    weight = conv1d_weight.reshape(conv1d_weight.shape[0], conv1d_weight.shape[-1])
    u = causal_conv1d_fn(x, weight, conv1d_bias, activation="silu", reverse=reverse)
    # The projections act per token; multiplying from the left keeps the channel-first layout, so u is used
    # (and saved for backward) as it is and delta comes out contiguous: no transposed copies of u or delta.
    x_dbl = channels_first_linear(x_proj_weight, u)  # (batch, dt_rank + 2N, L)
    delta = channels_first_linear(delta_proj_weight, x_dbl[:, :dt_rank])  # (batch, d_inner, L)
    B = x_dbl[:, dt_rank:dt_rank + n].unsqueeze(1)  # (batch, 1, N, L), rows contiguous
    C = x_dbl[:, dt_rank + n:].unsqueeze(1)
    return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                             reverse=reverse)
