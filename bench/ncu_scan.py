"""Driver for Nsight Compute: one forward+backward of the selective scan at the benchmark shape
(B=2, D=96, L=262,144, N=16, z, D, bias, softplus) per dtype given, nothing else. Run under ncu, e.g.

    ncu --clock-control none --kernel-name regex:"lane|bwd_main" --section SpeedOfLight \\
        --section WarpStateStats python bench/ncu_scan.py float32 float16
"""
import sys

import torch

from bench_kernels import scan_inputs


def main():
    from mamba_ssm.ops import selective_scan_fn
    for name in sys.argv[1:] or ["float32"]:
        dtype = getattr(torch, name)
        u, delta, A, Bm, Cm, D, z, bias = scan_inputs(dtype)
        leaves = [t.detach().requires_grad_() for t in (u, delta, A, Bm, Cm, D, z, bias)]
        out = selective_scan_fn(*leaves[:7], delta_bias=leaves[7], delta_softplus=True)
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
