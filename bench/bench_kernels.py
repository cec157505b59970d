"""Benchmark of the CUDA kernels at SegMamba's largest scan (stage 0 of a batch-2 128³ training step).

Shape B=2, D=96 (d_inner), L=262,144 (64³ tokens), N=16, with z gating, D skip, delta bias and softplus as
the model uses them. Times (median of CUDA-event-timed repeats after warm-up) the selective scan forward and
forward+backward for float32/float16/bfloat16, the causal conv1d forward+backward at (2, 96, 262,144), W=4,
and the chunked PyTorch scan for comparison; reports achieved bandwidth against a device-to-device copy
measured in the same run. Prints a table and writes JSON (``--out``).

Two timings per case: ``fwd_ms`` / ``fwd_bwd_ms`` time one call at a time (events around a single call, so they
include the host time before its first kernel starts: the latency of an isolated call), and ``*_stream_ms``
time 20 calls queued back to back, divided by 20 (the GPU time per call when the CPU runs ahead, as it does
in a training step). Bandwidths are from the single-call times.

    python bench/bench_kernels.py --out bench_kernels.json
"""
import argparse
import json

import torch

from timing import cuda_timed


def copy_bandwidth():
    n = 1 << 29  # 2 GiB of float32
    a = torch.empty(n, device="cuda")
    b = torch.empty_like(a)
    a.normal_()
    ms = cuda_timed(lambda: b.copy_(a), 2, 10)[0]
    return 2 * a.numel() * 4 / (ms * 1e-3) / 1e12  # TB/s counting read + write


def scan_inputs(dtype, b=2, d=96, length=262144, n=16):
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    u = mk(b, d, length).to(dtype)
    delta = (mk(b, d, length) * 0.5).to(dtype)
    A = -torch.arange(1, n + 1, device="cuda").float().repeat(d, 1)
    Bm = mk(b, 1, n, length).to(dtype)
    Cm = mk(b, 1, n, length).to(dtype)
    D = mk(d)
    z = mk(b, d, length).to(dtype)
    bias = torch.full((d,), -3.0, device="cuda")
    return u, delta, A, Bm, Cm, D, z, bias


def bench_scan(dtype, impl="kernel", reverse=False):
    from mamba_ssm.ops import selective_scan_fn
    from mamba_ssm.ops.selective_scan_chunked import selective_scan_chunked
    fn = selective_scan_fn if impl == "kernel" else selective_scan_chunked
    u, delta, A, Bm, Cm, D, z, bias = scan_inputs(dtype)
    leaves = [t.detach().requires_grad_() for t in (u, delta, A, Bm, Cm, D, z, bias)]
    dout = torch.randn_like(u)

    def fwd():
        with torch.no_grad():
            fn(u, delta, A, Bm, Cm, D, z, bias, delta_softplus=True, reverse=reverse)

    def fwd_bwd():
        for t in leaves:  # the gradients are assigned, not accumulated into earlier ones (no extra adds timed)
            t.grad = None
        out = fn(*leaves[:7], delta_bias=leaves[7], delta_softplus=True, reverse=reverse)
        out.backward(dout)

    rep = 20 if impl == "kernel" else 3
    t_f = cuda_timed(fwd, 2, rep)[0]
    t_fb = cuda_timed(fwd_bwd, 2, rep)[0]
    calls = 20 if impl == "kernel" else 1  # back to back: 5 runs of 20 calls
    t_fs, t_fbs = cuda_timed(fwd, 2, 5, calls)[0], cuda_timed(fwd_bwd, 2, 5, calls)[0]
    el = u.element_size()
    tok = u.numel()
    bc = Bm.numel()
    # Minimum bytes: forward reads u, delta, z, B, C and writes out; backward reads u, delta, z, B, C, dout
    # and writes du, ddelta, dz, dB, dC (dB/dC in fp32 before the cast).
    fwd_bytes = (3 * tok + 2 * bc) * el + tok * el
    bwd_bytes = (4 * tok + 2 * bc) * el + 3 * tok * el + 2 * bc * 4
    return {"impl": impl, "dtype": str(dtype).replace("torch.", ""), "fwd_ms": t_f, "fwd_bwd_ms": t_fb,
            "fwd_stream_ms": t_fs, "fwd_bwd_stream_ms": t_fbs,
            "fwd_TBps": fwd_bytes / (t_f * 1e-3) / 1e12, "fwd_bwd_TBps": (fwd_bytes + bwd_bytes) / (t_fb * 1e-3) / 1e12}


