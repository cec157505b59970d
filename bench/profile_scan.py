"""Drives the scan kernels at the stage-0 shape (B=2, D=96, L=262144, N=16; fp32 then fp16, forward +
backward) for a profiler, or, with ``--kernels``, prints each kernel's CUDA time from torch.profiler:

    python bench/profile_scan.py --kernels            # per-kernel table (median of 5 steps)
    python bench/profile_scan.py --kernels --dstate 64
    ncu --clock-control none -k regex:"fwd_local|fwd_out|bwd_local|bwd_main" --launch-count 8 \\
        --section SpeedOfLight --section WarpStateStats python bench/profile_scan.py
"""
import argparse
import collections
import statistics

import torch

from mamba_ssm.ops import selective_scan_fn


def step_fn(dtype, n=16):
    b, d, length = 2, 96, 262144
    mk = lambda *s: torch.randn(*s, device="cuda").to(dtype).requires_grad_()  # noqa: E731
    u, delta, z = mk(b, d, length), mk(b, d, length), mk(b, d, length)
    Bm, Cm = mk(b, 1, n, length), mk(b, 1, n, length)
    A = (-torch.arange(1, n + 1, device="cuda").float().repeat(d, 1)).requires_grad_()
    D = torch.randn(d, device="cuda", requires_grad=True)
    bias = torch.full((d,), -3.0, device="cuda", requires_grad=True)
    dout = torch.randn(b, d, length, device="cuda").to(dtype)

    def step():
        for t in (u, delta, z, Bm, Cm, A, D, bias):  # gradients assigned, not accumulated (no extra adds)
            t.grad = None
        out = selective_scan_fn(u, delta, A, Bm, Cm, D, z, bias, delta_softplus=True)
        out.backward(dout)
    return step


def kernel_table(dtype, steps=5, n=16):
    step = step_fn(dtype, n)
    step()
    torch.cuda.synchronize()
    times = collections.defaultdict(list)
    for _ in range(steps):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        per = collections.defaultdict(float)
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                # template arguments kept (the two forward walks are one kernel template), namespaces dropped
                name = ev.name.split("(")[0].replace("void ", "").replace("selective_scan::detail::", "")
                per[name] += ev.device_time / 1000
        for k, v in per.items():
            times[k].append(v)
    print(f"\n{str(dtype)}: CUDA time per forward+backward (ms, median of {steps}{'' if n == 16 else f', N={n}'})")
    for k, v in sorted(times.items(), key=lambda kv: -statistics.median(kv[1])):
        print(f"  {statistics.median(v):8.3f}  {k[:90]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", action="store_true", help="print per-kernel CUDA times (torch.profiler)")
    ap.add_argument("--dstate", type=int, default=16, help="d_state N (16: the model's; 32 and 64 run the "
                    "state-split kernels)")
    args = ap.parse_args()
    for dtype in (torch.float32, torch.float16):
        if args.kernels:
            kernel_table(dtype, n=args.dstate)
        else:
            step_fn(dtype, args.dstate)()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
