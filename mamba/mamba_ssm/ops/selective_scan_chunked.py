"""Chunked selective scan in pure PyTorch, with a hand-written, memory-bounded backward pass.

Same semantics as :func:`mamba_ssm.ops.selective_scan_ref.selective_scan_ref_loop` (see there), computed
in float32 whatever the input dtype (float64 inputs are computed in float64).

How it runs. The recurrence ``h_t = a_t * h_{t-1} + beta_t`` (``a_t = exp(dt_t A)``,
``beta_t = dt_t B_t u_t``) is associative, so the sequence can be cut into chunks that are scanned side by
side. The sequence is processed in *segments* of ``nc`` chunks of ``T`` tokens, laid out token-in-chunk
first as ``(T, batch, G, nc, N, dim/G)``; the whole ``(batch, dim, N, L)`` state is never materialised.
Per segment:

1. a loop over the ``T`` positions scans every chunk from a zero state at once (each step one vectorised
   multiply-add over all chunks, small enough to stay in cache), keeping ``a`` and ``beta``;
2. a short loop over the chunks carries the true state from chunk to chunk
   (``h_in[c+1] = exp(A * sum(dt over chunk c)) * h_in[c] + h_local_end[c]``);
3. a second loop over the positions re-runs the recurrence from the true chunk states and contracts with
   ``C``. Only products of decays ``a <= 1`` and sums occur: as stable as the sequential loop for any
   ``dt * |A|``.

Backward recomputes each segment from its saved starting state (the only per-segment data kept besides
the inputs) and runs the adjoint ``lambda_t = dy_t C_t + a_{t+1} lambda_{t+1}`` through the same scheme in
reverse order. See ``shared/spec/kernels.md`` for the gradient formulas.

On CPU the many small operations run fastest on one intra-op thread (no thread wake-ups per step, and
robust on a loaded machine); the scan temporarily sets ``torch.set_num_threads(1)``. Set the environment
variable ``MAMBA_SSM_CPU_SCAN_THREADS`` to another count, or to 0 to leave torch's setting alone.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# Tokens per chunk (steps of the Python loop), and the number of state values each vectorised step
# touches (nc * batch * dim * N; on CPU sized so that the few operands of a step stay in a 2 MiB L2
# cache). The chunks per segment nc follow from it. Tuned on a 2-core CPU with bench/bench_cpu_ops.py.
DEFAULT_CHUNK_LEN = 64
STEP_ELEMENTS_CPU = 64 * 1536
STEP_ELEMENTS_CUDA = 1 << 22
# softplus is the identity above this (as torch.nn.functional.softplus and the CUDA kernels)
SOFTPLUS_THRESHOLD = 20.0
# exponents below these are clamped before exp: results stay normal numbers (subnormal arithmetic is
# ~20x slower on x86) and the change, < 2e-35 resp. 1e-304 per factor, is far below rounding error
_EXP_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}


def compute_dtype_for(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 when any given tensor is float64, else float32 (fp16/bf16 are upcast)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _cpu_scan_threads() -> Optional[int]:
    value = os.environ.get("MAMBA_SSM_CPU_SCAN_THREADS", "1").strip()
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"MAMBA_SSM_CPU_SCAN_THREADS must be an integer (0 = leave torch's thread "
                         f"count alone); got {value!r}") from None
    return n if n > 0 else None


@contextlib.contextmanager
def _scan_threads(device: torch.device):
    """Run the block with the intra-op thread count chosen for the CPU scan, then restore it."""
    wanted = _cpu_scan_threads() if device.type == "cpu" else None
    previous = torch.get_num_threads()
    if wanted is None or wanted == previous:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _ScanProblem:
    """Inputs of one scan call, derived sizes, and conversions to/from the chunked token-major layout.

    Layouts: per-channel tensors ``(T, batch, G, nc, 1, Dg)``; states ``(T, batch, G, nc, N, Dg)``;
    input-dependent B/C ``(T, batch, G, nc, N, 1)``; constant B/C, A: ``(G, 1, N, Dg)``.
    """

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool,
                 chunk_len: Optional[int], chunks_per_segment: Optional[int]):
        self.u, self.delta, self.B, self.C = u, delta, B, C
        self.D, self.z, self.delta_bias, self.delta_softplus = D, z, delta_bias, delta_softplus
        self.device = u.device
        self.cdt = compute_dtype_for(u, delta, A, B, C, D, z, delta_bias)
        self.batch, self.dim, self.length = u.shape
        self.d_state = A.shape[1]
        self.variable_B, self.variable_C = B.dim() == 4, C.dim() == 4
        self.groups = B.shape[1] if self.variable_B else (C.shape[1] if self.variable_C else 1)
        self.dg = self.dim // self.groups
        length = max(self.length, 1)
        self.T = max(1, min(int(chunk_len or DEFAULT_CHUNK_LEN), length))
        if chunks_per_segment is None:
            step = STEP_ELEMENTS_CUDA if self.device.type == "cuda" else STEP_ELEMENTS_CPU
            chunks_per_segment = max(1, step // max(1, self.batch * self.dim * self.d_state))
        self.nc = max(1, min(int(chunks_per_segment), -(-length // self.T)))
        self.S = self.T * self.nc
        self.n_segments = -(-self.length // self.S)
        self.exp_floor = _EXP_FLOOR[self.cdt]
        self.A_t = self._per_state(A)
        self.A_range = (float(A.detach().min()), float(A.detach().max())) if A.numel() else (0.0, 0.0)
        self.D_c = D.to(self.cdt)[:, None] if D is not None else None
        self.B_const = None if self.variable_B else self._per_state(B)
        self.C_const = None if self.variable_C else self._per_state(C)

    # ---- layout conversions -------------------------------------------------------------------------
    def _per_state(self, M: torch.Tensor) -> torch.Tensor:
        """(dim, N) -> (G, 1, N, Dg) in the compute dtype."""
        return M.to(self.cdt).reshape(self.groups, self.dg, self.d_state).transpose(1, 2).unsqueeze(1).contiguous()

    def _from_per_state(self, x: torch.Tensor) -> torch.Tensor:
        """(G, N, Dg) -> (dim, N)."""
        return x.transpose(1, 2).reshape(self.dim, self.d_state)

    def segment_bounds(self, k: int) -> Tuple[int, int]:
        return k * self.S, min((k + 1) * self.S, self.length)

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, dim, S') -> contiguous (T, batch, G, nc, 1, Dg), zero padded to S tokens."""
        x = F.pad(x, (0, self.S - x.shape[-1]))
        x = x.reshape(self.batch, self.groups, self.dg, self.nc, self.T)
        return x.permute(4, 0, 1, 3, 2).unsqueeze(-2).contiguous()

    def from_tokens(self, x: torch.Tensor, valid: int) -> torch.Tensor:
        """(T, batch, G, nc, 1, Dg) -> (batch, dim, valid)."""
        x = x.squeeze(-2).permute(1, 2, 4, 3, 0).reshape(self.batch, self.dim, self.S)
        return x[..., :valid]

    def state_to_tokens(self, M: torch.Tensor) -> torch.Tensor:
        """Input-dependent B or C (batch, G, N, S') -> contiguous (T, batch, G, nc, N, 1)."""
        M = F.pad(M, (0, self.S - M.shape[-1]))
        M = M.reshape(self.batch, self.groups, self.d_state, self.nc, self.T)
        return M.permute(4, 0, 1, 3, 2).unsqueeze(-1).contiguous()

    def state_from_tokens(self, x: torch.Tensor, valid: int) -> torch.Tensor:
        """(T, batch, G, nc, N, 1) -> (batch, G, N, valid)."""
        x = x.squeeze(-1).permute(1, 2, 4, 3, 0).reshape(self.batch, self.groups, self.d_state, self.S)
        return x[..., :valid]

    # ---- per-segment inputs -------------------------------------------------------------------------
    def segment(self, k: int, with_u: bool = False) -> "_Segment":
        s0, s1 = self.segment_bounds(k)
        pre = self.delta[..., s0:s1].to(self.cdt)
        if self.delta_bias is not None:
            pre = pre + self.delta_bias.to(self.cdt)[:, None]
        dt = F.softplus(pre, threshold=SOFTPLUS_THRESHOLD) if self.delta_softplus else pre
        u = self.u[..., s0:s1].to(self.cdt)
        seg = _Segment(s0, s1)
        seg.pre = pre
        seg.u_flat = u
        seg.dt = self.to_tokens(dt)
        seg.u = self.to_tokens(u) if with_u else None
        seg.du = self.to_tokens(dt * u)
        seg.B = self.state_to_tokens(self.B[..., s0:s1].to(self.cdt)) if self.variable_B else None
        seg.C = self.state_to_tokens(self.C[..., s0:s1].to(self.cdt)) if self.variable_C else None
        if dt.numel():  # smallest possible exponent dt * A from the ranges of dt and A
            dt_range = (float(dt.min()), float(dt.max()))
            lowest = min(x * y for x in dt_range for y in self.A_range)
            seg.needs_exp_floor = lowest < self.exp_floor
        return seg


