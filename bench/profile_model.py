"""Where a SegMamba training step spends its GPU time (torch.profiler), grouped into categories.

Batch 2 x 4 x 128^3, fp16 autocast, SGD step. Prints the top CUDA kernels and a category table; writes JSON.

    python bench/profile_model.py --out profile_model.json [--compile] [--channels_last] [--ops 40] [--gaps 20]
"""
import argparse
import json
import os
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CATEGORIES = [  # first match wins; matched against the lower-cased kernel name
    ("Inductor fused (norm/act/add)", ("triton_",)),
    ("selective scan", ("selective_scan", "fwd_local", "fwd_out", "bwd_local", "bwd_main", "carry_")),
    ("causal conv1d", ("conv_fwd_kernel", "conv_bwd_kernel")),
    ("conv3d (cuDNN)", ("conv", "cudnn", "implicit", "sm90_xmma", "xmma", "cutlass", "wgrad", "dgrad", "fprop")),
    ("instance/layer norm", ("norm", "welford", "batch_norm")),
    ("gemm (linear)", ("gemm", "sm90", "ampere", "cublas")),
    ("copy / layout", ("copy", "transpose", "cat", "flip", "permute", "elementwise_kernel_with_index", "index")),
    ("reductions", ("reduce",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
]


def categorize(name):
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def busy_time(intervals):
    """Length of the union of (start, end) intervals: the time the GPU had at least one kernel running
    (kernels of different streams may overlap)."""
    busy, reach = 0.0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            busy += end - start
            reach = end
        elif end > reach:
            busy += end - reach
            reach = end
    return busy


def largest_gaps(kernels, n):
    """The ``n`` longest stretches with no kernel running, from (start, end, name) kernels: a list of
    (gap length, name of the kernel that ran last before it, name of the kernel that ended it)."""
    gaps, reach, last = [], None, None
    for start, end, name in sorted(kernels):
        if reach is not None and start > reach:
            gaps.append((start - reach, last, name))
        if reach is None or end > reach:
            reach, last = end, name
    return sorted(gaps, key=lambda g: -g[0])[:n]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="profile_model.json")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--compile", action="store_true", help="profile the network compiled as --compile on does")
    ap.add_argument("--channels_last", action="store_true", help="channels-last 3D activations (--channels_last)")
    ap.add_argument("--gaps", type=int, default=0, metavar="N",
                    help="also list the N longest stretches in which the GPU ran no kernel (with their neighbours)")
    ap.add_argument("--ops", type=int, default=0, metavar="N",
                    help="also list the N operators (with input shapes) that launch the most GPU time")
    args = ap.parse_args()
    from model_segmamba import SegMamba
    torch.backends.cudnn.benchmark = True
    model = SegMamba(4, 4).cuda().train()
    s = args.size
    x = torch.randn(2, 4, s, s, s, device="cuda")
    if args.channels_last:
        from model_segmamba.channels_last import channels_last_input, use_channels_last
        model, x = use_channels_last(model), channels_last_input(x)
    if args.compile:
        from light_training.compile import compile_network
        compile_network(model, "on", torch.device("cuda"), say=print)
    y = torch.randint(0, 4, (2, s, s, s), device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler("cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    steps = 3
    activities = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU] if args.ops else [])
    with torch.profiler.profile(activities=activities, record_shapes=bool(args.ops)) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per_kernel = defaultdict(float)
    intervals = []
    for evt in prof.events():
        # (with --ops the CPU side is recorded too, and Inductor's "## Call CompiledFxGraph" regions then also
        # appear as GPU-side annotations spanning their kernels: not kernels, so not counted)
        if evt.device_type == torch.autograd.DeviceType.CUDA and not evt.name.startswith("## "):
            per_kernel[evt.name] += evt.device_time_total / 1000.0 / steps  # ms per step
            intervals.append((evt.time_range.start, evt.time_range.end, evt.name))  # microseconds
    total = sum(per_kernel.values())
    # GPU span of the profiled steps against the time some kernel ran: the rest is the GPU waiting for the
    # CPU (launch overhead, synchronisations). The profiler's own CPU overhead inflates the span somewhat.
    span = (max(e for _, e, _ in intervals) - min(s for s, _, _ in intervals)) / 1000.0 / steps
    busy = busy_time([(s, e) for s, e, _ in intervals]) / 1000.0 / steps
    print(f"GPU span per step {span:.1f} ms, busy {busy:.1f} ms ({100 * busy / span:.0f}%), idle {span - busy:.1f} ms")
    gaps = [(us / 1000.0, before, after) for us, before, after in largest_gaps(intervals, args.gaps)]
    if gaps:
        print(f"longest GPU idle stretches over the {steps} steps:")
        for ms, before, after in gaps:
            print(f"  {ms:7.3f} ms  after {before[:60]}  before {after[:60]}")
    per_cat = defaultdict(float)
    for name, ms in per_kernel.items():
        per_cat[categorize(name)] += ms
    print(f"GPU time per training step (kernel sum): {total:.1f} ms")
    for cat, ms in sorted(per_cat.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:<22}{ms:8.1f} ms {100 * ms / total:5.1f}%")
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:25]
    print("top kernels:")
    for name, ms in top:
        print(f"  {ms:7.2f} ms  {categorize(name):<20} {name[:110]}")
    ops = []
    if args.ops:  # which operators (and shapes) launch the kernels: e.g. where the copies come from
        averages = prof.key_averages(group_by_input_shape=True)
        rows = sorted(averages, key=lambda e: -e.self_device_time_total)[:args.ops]
        print("operators by self GPU time:")
        for e in rows:
            ms = e.self_device_time_total / 1000.0 / steps
            ops.append([e.key, str(e.input_shapes)[:160], ms, e.count // steps])
            print(f"  {ms:7.2f} ms  x{e.count // steps:<4} {e.key[:40]:<40} {str(e.input_shapes)[:110]}")
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "total_ms": total, "span_ms": span, "busy_ms": busy, "gaps": gaps,
                   "categories": per_cat, "top": top, "ops": ops}, f, indent=1)


if __name__ == "__main__":
    main()
