"""Seam between the public scan API and the compiled CUDA kernels (``mamba_ssm._selective_scan_cuda``).

:func:`mamba_ssm.ops.selective_scan_fn` asks :func:`available` and, for CUDA tensors, calls
:func:`selective_scan_cuda_fn` (same signature as ``selective_scan_fn``). The kernels' autograd wrapper
lives here; until it is written the function raises ``NotImplementedError``.
"""
from __future__ import annotations

from typing import Optional

_AVAILABLE: Optional[bool] = None


def available() -> bool:
    """True when the compiled extension ``mamba_ssm._selective_scan_cuda`` can be imported."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            from mamba_ssm import _selective_scan_cuda  # noqa: F401
            _AVAILABLE = True
        except ImportError:
            _AVAILABLE = False
    return _AVAILABLE


def selective_scan_cuda_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False):
    """Selective scan on CUDA tensors with the compiled kernels (arguments as ``selective_scan_fn``)."""
    raise NotImplementedError("the selective-scan CUDA kernel wrapper is not implemented yet")
