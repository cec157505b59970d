"""Depthwise causal 1-D convolution with a pure-PyTorch implementation and an optional CUDA kernel.

``causal_conv1d_fn(x, weight, bias=None, activation=None)``: x (B, D, L), weight (D, W), W in 2..4.
Importing never fails because the kernel is missing; :func:`backend_name` says which path a device uses.
"""
from causal_conv1d.causal_conv1d_interface import backend_name, causal_conv1d_fn, causal_conv1d_ref

__all__ = ["causal_conv1d_fn", "causal_conv1d_ref", "backend_name"]
__version__ = "0.3.0"
