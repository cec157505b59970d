"""The Mamba block's per-token projections on channel-first activations, at stage 0 of a batch-2 128^3
training step (L = 64^3 tokens, fp16 autocast): forward and forward+backward time of four ways to compute
W @ x[b] for every batch element b.

  linear   F.linear on the token-major view (x.transpose(1, 2)), result transposed back
  matmul   torch.matmul(W, x) (folds the batch: copies x token-major and the result back)
  bmm      torch.bmm(W.expand(B, ...), x) with autograd's own backward (a batched weight-gradient GEMM)
  ours     mamba_ssm's channels_first_linear (bmm forward, one long-reduction GEMM per batch element for the
           weight gradient)

    python bench/bench_projections.py [--out bench_projections.json]
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import cuda_timed  # noqa: E402
from mamba_ssm.ops.selective_scan_interface import channels_first_linear  # noqa: E402

# (name, out, in, input is a transposed token-major tensor) for d_model 48, d_inner 96, dt_rank 3, N 16
SHAPES = [("in_proj", 192, 48, True), ("x_proj", 35, 96, False), ("dt_proj", 96, 3, False),
          ("out_proj", 48, 96, False)]
WAYS = {
    "linear": lambda w, x: F.linear(x.transpose(1, 2), w).transpose(1, 2),
    "matmul": lambda w, x: torch.matmul(w, x),
    "bmm": lambda w, x: torch.bmm(w.expand(x.shape[0], *w.shape), x),
    "ours": channels_first_linear,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_projections.json")
    ap.add_argument("--length", type=int, default=64 ** 3)
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "length": args.length, "rows": []}
    print(f"{'projection':<10} {'way':<7} {'forward ms':>10} {'fwd+bwd ms':>10}")
    for name, n_out, n_in, token_major in SHAPES:
        w = torch.randn(n_out, n_in, device="cuda", requires_grad=True)
        if token_major:
            x = torch.randn(2, args.length, n_in, device="cuda", dtype=torch.float16).transpose(1, 2)
        else:
            x = torch.randn(2, n_in, args.length, device="cuda", dtype=torch.float16)
        x.requires_grad_(True)
        for way, fn in WAYS.items():
            grad = torch.randn(2, n_out, args.length, device="cuda", dtype=torch.float16)

            def fwd():
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
                    fn(w, x)

            def fwd_bwd():
                with torch.autocast("cuda", dtype=torch.float16):
                    out = fn(w, x)
                torch.autograd.grad(out, (w, x), grad)

            t_f, _ = cuda_timed(fwd, 3, 20)
            t_fb, _ = cuda_timed(fwd_bwd, 3, 20)
            res["rows"].append({"projection": name, "way": way, "forward_ms": t_f, "forward_backward_ms": t_fb})
            print(f"{name:<10} {way:<7} {t_f:10.3f} {t_fb:10.3f}", flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
