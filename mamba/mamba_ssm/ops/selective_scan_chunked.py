"""Chunked selective scan in pure PyTorch, with a hand-written, memory-bounded backward pass.

Same semantics as :func:`mamba_ssm.ops.selective_scan_ref.selective_scan_ref_loop` (see there), computed
in float32 whatever the input dtype (float64 inputs are computed in float64).

How it runs. The sequence is processed in *segments* of ``segment_len`` tokens, so the (batch, dim, N, L)
state tensor is never materialised for the whole sequence. A segment is cut into ``nc`` *chunks* of
``chunk_len`` tokens laid out as ``(T, batch, G, nc, dim/G, N)`` (token-in-chunk first). The recurrence
``h_t = a_t * h_{t-1} + beta_t`` is associative, so

1. every chunk is scanned from a zero state at once: a Python loop over the ``T`` positions, each step one
   vectorised multiply-add over all chunks of the segment (only products of decays ``a <= 1`` and sums:
   as stable as the sequential loop, for any ``delta * |A|``);
2. a short loop over the chunks carries the true state from chunk to chunk
   (``h_in[c+1] = prod(a over chunk c) * h_in[c] + h_local_end[c]``);
3. a fix-up adds ``(prod_{s <= t} a_s) * h_in`` to every local state; the cumulative decay is
   ``exp(A * cumsum(delta))`` within the chunk, a number in [0, 1].

Backward recomputes each segment from its saved starting state (the only per-segment data kept besides
the inputs) and runs the adjoint ``lambda_t = dy_t * C_t + a_{t+1} * lambda_{t+1}`` through the same
chunked scheme in reverse order. See ``shared/spec/kernels.md`` for the gradient formulas.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

# Tokens scanned one step at a time inside a chunk, and tokens per segment (bounds the working memory:
# a few buffers of segment_len * dim * N floats). Tuned on a 2-core CPU with bench/bench_cpu_ops.py.
DEFAULT_CHUNK_LEN = 64
DEFAULT_SEGMENT_LEN = 4096
# softplus is the identity above this (as torch.nn.functional.softplus and the CUDA kernels)
SOFTPLUS_THRESHOLD = 20.0


def compute_dtype_for(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 when any given tensor is float64, else float32 (fp16/bf16 are upcast)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


class _Layout:
    """Shapes of one segment in the chunked layout ``(T, batch, G, nc, Dg[, N])``."""

    def __init__(self, batch: int, dim: int, groups: int, d_state: int, chunk_len: int, seg_len: int):
        self.batch, self.dim, self.groups, self.d_state = batch, dim, groups, d_state
        self.dg = dim // groups
        self.seg_len = seg_len
        self.chunk_len = min(chunk_len, seg_len)
        self.n_chunks = -(-seg_len // self.chunk_len)
        self.padded_len = self.n_chunks * self.chunk_len

    @property
    def chan_shape(self) -> Tuple[int, ...]:
        return (self.chunk_len, self.batch, self.groups, self.n_chunks, self.dg)

    @property
    def state_shape(self) -> Tuple[int, ...]:
        return self.chan_shape + (self.d_state,)

    def channels_in(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, dim, S) -> contiguous (T, batch, G, nc, Dg), zero padded at the end."""
        x = F.pad(x, (0, self.padded_len - self.seg_len))
        x = x.reshape(self.batch, self.groups, self.dg, self.n_chunks, self.chunk_len)
        return x.permute(4, 0, 1, 3, 2).contiguous()

    def channels_out(self, x: torch.Tensor) -> torch.Tensor:
        """(T, batch, G, nc, Dg) -> (batch, dim, S)."""
        x = x.permute(1, 2, 4, 3, 0).reshape(self.batch, self.dim, self.padded_len)
        return x[..., : self.seg_len]

    def tokens_in(self, m: torch.Tensor) -> torch.Tensor:
        """Input-dependent B or C, (batch, G, N, S) -> contiguous (T, batch, G, nc, N)."""
        m = F.pad(m, (0, self.padded_len - self.seg_len))
        m = m.reshape(self.batch, self.groups, self.d_state, self.n_chunks, self.chunk_len)
        return m.permute(4, 0, 1, 3, 2).contiguous()

    def tokens_out(self, m: torch.Tensor) -> torch.Tensor:
        """(T, batch, G, nc, N) -> (batch, G, N, S)."""
        m = m.permute(1, 2, 4, 3, 0).reshape(self.batch, self.groups, self.d_state, self.padded_len)
        return m[..., : self.seg_len]