class _Segment:
    """Per-segment inputs in the token-major layout (see :class:`_ScanProblem`)."""

    def __init__(self, s0: int, s1: int):
        self.s0, self.s1 = s0, s1
        self.pre = self.u_flat = self.dt = self.u = self.du = self.B = self.C = None
        self.needs_exp_floor = False


class _Workspace:
    """Reusable buffers for one (T, nc) geometry, with per-position views prepared once."""

    def __init__(self, prob: _ScanProblem, with_states: bool):
        T, bgn = prob.T, prob.batch * prob.groups * prob.nc
        slice_shape = (prob.batch, prob.groups, prob.nc, prob.d_state, prob.dg)
        opts = dict(dtype=prob.cdt, device=prob.device)
        self.slice_shape = slice_shape
        self.a = torch.empty((T,) + slice_shape, **opts)
        self.beta = torch.empty((T,) + slice_shape, **opts)  # beta in the forward, lambda in the backward
        self.a_t, self.beta_t = self.a.unbind(0), self.beta.unbind(0)
        self.beta3_t = self.beta.view(T, bgn, prob.d_state, prob.dg).unbind(0)
        if with_states:  # all true states h_t of the segment (backward pass)
            self.H = torch.empty((T,) + slice_shape, **opts)
            self.H_t = self.H.unbind(0)
            self.H3_t = self.H.view(T, bgn, prob.d_state, prob.dg).unbind(0)
        self.h_run = torch.empty(slice_shape, **opts)
        self.h_run3 = self.h_run.view(bgn, prob.d_state, prob.dg)
        self.h_loc = torch.empty(slice_shape, **opts)
        self.h_in = torch.empty(slice_shape, **opts)
        self.dec = torch.empty(slice_shape, **opts)
        self.tmp = torch.empty(slice_shape, **opts)
        self.h_loc_c, self.h_in_c, self.dec_c = self.h_loc.unbind(2), self.h_in.unbind(2), self.dec.unbind(2)
        self.y = torch.empty(T, prob.batch, prob.groups, prob.nc, 1, prob.dg, **opts)
        self.y_t = self.y.unbind(0)
        self.y3_t = self.y.view(T, bgn, 1, prob.dg).unbind(0)


