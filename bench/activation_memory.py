"""Where a SegMamba training step's memory goes: the tensors autograd keeps for the backward pass, per module,
counted on the meta device (no data, no GPU, a few seconds on a CPU).

    python bench/activation_memory.py [--batch 2] [--size 128] [--depth 3] [--top 25]
        [--checkpointing off|mamba|full_res|all] [--composed]

Every tensor saved for backward is counted once (by storage) and charged to the innermost module running
when it was saved. Sizes are as the meta trace makes them, i.e. float32: under fp16 autocast the outputs of
convolutions and projections are half as large, while instance norms run in float32.

The compiled kernels cannot run on the meta device, so they are replaced by stand-ins. By default the Mamba
blocks run the fused three-direction function of the CUDA path (mamba_ssm.ops.tri_orientated) with stand-in
kernels whose only saved output is the scan's per-chunk float32 states (batch, L/64, N, d_inner) and
per-group delta sums; the function itself keeps xz and each direction's x_proj output. With --composed they
run the per-direction autograd functions instead, with stand-ins that keep what the kernels' autograd
functions keep: the conv its input (x, a channel slice of xz) and weights; the scan u, delta and B, C as
contiguous tensors, z, and the per-chunk states. Parameters are not counted. Peak memory on the GPU also
holds the parameters, gradients, optimiser state and the backward's temporaries (bench/bench_model.py
measures it).
"""
import argparse
import collections
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model_segmamba.segmamba import CHECKPOINT_MODES  # noqa: E402


class _ScanSaves(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, bias):
        b, d, length = u.shape
        carry = torch.empty(b, (length + 63) // 64, A.shape[1], d, device=u.device)
        ctx.save_for_backward(u, delta.contiguous(), A, B.contiguous(), C.contiguous(), D, z, bias, carry)
        return torch.empty_like(u)

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the trace never runs a backward
        raise RuntimeError("meta trace only")


class _ConvSaves(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return torch.empty(x.shape, device=x.device)

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover
        raise RuntimeError("meta trace only")


def _stand_in_ops():
    """InnerOps whose scan returns what the CUDA forward kernel saves (per-chunk states, per-group sums)."""
    from mamba_ssm.ops.tri_orientated import InnerOps

    def scan_fwd(u, delta, A, B, C, D, z, bias, reverse):
        b, d, length = u.shape
        chunks = (length + 63) // 64
        return torch.empty_like(u), (torch.empty(b, chunks, A.shape[1], d, device=u.device),
                                     torch.empty(b, chunks, d, device=u.device))

    def never(*args):  # pragma: no cover - the trace never runs a backward
        raise RuntimeError("meta trace only")

    return InnerOps(conv_fwd=lambda x, w, b, reverse: torch.empty(x.shape, device=x.device), conv_bwd=never,
                    scan_fwd=scan_fwd, scan_bwd=never)


def saved_tensors(batch, size, checkpointing="off", composed=False):
    """{storage: (bytes, module name, shape)} of one forward pass of SegMamba(4 -> 4) on the meta device."""
    import mamba_ssm.modules.mamba_simple as mamba_simple
    import mamba_ssm.ops.selective_scan_interface as interface
    interface.selective_scan_fn = (lambda u, delta, A, B, C, D=None, z=None, delta_bias=None, **_:
                                   _ScanSaves.apply(u, delta, A, B, C, D, z, delta_bias))
    interface.causal_conv1d_fn = lambda x, weight, bias=None, **_: _ConvSaves.apply(x, weight, bias)
    mamba_simple._kernels_index_backwards = lambda device: True  # the kernels' reverse direction: no flips
    ops = None if composed else _stand_in_ops()
    mamba_simple._fused_inner_ops = lambda xz, d_state: ops
    from model_segmamba import SegMamba

    model = SegMamba(4, 4).to("meta")
    model.set_activation_checkpointing(checkpointing)  # training mode: checkpointed blocks keep only inputs
    stack = ["(input)"]
    for name, module in model.named_modules():
        module.register_forward_pre_hook(lambda m, args, name=name: stack.append(name) and None)
        module.register_forward_hook(lambda m, args, out: stack.pop() and None)
    params = {id(p) for p in model.parameters()}
    saved = {}

    def pack(t):
        if id(t) not in params:
            key = t.untyped_storage()._cdata
            saved.setdefault(key, (t.untyped_storage().nbytes(), stack[-1], tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.empty(batch, 4, size, size, size, device="meta"))
    return saved


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=128, help="cubic patch edge (multiple of 16)")
    ap.add_argument("--depth", type=int, default=3, help="module-name components to group by")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--checkpointing", default="off", choices=CHECKPOINT_MODES,
                    help="SegMamba.set_activation_checkpointing mode (default: off)")
    ap.add_argument("--composed", action="store_true",
                    help="trace the per-direction autograd functions instead of the fused three-direction one")
    args = ap.parse_args()
    saved = saved_tensors(args.batch, args.size, args.checkpointing, args.composed)
    total = sum(v[0] for v in saved.values())
    groups = collections.Counter()
    for nbytes, where, _ in saved.values():
        groups[".".join(where.split(".")[:args.depth])] += nbytes
    print(f"SegMamba(4 -> 4), batch {args.batch} x 4 x {args.size}^3: {len(saved)} saved tensors, "
          f"{total / 2**30:.2f} GiB as float32"
          + (f", activation checkpointing {args.checkpointing}" if args.checkpointing != "off" else "")
          + (", composed Mamba directions" if args.composed else ", fused Mamba directions"))
    for where, nbytes in groups.most_common(args.top):
        print(f"{nbytes / 2**30:8.3f} GiB  {100 * nbytes / total:5.1f}%  {where}")


if __name__ == "__main__":
    main()