class _ScanProblem:
    """The inputs of one scan call plus derived sizes; produces per-segment tensors in the chunked layout."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_len, segment_len):
        self.u, self.delta, self.A, self.B, self.C = u, delta, A, B, C
        self.D, self.z, self.delta_bias, self.delta_softplus = D, z, delta_bias, delta_softplus
        self.cdt = compute_dtype_for(u, delta, A, B, C, D, z, delta_bias)
        self.batch, self.dim, self.length = u.shape
        self.d_state = A.shape[1]
        self.variable_B, self.variable_C = B.dim() == 4, C.dim() == 4
        self.groups = B.shape[1] if self.variable_B else (C.shape[1] if self.variable_C else 1)
        self.dg = self.dim // self.groups
        self.chunk_len = max(1, int(chunk_len))
        self.segment_len = max(self.chunk_len, int(segment_len) // self.chunk_len * self.chunk_len)
        self.A_c = A.to(self.cdt).reshape(self.groups, 1, self.dg, self.d_state)  # broadcasts on (.., G, nc, Dg, N)

    def segments(self) -> List[Tuple[int, int]]:
        return [(s, min(s + self.segment_len, self.length)) for s in range(0, self.length, self.segment_len)]

    def layout(self, s0: int, s1: int) -> _Layout:
        return _Layout(self.batch, self.dim, self.groups, self.d_state, self.chunk_len, s1 - s0)

    def delta_pre_activation(self, s0: int, s1: int) -> torch.Tensor:
        """delta + delta_bias on a segment, (batch, dim, S), compute dtype."""
        d = self.delta[..., s0:s1].to(self.cdt)
        if self.delta_bias is not None:
            d = d + self.delta_bias.to(self.cdt)[:, None]
        return d

    def dt(self, pre: torch.Tensor) -> torch.Tensor:
        return F.softplus(pre, threshold=SOFTPLUS_THRESHOLD) if self.delta_softplus else pre

    def state_matrix(self, M: torch.Tensor, variable: bool, lay: _Layout, s0: int, s1: int) -> torch.Tensor:
        """B or C broadcastable against (T, batch, G, nc, Dg, N): (T, batch, G, nc, 1, N) when input
        dependent, (G, 1, Dg, N) when constant."""
        if variable:
            return lay.tokens_in(M[..., s0:s1].to(self.cdt)).unsqueeze(-2)
        return M.to(self.cdt).reshape(self.groups, 1, self.dg, self.d_state)


def _local_scan_and_fixup(dt_l, beta_a_buffers, A_c, h0):
    """Scan every chunk from zero, carry states across chunks, fix up.

    dt_l: (T, batch, G, nc, Dg); beta_a_buffers: (H, a) with H holding beta on entry and a holding
    exp(dt * A), both (T, batch, G, nc, Dg, N); h0: (batch, G, Dg, N) state entering the segment.
    On return H holds the true states h_t. Returns (h_in (batch, G, nc, Dg, N) state entering each chunk,
    chunk_decay (batch, G, nc, Dg, N) product of a over each chunk, h_end (batch, G, Dg, N)).
    """
    H, a = beta_a_buffers
    T = H.shape[0]
    for t in range(1, T):
        H[t].addcmul_(a[t], H[t - 1])
    # cumulative decay inside each chunk, exp(A * cumsum(dt)) in [0, 1]
    P = torch.mul(torch.cumsum(dt_l, dim=0).unsqueeze(-1), A_c)
    P.exp_()
    chunk_decay = P[T - 1].clone()
    local_end = H[T - 1]
    n_chunks = H.shape[3]
    h_in = torch.empty_like(chunk_decay)
    h = h0
    for c in range(n_chunks):
        h_in[:, :, c] = h
        h = torch.addcmul(local_end[:, :, c], chunk_decay[:, :, c], h)
    H.addcmul_(P, h_in.unsqueeze(0))
    return h_in, chunk_decay, h


def _contract_C(H: torch.Tensor, C_l: torch.Tensor, variable_C: bool) -> torch.Tensor:
    """y = sum_n C[n] * H[.., n]: (T, batch, G, nc, Dg, N) -> (T, batch, G, nc, Dg)."""
    if variable_C:
        # C_l: (T, batch, G, nc, 1, N) -> matrix-vector products per token
        return torch.matmul(H, C_l.transpose(-1, -2)).squeeze(-1)
    return (H * C_l).sum(-1)


def _segment_forward(prob: _ScanProblem, s0: int, s1: int, h0: torch.Tensor):
    """Forward of one segment. Returns y (batch, dim, S) without the D and z terms, h_end, and the
    intermediate tensors needed by the backward pass."""
    lay = prob.layout(s0, s1)
    pre = prob.delta_pre_activation(s0, s1)
    dt_l = lay.channels_in(prob.dt(pre))
    u_l = lay.channels_in(prob.u[..., s0:s1].to(prob.cdt))
    B_l = prob.state_matrix(prob.B, prob.variable_B, lay, s0, s1)
    C_l = prob.state_matrix(prob.C, prob.variable_C, lay, s0, s1)
    a = torch.empty(lay.state_shape, dtype=prob.cdt, device=prob.u.device)
    torch.mul(dt_l.unsqueeze(-1), prob.A_c, out=a)
    a.exp_()
    H = torch.empty_like(a)
    torch.mul((dt_l * u_l).unsqueeze(-1), B_l, out=H)
    h_in, chunk_decay, h_end = _local_scan_and_fixup(dt_l, (H, a), prob.A_c, h0)
    y_l = _contract_C(H, C_l, prob.variable_C)
    saved = dict(lay=lay, pre=pre, dt_l=dt_l, u_l=u_l, B_l=B_l, C_l=C_l, a=a, H=H, h_in=h_in,
                 chunk_decay=chunk_decay)
    return lay.channels_out(y_l), h_end, saved


def _gate(prob: _ScanProblem, y: torch.Tensor, s0: int, s1: int) -> torch.Tensor:
    """out = (y + D * u) * silu(z) on a segment (compute dtype)."""
    if prob.D is not None:
        y = y + prob.D.to(prob.cdt)[:, None] * prob.u[..., s0:s1].to(prob.cdt)
    if prob.z is not None:
        y = y * F.silu(prob.z[..., s0:s1].to(prob.cdt))
    return y


class SelectiveScanChunked(torch.autograd.Function):
    """autograd Function over the chunked scan; see the module docstring."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                chunk_len, segment_len):
        with torch.autocast(device_type=u.device.type, enabled=False):
            prob = _ScanProblem(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_len, segment_len)
            out = torch.empty(u.shape, dtype=u.dtype, device=u.device)
            h = torch.zeros(prob.batch, prob.groups, prob.dg, prob.d_state, dtype=prob.cdt, device=u.device)
            starts = []
            for s0, s1 in prob.segments():
                starts.append(h)
                y, h, _ = _segment_forward(prob, s0, s1, h)
                out[..., s0:s1] = _gate(prob, y, s0, s1)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, *starts)
        ctx.n_starts = len(starts)
        ctx.settings = (delta_softplus, chunk_len, segment_len)
        ctx.mark_non_differentiable(h)
        last_state = h.reshape(prob.batch, prob.dim, prob.d_state)
        return out, last_state

    @staticmethod
    def backward(ctx, grad_out, grad_last_state):  # grad of the last state is not propagated
        u, delta, A, B, C, D, z, delta_bias, *starts = ctx.saved_tensors
        delta_softplus, chunk_len, segment_len = ctx.settings
        with torch.autocast(device_type=u.device.type, enabled=False):
            prob = _ScanProblem(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_len, segment_len)
            grads = _backward(prob, grad_out, starts, ctx.needs_input_grad)
        return grads + (None, None, None, None)


