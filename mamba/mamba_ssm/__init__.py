"""Selective-scan ops and the tri-orientated Mamba block used by SegMamba.

Every op has a pure-PyTorch implementation; CUDA tensors use the compiled kernels when they are built.
Importing never fails because a kernel is missing. ``active_backend(device)`` tells which path runs.
"""
from mamba_ssm.modules.mamba_simple import Mamba
from mamba_ssm.ops import active_backend, mamba_inner_fn_no_out_proj, selective_scan_fn

__all__ = ["Mamba", "selective_scan_fn", "mamba_inner_fn_no_out_proj", "active_backend"]
__version__ = "0.3.0"
