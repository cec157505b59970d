"""CPU benchmark of the PyTorch ops path: the selective scan at SegMamba's stage-0 shape and the causal conv.

Default shape: batch 1, dim 96 (d_inner of stage 0), L = 64^3 = 262,144 tokens (a 128^3 patch after the
stem), N = 16 states, input-dependent B/C with one group, z gate, D, delta_bias and softplus as in the
Mamba block. Each case runs in a fresh subprocess so that its peak RSS is its own.

    python bench/bench_cpu_ops.py                 # forward and forward+backward at the stage-0 shape
    python bench/bench_cpu_ops.py --length 32768  # a smaller sequence
    python bench/bench_cpu_ops.py --case scan_fwd --repeats 3
    python bench/bench_cpu_ops.py --case model_fwd  # SegMamba(4 -> 4) forward on a 1x4x64^3 input

Goal on a 2-core CPU: stage-0 scan forward <= 3 s and a 1x4x64^3 SegMamba forward <= 20 s, peak memory <= 6 GiB.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CASES = ("scan_fwd", "scan_fwd_bwd", "conv_fwd", "model_fwd")


def _make_inputs(args, requires_grad: bool):
    import torch
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    b, d, length, n = args.batch, args.dim, args.length, args.d_state
    u = torch.randn(b, d, length, generator=g)
    # delta as the block produces it: small projections, softplus(bias) log-uniform in [1e-3, 0.1]
    dt_init = torch.exp(torch.rand(d, generator=g) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                        + torch.log(torch.tensor(1e-3)))
    delta_bias = dt_init + torch.log(-torch.expm1(-dt_init))
    delta = 0.5 * torch.randn(b, d, length, generator=g)
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)
    B = torch.randn(b, 1, n, length, generator=g)
    C = torch.randn(b, 1, n, length, generator=g)
    D = torch.ones(d)
    z = torch.randn(b, d, length, generator=g)
    tensors = [u, delta, A, B, C, D, z, delta_bias]
    if requires_grad:
        for t in tensors:
            t.requires_grad_(True)
    return tensors


def _run_case(args) -> dict:
    import torch
    from mamba_ssm.ops.selective_scan_chunked import selective_scan_chunked
    from causal_conv1d import causal_conv1d_fn
    if args.threads:
        torch.set_num_threads(args.threads)
    times, cpu_times = [], []
    if args.case == "model_fwd":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from model_segmamba import SegMamba
        torch.manual_seed(0)
        model = SegMamba(in_chans=4, out_chans=4).eval()
        x = torch.randn(1, 4, 64, 64, 64)
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.no_grad():
                model(x)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    elif args.case == "conv_fwd":
        x = torch.randn(args.batch, args.dim, args.length)
        w = torch.randn(args.dim, 4)
        bias = torch.randn(args.dim)
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            causal_conv1d_fn(x, w, bias, "silu")
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    else:
        backward = args.case == "scan_fwd_bwd"
        u, delta, A, B, C, D, z, delta_bias = _make_inputs(args, requires_grad=backward)
        kwargs = dict(chunk_len=args.chunk_len, chunks_per_segment=args.chunks_per_segment)
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            if backward:
                out = selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, True, **kwargs)
                out.backward(torch.ones_like(out))
            else:
                with torch.no_grad():
                    selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, True, **kwargs)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"case": args.case, "best_s": min(times), "times_s": [round(t, 3) for t in times],
            "cpu_s": [round(t, 3) for t in cpu_times], "load_avg_1min": os.getloadavg()[0],
            "peak_rss_gib": peak_kib / 2 ** 20, "torch_threads": torch.get_num_threads(),
            "scan_threads_env": os.environ.get("MAMBA_SSM_CPU_SCAN_THREADS", "1 (default)")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=CASES + ("all",), default="all")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--length", type=int, default=64 ** 3)
    p.add_argument("--d-state", dest="d_state", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per case (best is reported)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    p.add_argument("--chunk-len", dest="chunk_len", type=int, default=None)
    p.add_argument("--chunks-per-segment", dest="chunks_per_segment", type=int, default=None)
    args = p.parse_args()
    if args.case != "all":
        print(json.dumps(_run_case(args)))
        return
    import platform
    print(f"selective scan B={args.batch} D={args.dim} L={args.length} N={args.d_state}; "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    for case in CASES:
        cmd = [sys.executable, os.path.abspath(__file__), "--case", case]
        for flag in ("batch", "dim", "length", "repeats", "threads"):
            cmd += [f"--{flag}", str(getattr(args, flag))]
        cmd += ["--d-state", str(args.d_state)]
        if args.chunk_len:
            cmd += ["--chunk-len", str(args.chunk_len)]
        if args.chunks_per_segment:
            cmd += ["--chunks-per-segment", str(args.chunks_per_segment)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"{case}: FAILED\n{res.stderr}")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{case:>13}: best {r['best_s']:.2f} s wall (runs {r['times_s']}; CPU time {r['cpu_s']}), "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB, load average {r['load_avg_1min']:.1f}")


if __name__ == "__main__":
    main()