def _backward(prob: _ScanProblem, grad_out: torch.Tensor, starts, needs) -> Tuple:
    cdt, dev = prob.cdt, prob.u.device
    du = torch.empty(prob.u.shape, dtype=cdt, device=dev)
    ddelta = torch.empty(prob.delta.shape, dtype=cdt, device=dev)
    dz = torch.empty(prob.z.shape, dtype=cdt, device=dev) if prob.z is not None else None
    dA = torch.zeros(prob.groups, 1, prob.dg, prob.d_state, dtype=cdt, device=dev)
    dB = torch.zeros(prob.B.shape, dtype=cdt, device=dev)
    dC = torch.zeros(prob.C.shape, dtype=cdt, device=dev)
    dD = torch.zeros(prob.dim, dtype=cdt, device=dev) if prob.D is not None else None
    ddelta_bias = torch.zeros(prob.dim, dtype=cdt, device=dev) if prob.delta_bias is not None else None
    # adjoint carried from the following segment: a_{t0} * lambda_{t0} at its first token
    g_next = torch.zeros(prob.batch, prob.groups, prob.dg, prob.d_state, dtype=cdt, device=dev)
    for (s0, s1), h0 in reversed(list(zip(prob.segments(), starts))):
        y, _, sv = _segment_forward(prob, s0, s1, h0)
        lay: _Layout = sv["lay"]
        g = grad_out[..., s0:s1].to(cdt)
        u_seg = prob.u[..., s0:s1].to(cdt)
        # out = (y + D u) * silu(z)
        if prob.D is not None:
            y_total = y + prob.D.to(cdt)[:, None] * u_seg
        else:
            y_total = y
        if prob.z is not None:
            z_seg = prob.z[..., s0:s1].to(cdt)
            sig = torch.sigmoid(z_seg)
            dz[..., s0:s1] = g * y_total * sig * (1 + z_seg * (1 - sig))
            dy = g * (z_seg * sig)
        else:
            dy = g
        du_seg = torch.zeros_like(u_seg)
        if prob.D is not None:
            dD += (dy * u_seg).sum(dim=(0, 2))
            du_seg += dy * prob.D.to(cdt)[:, None]
        dy_l = lay.channels_in(dy)
        a, H, h_in = sv["a"], sv["H"], sv["h_in"]
        dt_l, u_l, B_l, C_l = sv["dt_l"], sv["u_l"], sv["B_l"], sv["C_l"]
        T = lay.chunk_len
        # local adjoint of every chunk from a zero end state
        lam = torch.empty_like(a)
        torch.mul(dy_l.unsqueeze(-1), C_l, out=lam)
        for t in range(T - 2, -1, -1):
            lam[t].addcmul_(a[t + 1], lam[t + 1])
        # carry across chunks (backwards); g_c = a_{first of chunk c+1} * lambda_{first of chunk c+1}
        carry = torch.empty_like(h_in)
        gc = g_next
        first_weighted = a[0] * lam[0]
        for c in range(lay.n_chunks - 1, -1, -1):
            carry[:, :, c] = gc
            gc = torch.addcmul(first_weighted[:, :, c], sv["chunk_decay"][:, :, c], gc)
        g_next = gc
        # decay after t inside the chunk: exp(A * (sum of dt over tokens t+1..T-1)) in [0, 1]
        dt_after = torch.flip(torch.cumsum(torch.flip(dt_l, [0]), dim=0), [0]) - dt_l
        Q = torch.mul(dt_after.unsqueeze(-1), prob.A_c)
        Q.exp_()
        lam.addcmul_(Q, carry.unsqueeze(0))
        del Q
        # W_t = lambda_t * a_t * h_{t-1}: gradient of the decay term
        W = torch.empty_like(a)
        W[0] = h_in
        W[1:] = H[:-1]
        W.mul_(a).mul_(lam)
        ddt_l = (W * prob.A_c).sum(-1)
        W.mul_(dt_l.unsqueeze(-1))
        dA += W.sum(dim=(0, 1, 3)).unsqueeze(1)
        del W
        dtu_l = dt_l * u_l
        if prob.variable_B:
            lamB = torch.matmul(lam, B_l.transpose(-1, -2)).squeeze(-1)
            dB_l = torch.matmul(dtu_l.unsqueeze(-2), lam).squeeze(-2)
            dB[..., s0:s1] = lay.tokens_out(dB_l)
        else:
            lamB = (lam * B_l).sum(-1)
            dB += (lam * dtu_l.unsqueeze(-1)).sum(dim=(0, 1, 3)).reshape(prob.dim, prob.d_state)
        ddt_l += u_l * lamB
        du_l = dt_l * lamB
        if prob.variable_C:
            dC_l = torch.matmul(dy_l.unsqueeze(-2), H).squeeze(-2)
            dC[..., s0:s1] = lay.tokens_out(dC_l)
        else:
            dC += (H * dy_l.unsqueeze(-1)).sum(dim=(0, 1, 3)).reshape(prob.dim, prob.d_state)
        du[..., s0:s1] = du_seg + lay.channels_out(du_l)
        ddt = lay.channels_out(ddt_l)
        if prob.delta_softplus:
            pre = sv["pre"]
            ddt = torch.where(pre > SOFTPLUS_THRESHOLD, ddt, ddt * torch.sigmoid(pre))
        ddelta[..., s0:s1] = ddt
        if ddelta_bias is not None:
            ddelta_bias += ddt.sum(dim=(0, 2))

    def cast(grad, like):
        return None if grad is None or like is None else grad.to(like.dtype)

    dA = dA.reshape(prob.dim, prob.d_state)
    return (cast(du, prob.u), cast(ddelta, prob.delta), cast(dA, prob.A), cast(dB, prob.B),
            cast(dC, prob.C), cast(dD, prob.D), cast(dz, prob.z), cast(ddelta_bias, prob.delta_bias))


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, chunk_len: int = DEFAULT_CHUNK_LEN,
                           segment_len: int = DEFAULT_SEGMENT_LEN):
    """Chunked PyTorch selective scan (differentiable, memory bounded); arguments as ``selective_scan_fn``.

    Returns out (batch, dim, L) in u's dtype, and with ``return_last_state`` also the last state
    (batch, dim, N) in the compute dtype (float32, or float64 for float64 inputs).
    """
    out, last_state = SelectiveScanChunked.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                                 bool(return_last_state), chunk_len, segment_len)
    return (out, last_state) if return_last_state else out
