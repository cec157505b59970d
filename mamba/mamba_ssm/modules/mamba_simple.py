"""The Mamba block with SegMamba's tri-orientated scan (forward, reverse and through-slice directions).

Parameter names follow the published state-dict layout (``in_proj``, ``conv1d``/``conv1d_b``/``conv1d_s``,
``x_proj*``, ``dt_proj*``, ``A_log``/``A_b_log``/``A_s_log``, ``D``/``D_b``/``D_s``, ``out_proj``) so its
checkpoints load. The published constructor flag ``bimamba_type="v3"`` is kept (and is the only value
accepted); here that scan is called the tri-orientated scan.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba_ssm.ops.orderings import (legacy_grid, reverse_order, slice_order, slice_view_inverse,
                                     validate_grid)
from causal_conv1d.causal_conv1d_interface import backend_name as conv_backend_name
from mamba_ssm.ops.selective_scan_interface import (CUDA_KERNEL, active_backend, channels_first_linear,
                                                    mamba_inner_fn_no_out_proj)
from mamba_ssm.ops.cuda_backend import KERNEL_DTYPES
from mamba_ssm.ops.tri_orientated import InnerOps, cuda_ops, tri_orientated_inner

TRI_ORIENTATED = "v3"  # the published flag value for the forward + reverse + through-slice scan
DIRECTION_SUFFIXES = ("", "_b", "_s")  # forward, reverse, through-slice (names in the state dict)


def _at_least_float32(p: torch.Tensor) -> torch.Tensor:
    return p.to(torch.promote_types(p.dtype, torch.float32))


def _kernels_index_backwards(device: torch.device) -> bool:
    """True when both the conv1d and the selective-scan CUDA kernels run on ``device`` (they take the reverse
    direction by indexing)."""
    return device.type == "cuda" and conv_backend_name(device) == "cuda-kernel" and \
        active_backend(device) == CUDA_KERNEL


def _fused_inner_ops(xz: torch.Tensor, d_state: int) -> Optional[InnerOps]:
    """The ops of the fused three-direction function (:mod:`mamba_ssm.ops.tri_orientated`) for this input, or
    None to compose the per-direction autograd functions instead. Fused: on CUDA with both kernels built, for
    the dtypes and state sizes they cover, unless SEGMAMBA_FUSED_MAMBA=0 (for comparison)."""
    if os.environ.get("SEGMAMBA_FUSED_MAMBA", "1") == "0":
        return None
    if xz.dtype in KERNEL_DTYPES and d_state <= 64 and _kernels_index_backwards(xz.device):
        return cuda_ops()
    return None


class DirectionParams(NamedTuple):
    """The parameters of one scan direction."""
    conv1d: nn.Conv1d
    x_proj: nn.Linear
    dt_proj: nn.Linear
    A_log: nn.Parameter
    D: nn.Parameter


class Mamba(nn.Module):
    """Tri-orientated Mamba block. ``forward(hidden_states (B, L, d_model), grid=(D, H, W)) -> (B, L, d_model)``.

    ``d_inner = expand * d_model``; ``dt_rank = ceil(d_model / 16)`` when "auto". The three directions share
    ``in_proj`` (x and the gate z) and ``out_proj``; each has its own depthwise causal conv, ``x_proj``
    (-> [dt | B | C]), ``dt_proj``, ``A_log`` (d_inner, d_state) and ``D`` (d_inner). The output is
    ``out_proj(y_forward + unreverse(y_reverse) + unslice(y_slice))``.

    Initialisation as published: S4D-real ``A_log[d, n] = ln(n + 1)``, ``D = 1``, and Mamba's dt
    initialisation (``softplus(dt_proj.bias)`` log-uniform in [dt_min, dt_max]) for the forward direction
    only; ``init_all_directions_dt=True`` applies it to all three directions.

    ``grid``: the (D, H, W) of the feature map the tokens come from (``L = D*H*W``, C-order flattening).
    ``nslices`` is the published fallback used when no grid is passed: grid = (nslices, L // nslices, 1).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank="auto", dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random",
                 dt_scale: float = 1.0, dt_init_floor: float = 1e-4, conv_bias: bool = True,
                 bias: bool = False, bimamba_type: str = TRI_ORIENTATED, nslices: Optional[int] = None,
                 init_all_directions_dt: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        if bimamba_type != TRI_ORIENTATED:
            raise ValueError(f"Mamba: only bimamba_type='v3' (the tri-orientated scan) is supported; "
                             f"got {bimamba_type!r}")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"Mamba: dt_init must be 'random' or 'constant'; got {dt_init!r}")
        if not 2 <= d_conv <= 4:
            raise ValueError(f"Mamba: d_conv must be 2, 3 or 4 (causal conv widths); got {d_conv}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.bimamba_type = bimamba_type
        self.nslices = nslices
        d_inner = self.d_inner

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias, **factory)
        for suffix in DIRECTION_SUFFIXES:
            conv = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=conv_bias,
                             **factory)
            x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
            dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True, **factory)
            if suffix == "" or init_all_directions_dt:
                self._init_dt_proj(dt_proj, dt_init, dt_scale, dt_min, dt_max, dt_init_floor)
            # S4D-real initialisation: A = -(1..N) for every channel; kept in float32
            a_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32, device=device))
            A_log = nn.Parameter(a_log.repeat(d_inner, 1).contiguous())
            A_log._no_weight_decay = True
            D = nn.Parameter(torch.ones(d_inner, dtype=torch.float32, device=device))
            D._no_weight_decay = True
            setattr(self, "conv1d" + suffix, conv)
            setattr(self, "x_proj" + suffix, x_proj)
            setattr(self, "dt_proj" + suffix, dt_proj)
            setattr(self, "A_log" if suffix == "" else f"A{suffix}_log", A_log)
            setattr(self, "D" + suffix, D)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias, **factory)

    @staticmethod
    def _init_dt_proj(dt_proj: nn.Linear, dt_init: str, dt_scale: float, dt_min: float, dt_max: float,
                      dt_init_floor: float) -> None:
        """Mamba's dt initialisation: weight ~ U(+-std) (or constant std) with std = dt_scale/sqrt(rank);
        bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max] and at least dt_init_floor."""
        std = dt_proj.in_features ** -0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                dt_proj.weight.fill_(std)
            else:
                dt_proj.weight.uniform_(-std, std)
            u = torch.rand(dt_proj.out_features, device=dt_proj.bias.device)
            dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            # inverse of softplus: x = y + log(1 - exp(-y))
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        dt_proj.bias._no_reinit = True

    def direction_params(self, suffix: str) -> DirectionParams:
        """Parameters of the direction named by its state-dict suffix: "" (forward), "_b" (reverse) or
        "_s" (through-slice)."""
        if suffix not in DIRECTION_SUFFIXES:
            raise ValueError(f"unknown direction suffix {suffix!r}; expected one of {DIRECTION_SUFFIXES}")
        a_log_name = "A_log" if suffix == "" else f"A{suffix}_log"
        return DirectionParams(getattr(self, "conv1d" + suffix), getattr(self, "x_proj" + suffix),
                               getattr(self, "dt_proj" + suffix), getattr(self, a_log_name),
                               getattr(self, "D" + suffix))

    def resolve_grid(self, length: int, grid: Optional[Sequence[int]]):
        """The (D, H, W) grid for a sequence of ``length`` tokens: ``grid`` if given, else the legacy
        (nslices, L // nslices, 1)."""
        if grid is not None:
            return validate_grid(grid, length)
        if self.nslices is None:
            raise ValueError("Mamba.forward needs grid=(D, H, W) of the feature map (or construct the block "
                             "with nslices=... for the published fixed-slice behaviour)")
        return legacy_grid(length, self.nslices)

    @staticmethod
    def _scan_params(params: DirectionParams):
        """A = -exp(A_log), D and the dt bias as the scan takes them: float32 (float64 if the module is)."""
        bias = params.dt_proj.bias
        return (-torch.exp(_at_least_float32(params.A_log)), _at_least_float32(params.D),
                _at_least_float32(bias) if bias is not None else None)

    def _scan_direction(self, xz_perm: torch.Tensor, params: DirectionParams,
                        reverse: bool = False) -> torch.Tensor:
        """One scan direction on tokens already in its order: xz_perm (B, 2*d_inner, L) -> (B, d_inner, L).
        ``reverse``: the conv and the scan read the tokens last-to-first (output in the given order)."""
        A, D, delta_bias = self._scan_params(params)
        return mamba_inner_fn_no_out_proj(xz_perm, params.conv1d.weight, params.conv1d.bias,
                                          params.x_proj.weight, params.dt_proj.weight, A, D=D,
                                          delta_bias=delta_bias, delta_softplus=True, reverse=reverse)

    def _composed_inner(self, xz: torch.Tensor, grid) -> torch.Tensor:
        """The three directions summed in token order, each through its own autograd functions (any device and
        dtype): xz (B, 2*d_inner, L) -> (B, d_inner, L)."""
        out_forward = self._scan_direction(xz, self.direction_params(""))
        if _kernels_index_backwards(xz.device):
            # the conv1d and scan kernels walk the sequence backwards: no flipped copies of xz or the output
            out_reverse = self._scan_direction(xz, self.direction_params("_b"), reverse=True)
        else:  # PyTorch path: one flip in, one flip out (fewer copies than flipping inside each op)
            out_reverse = reverse_order(self._scan_direction(reverse_order(xz), self.direction_params("_b")))
        out_slice = self._scan_direction(slice_order(xz, grid), self.direction_params("_s"))
        # add the through-slice output through a transposed view: no un-sliced copy is materialised
        y = out_forward + out_reverse
        y.view(*y.shape[:2], grid[0], -1).add_(slice_view_inverse(out_slice, grid))
        return y

    def _tri_inner(self, xz: torch.Tensor, grid, ops: InnerOps) -> torch.Tensor:
        """The three directions summed in token order through the fused function (it keeps only xz and each
        direction's x_proj output for the backward pass): xz (B, 2*d_inner, L) -> (B, d_inner, L)."""
        params = []
        for suffix in DIRECTION_SUFFIXES:
            p = self.direction_params(suffix)
            params += [p.conv1d.weight, p.conv1d.bias, p.x_proj.weight, p.dt_proj.weight, *self._scan_params(p)]
        return tri_orientated_inner(xz, grid, ops, params)

    def forward(self, hidden_states: torch.Tensor, grid: Optional[Sequence[int]] = None,
                token_major_out: bool = False) -> torch.Tensor:
        """hidden_states (B, L, d_model) -> (B, L, d_model); ``grid`` = (D, H, W) with D*H*W == L.

        The result is a transposed view of a channel-first (B, d_model, L) tensor, or with ``token_major_out``
        a contiguous (B, L, d_model) tensor (same values), which is a channels-last feature map's layout."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"Mamba.forward: hidden_states must be (batch, L, d_model={self.d_model}); "
                             f"got {tuple(hidden_states.shape)}")
        grid = self.resolve_grid(hidden_states.shape[1], grid)
        # (B, 2*d_inner, L) produced contiguous by the GEMM itself, so the x and z halves are row-contiguous
        # channel slices that the kernels read in place (a transposed in_proj output would need copies).
        xz = channels_first_linear(self.in_proj.weight, hidden_states.transpose(1, 2), self.in_proj.bias)
        ops = _fused_inner_ops(xz, self.d_state)
        if ops is not None:
            y = self._tri_inner(xz, grid, ops)
        else:
            y = self._composed_inner(xz, grid)
        # out_proj from the left as well: no token-major copy of y (which autograd would keep for the backward
        # pass); the GEMM writes the result in the layout asked for.
        return channels_first_linear(self.out_proj.weight, y, self.out_proj.bias,
                                     token_major=token_major_out).transpose(1, 2)