def bench_conv(dtype, reverse=False):
    from causal_conv1d import causal_conv1d_fn
    x = torch.randn(2, 96, 262144, device="cuda").to(dtype).requires_grad_()
    w = torch.randn(96, 4, device="cuda", requires_grad=True)
    b = torch.randn(96, device="cuda", requires_grad=True)
    dout = torch.randn_like(x)

    def fwd():
        with torch.no_grad():
            causal_conv1d_fn(x, w, b, "silu", reverse=reverse)

    def fwd_bwd():
        for t in (x, w, b):
            t.grad = None
        causal_conv1d_fn(x, w, b, "silu", reverse=reverse).backward(dout)

    t_f, t_fb = cuda_timed(fwd)[0], cuda_timed(fwd_bwd)[0]
    t_fs, t_fbs = cuda_timed(fwd, 2, 5, 20)[0], cuda_timed(fwd_bwd, 2, 5, 20)[0]  # back to back, as for the scan
    el = x.element_size()
    return {"dtype": str(dtype).replace("torch.", ""), "reverse": reverse, "fwd_ms": t_f, "fwd_bwd_ms": t_fb,
            "fwd_stream_ms": t_fs, "fwd_bwd_stream_ms": t_fbs,
            "fwd_TBps": 2 * x.numel() * el / (t_f * 1e-3) / 1e12,
            "fwd_bwd_TBps": 5 * x.numel() * el / (t_fb * 1e-3) / 1e12}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_kernels.json")
    ap.add_argument("--no_pytorch", action="store_true", help="skip the (slow) chunked PyTorch comparison")
    ap.add_argument("--lane_threads", default="", help="comma-separated lane-kernel block sizes to time as well")
    ap.add_argument("--cpg", default="", help="comma-separated group sizes (chunks per block) to time as well")
    ap.add_argument("--bwd_variants", default="",
                    help="comma-separated backward main kernels to time as well (0 previous, 1 default)")
    args = ap.parse_args()
    from mamba_ssm.ops import active_backend
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "scan_path": active_backend("cuda"), "copy_TBps": copy_bandwidth(), "scan": [], "conv": []}
    from mamba_ssm.ops import cuda_backend
    cuda_backend.available()
    ext = cuda_backend._EXT
    for lane in (True, False):  # lane-layout walks for d_state <= 16 (default), then the state-split kernels
        ext.set_lane_kernels(lane)
        for dt in (torch.float32, torch.float16, torch.bfloat16) if lane else (torch.float32, torch.float16):
            r = bench_scan(dt)
            r["impl"] = "kernel" if lane else "kernel-split"
            res["scan"].append(r)
    ext.set_lane_kernels(True)
    # Optional sweeps, fp32 and fp16 each: lane-kernel block size (96 / 128), group size (chunks per block).
    for setter, values, label in ((ext.set_lane_threads, args.lane_threads, "threads"),
                                  (ext.set_chunks_per_group, args.cpg, "cpg")):
        for v in [int(c) for c in values.split(",") if c]:
            setter(v)
            for dt in (torch.float32, torch.float16):
                r = bench_scan(dt)
                r["impl"] = f"kernel-{label}{v}"
                res["scan"].append(r)
        setter(0)
    for v in [int(c) for c in args.bwd_variants.split(",") if c]:
        ext.set_bwd_main_variant(v)
        for dt in (torch.float32, torch.float16):
            r = bench_scan(dt)
            r["impl"] = f"kernel-bwd{v}"
            res["scan"].append(r)
        ext.set_bwd_main_variant(1)
    for dt in (torch.float32, torch.float16):  # the reverse direction, walked backwards by indexing
        r = bench_scan(dt, reverse=True)
        r["impl"] = "kernel-reverse"
        res["scan"].append(r)
    if not args.no_pytorch:
        res["scan"].append(bench_scan(torch.float32, impl="pytorch-chunked"))
    for dt in (torch.float32, torch.float16):
        res["conv"].append(bench_conv(dt))
    res["conv"].append(bench_conv(torch.float16, reverse=True))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\n{res['device']}  torch {res['torch']}  CUDA {res['cuda']}  copy {res['copy_TBps']:.2f} TB/s (read+write)")
    print("selective scan B=2 D=96 L=262144 N=16 (z, D, bias, softplus)")
    print("(stream: GPU time per call with calls queued back to back; the others time one call at a time)")
    print(f"{'impl':<18}{'dtype':<10}{'fwd ms':>9}{'fwd+bwd ms':>12}{'fwd TB/s':>10}{'f+b TB/s':>10}"
          f"{'stream fwd':>12}{'stream f+b':>12}")
    for r in res["scan"]:
        print(f"{r['impl']:<18}{r['dtype']:<10}{r['fwd_ms']:>9.3f}{r['fwd_bwd_ms']:>12.3f}"
              f"{r['fwd_TBps']:>10.2f}{r['fwd_bwd_TBps']:>10.2f}{r['fwd_stream_ms']:>12.3f}{r['fwd_bwd_stream_ms']:>12.3f}")
    print("causal conv1d (2, 96, 262144) W=4 silu")
    for r in res["conv"]:
        print(f"{'kernel-reverse' if r['reverse'] else 'kernel':<18}{r['dtype']:<10}{r['fwd_ms']:>9.3f}{r['fwd_bwd_ms']:>12.3f}"
              f"{r['fwd_TBps']:>10.2f}{r['fwd_bwd_TBps']:>10.2f}{r['fwd_stream_ms']:>12.3f}{r['fwd_bwd_stream_ms']:>12.3f}")


if __name__ == "__main__":
    main()
