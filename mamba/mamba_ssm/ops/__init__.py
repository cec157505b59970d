"""Functional ops: the selective scan (CUDA kernel or chunked PyTorch), its float64 test oracle, the inner
function of one Mamba scan direction, and the tri-orientated scan orders."""
from mamba_ssm.ops.selective_scan_interface import (active_backend, check_scan_arguments,
                                                    mamba_inner_fn_no_out_proj, selective_scan_fn)
from mamba_ssm.ops.selective_scan_ref import selective_scan_ref_loop
from mamba_ssm.ops.selective_scan_chunked import selective_scan_chunked

__all__ = ["selective_scan_fn", "mamba_inner_fn_no_out_proj", "active_backend", "check_scan_arguments",
           "selective_scan_ref_loop", "selective_scan_chunked"]