def _contract_C(prob: _ScanProblem, ws: _Workspace, seg: _Segment, t: int, h: torch.Tensor,
                h3: torch.Tensor) -> None:
    """ws.y[t] = sum_n C_t[n] h[n] for the state slice h (batch, G, nc, N, Dg)."""
    if prob.variable_C:
        c_row = seg.C[t].view(-1, 1, prob.d_state)  # (batch*G*nc, 1, N)
        torch.bmm(c_row, h3, out=ws.y3_t[t])
    else:
        torch.mul(h, prob.C_const, out=ws.tmp)
        torch.sum(ws.tmp, dim=-2, keepdim=True, out=ws.y_t[t])


def _scan_segment(prob: _ScanProblem, ws: _Workspace, seg: _Segment, h0: torch.Tensor,
                  keep_states: bool, need_y: bool) -> torch.Tensor:
    """Run one segment from state h0 (batch, G, N, Dg). Leaves a, beta (and all states when
    ``keep_states``, y when ``need_y``) in the workspace; returns the state after the segment."""
    T = prob.T
    a_t, beta_t = ws.a_t, ws.beta_t
    dt_t, du_t = seg.dt.unbind(0), seg.du.unbind(0)
    B_t = seg.B.unbind(0) if prob.variable_B else None
    floor = prob.exp_floor if seg.needs_exp_floor else None
    # 1. every chunk from a zero state
    for t in range(T):
        torch.mul(dt_t[t], prob.A_t, out=a_t[t])
        if floor is not None:
            a_t[t].clamp_(min=floor)
        a_t[t].exp_()
        torch.mul(du_t[t], B_t[t] if prob.variable_B else prob.B_const, out=beta_t[t])
        if t == 0:
            ws.h_loc.copy_(beta_t[0])
        else:
            torch.addcmul(beta_t[t], a_t[t], ws.h_loc, out=ws.h_loc)
    # 2. carry the true state across chunks; decay over a chunk = exp(A * sum(dt))
    torch.mul(seg.dt.sum(0), prob.A_t, out=ws.dec)
    ws.dec.clamp_(min=prob.exp_floor).exp_()
    h = h0
    for c in range(prob.nc):
        ws.h_in_c[c].copy_(h)
        h = torch.addcmul(ws.h_loc_c[c], ws.dec_c[c], h)
    # 3. the recurrence again from the true chunk states
    prev = ws.h_in
    for t in range(T):
        if keep_states:
            cur, cur3 = ws.H_t[t], ws.H3_t[t]
        else:
            cur, cur3 = ws.h_run, ws.h_run3
        torch.addcmul(beta_t[t], a_t[t], prev, out=cur)
        if need_y:
            _contract_C(prob, ws, seg, t, cur, cur3)
        prev = cur
    return h


