"""Step 0 ("simple test"): build SegMamba(4 → 4), run one forward pass and report what happened.

Prints the output shape, the parameter count, which selective-scan implementation ran (compiled CUDA kernels
or the chunked PyTorch scan), the time and the peak memory. On a GPU the default input is 1×4×128³ (the
reference setting); on a CPU it is 1×4×64³, which finishes in well under a minute; ``--size 128`` selects
128³ anywhere.

    python 0_inference.py              # best available device
    python 0_inference.py --size 128   # the reference input size
    python 0_inference.py --device cpu --size 32
"""
import argparse
import os
import resource
import sys
import time

import torch

# ---- constants (edit here or pass the flags) ----
SIZE_GPU = 128       # input edge length on a GPU
SIZE_CPU = 64        # input edge length on a CPU
IN_CHANS = 4
OUT_CHANS = 4
DEVICE = "auto"      # auto, cpu, cuda, cuda:N


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=None,
                    help=f"input edge length, a multiple of 16 (default: {SIZE_GPU} on a GPU, {SIZE_CPU} on a CPU)")
    ap.add_argument("--device", default=DEVICE, help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=1, help="batch size (default: %(default)s)")
    ap.add_argument("--amp", choices=["fp16", "bf16", "none"], default="fp16",
                    help="autocast dtype on CUDA (default: %(default)s; CPU always runs float32)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from mamba_ssm import active_backend
    from model_segmamba import SegMamba

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("error: --device cuda was asked for but no CUDA GPU is visible", file=sys.stderr)
            return 2
    size = args.size or (SIZE_GPU if device.type == "cuda" else SIZE_CPU)
    if size % 16:
        print(f"error: --size must be a multiple of 16, got {size}", file=sys.stderr)
        return 2

    torch.manual_seed(0)
    model = SegMamba(in_chans=IN_CHANS, out_chans=OUT_CHANS).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(args.batch, IN_CHANS, size, size, size, device=device)
    amp = device.type == "cuda" and args.amp != "none"
    dtype = torch.float16 if args.amp == "fp16" else torch.bfloat16
    print(f"SegMamba({IN_CHANS} -> {OUT_CHANS}): {params:,} parameters")
    print(f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"input {tuple(x.shape)}, scan path: {active_backend(device)}"
          f"{', autocast ' + args.amp if amp else ''}")

    def forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=amp):
            return model(x)

    if device.type == "cuda":
        forward()  # warm-up (kernel selection, allocator)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = forward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB GPU memory (peak allocated)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB process memory (peak RSS)"
    print(f"output shape {tuple(out.shape)}, forward {elapsed:.2f} s, {peak}")
    if not torch.isfinite(out).all():
        print("error: the output contains non-finite values", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
