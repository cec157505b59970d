"""Seam between the public API and the compiled CUDA kernel (``causal_conv1d._causal_conv1d_cuda``).

The public function :func:`causal_conv1d.causal_conv1d_fn` asks :func:`available` and, for CUDA tensors,
calls :func:`causal_conv1d_cuda_fn`. The kernel's autograd wrapper lives here; until it is written the
function raises ``NotImplementedError`` (and :func:`available` is False unless the extension was built).
"""
from __future__ import annotations

from typing import Optional

import torch

_AVAILABLE: Optional[bool] = None


def available() -> bool:
    """True when the compiled extension ``causal_conv1d._causal_conv1d_cuda`` can be imported."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            from causal_conv1d import _causal_conv1d_cuda  # noqa: F401
            _AVAILABLE = True
        except ImportError:
            _AVAILABLE = False
    return _AVAILABLE


def causal_conv1d_cuda_fn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                          activation: Optional[str] = None) -> torch.Tensor:
    """Causal depthwise conv1d on CUDA tensors with the compiled kernel. ``x`` (B, D, L), ``weight`` (D, W)."""
    raise NotImplementedError("the causal_conv1d CUDA kernel wrapper is not implemented yet")