def _add_skip(prob: _ScanProblem, y: torch.Tensor, seg: _Segment) -> torch.Tensor:
    """y + D u on a segment, (batch, dim, S')."""
    return y + prob.D_c * seg.u_flat if prob.D_c is not None else y


def _gate_forward(prob: _ScanProblem, y: torch.Tensor, seg: _Segment) -> torch.Tensor:
    """out = (y + D u) * silu(z) on a segment, (batch, dim, S')."""
    y = _add_skip(prob, y, seg)
    if prob.z is not None:
        y = y * F.silu(prob.z[..., seg.s0:seg.s1].to(prob.cdt))
    return y


def _forward(prob: _ScanProblem, out: torch.Tensor):
    """Fill ``out`` (batch, dim, L); return (segment start states, last state (batch, G, N, Dg))."""
    h = torch.zeros(prob.batch, prob.groups, prob.d_state, prob.dg, dtype=prob.cdt, device=prob.device)
    starts = []
    ws = _Workspace(prob, with_states=False) if prob.n_segments else None
    for k in range(prob.n_segments):
        seg = prob.segment(k)
        starts.append(h)
        h = _scan_segment(prob, ws, seg, h, keep_states=False, need_y=True)
        y = prob.from_tokens(ws.y, seg.s1 - seg.s0)
        out[..., seg.s0:seg.s1] = _gate_forward(prob, y, seg)
    return starts, h


