"""Inference time of SegMamba(4 → 4) on 1 × 4 × 128³ under fp16 autocast: eager vs --compile with the Mamba
scans eager (the default) vs whole Mamba blocks eager, in one run (median of --repeat CUDA-event timings after
warm-up, which includes compilation).

    python bench/bench_infer_compile.py [--out bench_infer_compile.json]
"""
import argparse
import json
import os
import sys

import torch

from timing import cuda_timed

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_infer_compile.json")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    from light_training.compile import compile_network
    from model_segmamba import SegMamba
    torch.backends.cudnn.benchmark = True
    x = torch.randn(1, 4, 128, 128, 128, device="cuda")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "infer_ms": {}}
    for variant in ("eager", "compile-scan-eager", "compile-block-eager"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = SegMamba(4, 4).cuda().eval()
        if variant != "eager":
            compile_network(model, "on", x.device, say=lambda _: None, eager=variant.split("-")[1])
        def infer():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
                model(x)

        res["infer_ms"][variant] = cuda_timed(infer, 3, args.repeat)[0]
        print(f"{variant:<22} {res['infer_ms'][variant]:7.1f} ms", flush=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        del model


if __name__ == "__main__":
    main()
