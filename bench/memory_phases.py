"""Where a SegMamba training step reaches its peak GPU memory: per top-level module (and per Mamba-encoder
part), the peak allocated memory while that module's forward or backward ran and the memory still allocated
when it finished. Same step as bench_model.py (batch 2 x 4 x 128^3, AMP, cross-entropy).

    python bench/memory_phases.py --models segmamba,segmamba+ckpt --out memory_phases.json

Reading it: the forward rows grow by what autograd keeps; the backward row with the highest peak is the
module to make cheaper (or to checkpoint) to lower the step's peak.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import apply_variant, build  # noqa: E402

GiB = 2 ** 30


def watched_modules(model):
    """Top-level children, with the Mamba encoder split into its stem/downsamplers and stages."""
    for name, child in model.named_children():
        if name == "vit":
            for sub, part in child.named_children():
                if isinstance(part, torch.nn.ModuleList):
                    for i, m in enumerate(part):
                        yield f"vit.{sub}.{i}", m
                else:
                    yield f"vit.{sub}", part
        else:
            yield name, child


def trace_step(name, amp):
    base, *variant = name.split("+")
    torch.manual_seed(0)
    model = build(base).cuda()
    x = torch.randn(2, 4, 128, 128, 128, device="cuda")
    model, x, _ = apply_variant(model, x, variant)
    y = torch.randint(0, 4, (2, 128, 128, 128), device="cuda")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]
    rows, phase = [], ["forward"]

    def mark(label):
        torch.cuda.synchronize()
        rows.append({"phase": phase[0], "module": label,
                     "peak_GiB": torch.cuda.max_memory_allocated() / GiB,
                     "allocated_GiB": torch.cuda.memory_allocated() / GiB})
        torch.cuda.reset_peak_memory_stats()

    def before(_m, *_a):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    handles = []
    for label, m in watched_modules(model):
        handles.append(m.register_forward_pre_hook(before))
        handles.append(m.register_forward_hook(lambda _m, _i, _o, label=label: mark(label)))
        handles.append(m.register_full_backward_pre_hook(lambda _m, _g: before(_m)))
        handles.append(m.register_full_backward_hook(lambda _m, _gi, _go, label=label: mark(label)))

    def step():
        rows.clear()
        phase[0] = "forward"
        with torch.autocast("cuda", dtype=dtype):
            loss = F.cross_entropy(model(x), y)
        torch.cuda.synchronize()
        after_forward = torch.cuda.memory_allocated() / GiB
        phase[0] = "backward"
        torch.cuda.reset_peak_memory_stats()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return after_forward

    model.train()
    step()  # warm-up (cudnn autotuning, kernel loading)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    weights = torch.cuda.memory_allocated() / GiB
    after_forward = step()
    for h in handles:
        h.remove()
    # the whole step's peak, without the hooks' resets
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=dtype):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / GiB
    del model, loss
    torch.cuda.empty_cache()
    return {"model": name, "weights_GiB": weights, "after_forward_GiB": after_forward, "step_peak_GiB": peak,
            "rows": list(rows)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="segmamba,segmamba+ckpt")
    ap.add_argument("--amp", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--out", default="memory_phases.json")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    results = []
    for name in filter(None, args.models.split(",")):
        r = trace_step(name, args.amp)
        results.append(r)
        print(f"\n{name}: weights {r['weights_GiB']:.2f} GiB, allocated after forward {r['after_forward_GiB']:.2f} "
              f"GiB, step peak (forward + backward, no hooks) {r['step_peak_GiB']:.2f} GiB")
        print(f"{'phase':<9} {'module':<22} {'peak GiB':>9} {'after GiB':>10}")
        for row in r["rows"]:
            print(f"{row['phase']:<9} {row['module']:<22} {row['peak_GiB']:9.2f} {row['allocated_GiB']:10.2f}")
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "amp": args.amp,
                   "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