def _backward(prob: _ScanProblem, grad_out: torch.Tensor, starts) -> Tuple:
    cdt, dev = prob.cdt, prob.device
    opts = dict(dtype=cdt, device=dev)
    du = torch.empty(prob.u.shape, **opts)
    ddelta = torch.empty(prob.delta.shape, **opts)
    dz = torch.empty(prob.z.shape, **opts) if prob.z is not None else None
    dD = torch.zeros(prob.dim, **opts) if prob.D is not None else None
    ddelta_bias = torch.zeros(prob.dim, **opts) if prob.delta_bias is not None else None
    dB = torch.empty(prob.B.shape, **opts) if prob.variable_B else None
    dC = torch.empty(prob.C.shape, **opts) if prob.variable_C else None
    if prob.n_segments == 0:
        zeros = torch.zeros(prob.dim, prob.d_state, **opts)
        return (du, ddelta, zeros, dB if dB is not None else zeros, dC if dC is not None else zeros,
                dD, dz, ddelta_bias)
    ws = _Workspace(prob, with_states=True)
    T, nc, bgn, N, Dg = prob.T, prob.nc, prob.batch * prob.groups * prob.nc, prob.d_state, prob.dg
    acc_A = torch.zeros(ws.slice_shape, **opts)  # sum over t of lambda * a * h_prev * dt
    acc_B = None if prob.variable_B else torch.zeros(ws.slice_shape, **opts)
    acc_C = None if prob.variable_C else torch.zeros(ws.slice_shape, **opts)
    w = torch.empty(ws.slice_shape, **opts)
    lam_loc = torch.empty(ws.slice_shape, **opts)
    carry = torch.empty(ws.slice_shape, **opts)
    first_w = torch.empty(ws.slice_shape, **opts)
    carry_c, first_w_c = carry.unbind(2), first_w.unbind(2)
    chan_shape = (T, prob.batch, prob.groups, nc, 1, Dg)
    ddt_s = torch.empty(chan_shape, **opts)
    du_s = torch.empty(chan_shape, **opts)
    lamB = torch.empty(chan_shape[1:], **opts)
    lamB3 = lamB.view(bgn, 1, Dg)
    ddt_t, du_st = ddt_s.unbind(0), du_s.unbind(0)
    dB_s = torch.empty(T, prob.batch, prob.groups, nc, N, 1, **opts) if prob.variable_B else None
    dC_s = torch.empty(T, prob.batch, prob.groups, nc, N, 1, **opts) if prob.variable_C else None
    a_t, lam_t, lam3_t, H_t, H3_t = ws.a_t, ws.beta_t, ws.beta3_t, ws.H_t, ws.H3_t
    g_next = torch.zeros(prob.batch, prob.groups, N, Dg, **opts)  # a * lambda at the next segment's start

    for k in reversed(range(prob.n_segments)):
        seg = prob.segment(k, with_u=True)
        s0, s1 = seg.s0, seg.s1
        _scan_segment(prob, ws, seg, starts[k], keep_states=True, need_y=prob.z is not None)
        g = grad_out[..., s0:s1].to(cdt)
        # out = (y + D u) * silu(z)
        if prob.z is not None:
            y_total = _add_skip(prob, prob.from_tokens(ws.y, s1 - s0), seg)
            z_seg = prob.z[..., s0:s1].to(cdt)
            sig = torch.sigmoid(z_seg)
            dz[..., s0:s1] = g * y_total * sig * (1 + z_seg * (1 - sig))
            dy = g * (z_seg * sig)
        else:
            dy = g
        du_direct = None
        if prob.D is not None:
            dD += (dy * seg.u_flat).sum(dim=(0, 2))
            du_direct = dy * prob.D_c
        dy_s = prob.to_tokens(dy)
        dy_t = dy_s.unbind(0)
        dy3_t = dy_s.view(T, bgn, 1, Dg).unbind(0)  # (batch*G*nc, 1, Dg) rows
        C_t = seg.C.unbind(0) if prob.variable_C else None
        B_t = seg.B.unbind(0) if prob.variable_B else None
        B3_t = seg.B.view(T, bgn, 1, N).unbind(0) if prob.variable_B else None
        dt_t, u_t = seg.dt.unbind(0), seg.u.unbind(0)
        du3_t = seg.du.view(T, bgn, 1, Dg).unbind(0)
        # local adjoint of every chunk from a zero end state; lambda is stored where beta was
        for t in reversed(range(T)):
            torch.mul(dy_t[t], C_t[t] if prob.variable_C else prob.C_const, out=lam_t[t])
            if t == T - 1:
                lam_loc.copy_(lam_t[t])
            else:
                torch.addcmul(lam_t[t], a_t[t + 1], lam_loc, out=lam_loc)
        # carry across chunks (backwards): g_c = a * lambda at the first token of chunk c+1
        torch.mul(a_t[0], lam_loc, out=first_w)
        gc = g_next
        for c in reversed(range(nc)):
            carry_c[c].copy_(gc)
            gc = torch.addcmul(first_w_c[c], ws.dec_c[c], gc)
        g_next = gc
        # true adjoint, then all gradients at position t while its slices are in cache
        lam_t[T - 1].add_(carry)
        for t in reversed(range(T)):
            lam = lam_t[t]
            if t < T - 1:
                lam.addcmul_(a_t[t + 1], lam_t[t + 1])
            h_prev = ws.h_in if t == 0 else H_t[t - 1]
            torch.mul(lam, a_t[t], out=w)
            w.mul_(h_prev)                      # lambda_t * a_t * h_{t-1}
            acc_A.addcmul_(w, dt_t[t])
            w.mul_(prob.A_t)
            torch.sum(w, dim=-2, keepdim=True, out=ddt_t[t])
            if prob.variable_B:
                torch.bmm(B3_t[t], lam3_t[t], out=lamB3)       # sum_n lambda B
                # sum_d dt u lambda, as row @ matrix^T (much faster than matrix @ column in MKL)
                torch.bmm(du3_t[t], lam3_t[t].transpose(-1, -2), out=dB_s[t].view(bgn, 1, N))
            else:
                torch.mul(lam, prob.B_const, out=w)
                torch.sum(w, dim=-2, keepdim=True, out=lamB)
                acc_B.addcmul_(lam, seg.du[t])
            ddt_t[t].addcmul_(u_t[t], lamB)
            torch.mul(dt_t[t], lamB, out=du_st[t])
            if prob.variable_C:
                torch.bmm(dy3_t[t], H3_t[t].transpose(-1, -2), out=dC_s[t].view(bgn, 1, N))  # sum_d dy h
            else:
                acc_C.addcmul_(H_t[t], dy_t[t])
        valid = s1 - s0
        du_seg = prob.from_tokens(du_s, valid)
        du[..., s0:s1] = du_seg if du_direct is None else du_seg + du_direct
        ddt = prob.from_tokens(ddt_s, valid)
        if prob.delta_softplus:
            ddt = torch.where(seg.pre > SOFTPLUS_THRESHOLD, ddt, ddt * torch.sigmoid(seg.pre))
        ddelta[..., s0:s1] = ddt
        if ddelta_bias is not None:
            ddelta_bias += ddt.sum(dim=(0, 2))
        if prob.variable_B:
            dB[..., s0:s1] = prob.state_from_tokens(dB_s, valid)
        if prob.variable_C:
            dC[..., s0:s1] = prob.state_from_tokens(dC_s, valid)

    dA = prob._from_per_state(acc_A.sum(dim=(0, 2)))
    if not prob.variable_B:
        dB = prob._from_per_state(acc_B.sum(dim=(0, 2)))
    if not prob.variable_C:
        dC = prob._from_per_state(acc_C.sum(dim=(0, 2)))
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias


