"""The selective-scan test oracle: a plain sequential loop over time, differentiable by autograd.

Semantics (per batch b, channel d, state n, time t; h_{-1} = 0):

* ``dt = delta + delta_bias``; ``dt = softplus(dt)`` when ``delta_softplus`` (identity above 20)
* ``h_t = exp(dt_t * A[d, n]) * h_{t-1} + dt_t * B_t[n] * u_t``
* ``y_t = sum_n C_t[n] * h_t[n] + D[d] * u_t``;  ``out_t = y_t * silu(z_t)`` when z is given

Deliberately simple (one step at a time) so that it can serve as ground truth; use it in float64.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F


def selective_scan_ref_loop(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                            C: torch.Tensor, D: Optional[torch.Tensor] = None,
                            z: Optional[torch.Tensor] = None, delta_bias: Optional[torch.Tensor] = None,
                            delta_softplus: bool = False, return_last_state: bool = False,
                            compute_dtype: Optional[torch.dtype] = None
                            ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Sequential selective scan.

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (dim, N) constant or (batch, G, N, L) input dependent
    with G groups of dim // G consecutive channels; D, delta_bias: (dim,).
    Computes in ``compute_dtype`` (default: float64 if u is float64, else float32); returns ``out``
    (batch, dim, L) in u's dtype, and the last state (batch, dim, N) in the compute dtype if asked.
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    batch, dim, length = u.shape
    cd = compute_dtype
    u_c, dt, A_c = u.to(cd), delta.to(cd), A.to(cd)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cd)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)  # log1p(exp(x)), identity for x > 20, as the kernels do

    def per_channel(M: torch.Tensor, t: int) -> torch.Tensor:
        """Value of B or C at time t as (batch, dim, N)."""
        if M.dim() == 2:
            return M.to(cd).unsqueeze(0).expand(batch, dim, M.shape[1])
        groups = M.shape[1]
        return M[:, :, :, t].to(cd).repeat_interleave(dim // groups, dim=1)

    h = u_c.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, :, t, None] * A_c)
        h = decay * h + (dt[:, :, t] * u_c[:, :, t])[:, :, None] * per_channel(B, t)
        ys.append((h * per_channel(C, t)).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u_c.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + D.to(cd)[:, None] * u_c
    if z is not None:
        y = y * F.silu(z.to(cd))
    out = y.to(u.dtype)
    return (out, h) if return_last_state else out
