"""Drives the scan kernels at the stage-0 shape (fp32 then fp16, forward + backward) for a profiler:

    ncu --clock-control none -k regex:"fwd_local|fwd_out|bwd_local|bwd_main" --launch-count 8 \
        --section SpeedOfLight --section WarpStateStats python bench/profile_scan.py
"""
import torch

from mamba_ssm.ops import selective_scan_fn


def main():
    for dtype in (torch.float32, torch.float16):
        b, d, length, n = 2, 96, 262144, 16
        mk = lambda *s: torch.randn(*s, device="cuda").to(dtype).requires_grad_()  # noqa: E731
        u, delta, z = mk(b, d, length), mk(b, d, length), mk(b, d, length)
        Bm, Cm = mk(b, 1, n, length), mk(b, 1, n, length)
        A = (-torch.arange(1, n + 1, device="cuda").float().repeat(d, 1)).requires_grad_()
        D = torch.randn(d, device="cuda", requires_grad=True)
        bias = torch.full((d,), -3.0, device="cuda", requires_grad=True)
        out = selective_scan_fn(u, delta, A, Bm, Cm, D, z, bias, delta_softplus=True)
        out.backward(torch.randn_like(out))
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