class SelectiveScanChunked(torch.autograd.Function):
    """autograd Function over the chunked scan; see the module docstring."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_len, chunks_per_segment):
        with torch.autocast(device_type=u.device.type, enabled=False), _scan_threads(u.device):
            prob = _ScanProblem(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_len,
                                chunks_per_segment)
            out = torch.empty(u.shape, dtype=u.dtype, device=u.device)
            starts, h = _forward(prob, out)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, *starts)
        ctx.settings = (delta_softplus, chunk_len, chunks_per_segment)
        last_state = h.transpose(-1, -2).reshape(prob.batch, prob.dim, prob.d_state)
        ctx.mark_non_differentiable(last_state)
        return out, last_state

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_last_state):  # the last state's gradient is not propagated
        u, delta, A, B, C, D, z, delta_bias, *starts = ctx.saved_tensors
        delta_softplus, chunk_len, chunks_per_segment = ctx.settings
        with torch.autocast(device_type=u.device.type, enabled=False), _scan_threads(u.device):
            prob = _ScanProblem(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_len,
                                chunks_per_segment)
            grads = _backward(prob, grad_out, starts)
        inputs = (u, delta, A, B, C, D, z, delta_bias)
        cast = tuple(None if (g is None or not need) else g.to(x.dtype)
                     for g, x, need in zip(grads, inputs, ctx.needs_input_grad))
        return cast + (None, None, None)


def flip_sequence(t):
    """``t`` reversed along its last (token) axis; None and constant (dim, N) B/C pass through."""
    if t is None or t.dim() == 2:
        return t
    return t.flip(-1)


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, chunk_len: Optional[int] = None,
                           chunks_per_segment: Optional[int] = None, reverse: bool = False):
    """Chunked PyTorch selective scan (differentiable, memory bounded); arguments as ``selective_scan_fn``.

    ``chunk_len`` (tokens per chunk) and ``chunks_per_segment`` tune speed/memory (defaults per device).
    ``reverse`` scans the tokens last-to-first (here by flipping the inputs and the output; the CUDA kernels
    index the sequence backwards instead). Returns out (batch, dim, L) in u's dtype, and with
    ``return_last_state`` also the last state (batch, dim, N) in the compute dtype (float32, or float64 for
    float64 inputs).
    """
    if reverse:
        u, delta, B, C, z = (flip_sequence(t) for t in (u, delta, B, C, z))
    out, last_state = SelectiveScanChunked.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                                 chunk_len, chunks_per_segment)
    if reverse:
        out = out.flip(-1)
    return (out, last_state) if return_last_state else out
