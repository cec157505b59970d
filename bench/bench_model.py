"""Whole-model speed and memory on the GPU: SegMamba (our kernels / PyTorch scan path) vs MONAI SwinUNETR
(feature_size 48) and UNETR, same input and AMP settings.

Training step: batch 2 × 4 × 128³, 4 classes, cross-entropy, SGD (lr 1e-2, momentum 0.99, Nesterov), AMP
(fp16 with GradScaler, or bf16). Inference: 1 × 4 × 128³ forward under autocast, no grad. Each time is the
median of ``--repeat`` CUDA-event-timed runs after warm-up; peak memory is torch's max allocated memory
during the timed runs. Also times sliding-window inference of one BraTS-sized volume (4 × 140 × 170 × 140)
with and without 8-way mirror TTA. Prints a table and writes JSON.

    python bench/bench_model.py --out bench_model.json [--models segmamba,segmamba+compile,swinunetr,unetr]
        [--amp fp16] [--sw_compile]

A ``+compile`` suffix runs the model through light_training.compile (torch.compile, as the scripts' --compile
does); ``+cl`` uses channels-last 3D tensors; ``+ckpt`` / ``+ckptm`` / ``+ckptall`` train with SegMamba's
activation checkpointing of the full-resolution blocks / the Mamba layers / both; ``+graph`` times only
inference, replayed from a CUDA graph (light_training.cuda_graphs, as 4_predict.py --cuda_graphs does);
``+tgraph`` replays the training step's forward, loss and backward from a CUDA graph (GraphedTrainingStep, as
3_train.py --cuda_graphs does; optimiser eager) and inference from a graph too, and its peak memory includes
the capture. ``+ambNN`` sets Inductor's activation memory budget to NN % (light_training.compile's
``memory_budget``: the compiled regions recompute cheap operations in the backward pass instead of keeping
their outputs). ``+composed`` runs the Mamba blocks' three directions through the per-direction autograd
functions (SEGMAMBA_FUSED_MAMBA=0) instead of the fused three-direction function, the default on CUDA.
``--sw_graphs`` also times the sliding window with CUDA graphs (and with --sw_compile, compiled and graphed).
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from timing import cuda_timed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build(name):
    if name.startswith("segmamba"):
        from model_segmamba import SegMamba
        return SegMamba(in_chans=4, out_chans=4)
    from monai.networks import nets
    if name == "swinunetr":
        return nets.SwinUNETR(in_channels=4, out_channels=4, feature_size=48)
    if name == "unetr":
        return nets.UNETR(in_channels=4, out_channels=4, img_size=(128, 128, 128))
    raise ValueError(name)


COMPILE_VARIANTS = {"compile": "block", "compilescan": "scan"}  # suffix -> compile_network(eager=...)
CHECKPOINT_VARIANTS = {"ckpt": "full_res", "ckptm": "mamba", "ckptall": "all"}  # suffix -> checkpointing mode


def apply_variant(model, x, variant):
    """Variant suffixes of a model name: ``+cl`` channels-last 3D activations
    (:func:`model_segmamba.channels_last.use_channels_last` and a channels-last input); ``+compile``
    :func:`light_training.compile.compile_network` (torch.compile, Mamba blocks eager, as the scripts do);
    ``+compilescan`` the same with only the Mamba scans eager. Returns the model, the input and whether the
    model was compiled."""
    ckpt = next((CHECKPOINT_VARIANTS[v] for v in variant if v in CHECKPOINT_VARIANTS), None)
    if ckpt is not None:  # SegMamba only: activation checkpointing
        model.set_activation_checkpointing(ckpt)
    if "cl" in variant:  # what the scripts' --channels_last does
        from model_segmamba.channels_last import channels_last_input, use_channels_last
        model, x = use_channels_last(model), channels_last_input(x)
    # Inductor's activation memory budget, as --compile_memory_budget (only with +compile)
    budget = next((int(v[3:]) / 100 for v in variant if v.startswith("amb")), 1.0)
    eager = next((COMPILE_VARIANTS[v] for v in variant if v in COMPILE_VARIANTS), None)
    if eager is not None:  # exactly what the training and prediction scripts do with --compile
        from light_training.compile import compile_network
        compile_network(model, "on", x.device, say=print, eager=eager, memory_budget=budget)
    return model, x, eager is not None


def bench_one(name, amp, repeat):
    base, *variant = name.split("+")
    force_pytorch = base == "segmamba-pytorch"
    os.environ["SEGMAMBA_FORCE_PYTORCH"] = "1" if force_pytorch else "0"
    # +composed: the Mamba blocks' three directions through per-direction autograd functions, not the fused one
    os.environ["SEGMAMBA_FUSED_MAMBA"] = "0" if "composed" in variant else "1"
    torch.manual_seed(0)
    model = build(base).cuda()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]
    x = torch.randn(2, 4, 128, 128, 128, device="cuda")
    model, x, compiled = apply_variant(model, x, variant)
    train_graph = "tgraph" in variant  # training step (and inference) from CUDA graphs
    graphed = "graph" in variant or train_graph  # inference from a CUDA graph
    if (compiled and not graphed) or train_graph:  # compile (train graph) and let cuDNN autotune once before
        # timing (and before a capture), and report how long it took
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype):
            F.cross_entropy(model(x), torch.zeros(x.shape[0], *x.shape[2:], dtype=torch.long, device="cuda")).backward()
        torch.cuda.synchronize()
        print(f"{name}: first train step (compile, autotuning) {time.perf_counter() - t0:.1f} s", flush=True)
        model.zero_grad(set_to_none=True)
    y = torch.randint(0, 4, (2, 128, 128, 128), device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    scaler = torch.amp.GradScaler("cuda", enabled=(amp == "fp16"))
    graphed_step = None
    if train_graph:
        from light_training.cuda_graphs import GraphedTrainingStep
        graphed_step = GraphedTrainingStep(lambda a, b: F.cross_entropy(model(a), b), model.parameters(),
                                           scale=scaler.scale, say=print,
                                           autocast=lambda: torch.autocast("cuda", dtype=dtype, cache_enabled=False))

    def step():
        opt.zero_grad(set_to_none=True)
        if graphed_step is not None:
            graphed_step(x, y)
        else:
            with torch.autocast("cuda", dtype=dtype):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12)
        scaler.step(opt)
        scaler.update()

    slow = force_pytorch
    t_train = m_train = None
    if train_graph:  # the capture (first step) allocates the graph's memory: count it in the peak
        model.train()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        capture_peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"{name}: second train step (3 warm-up passes, capture) {time.perf_counter() - t0:.1f} s", flush=True)
        t_train, m_train = cuda_timed(step, 3, repeat)
        m_train = max(m_train, capture_peak)
        if not graphed_step.replays:
            print(f"{name}: no training-step CUDA graph was replayed (capture failed?)", flush=True)
    elif not graphed:
        model.train()
        t_train, m_train = cuda_timed(step, 1 if slow else 3, 3 if slow else repeat)
    del opt, scaler, graphed_step
    model.zero_grad(set_to_none=True)  # the gradients of a graphed step live in the graph's memory pool
    x1 = x[:1].contiguous(memory_format=torch.channels_last_3d if "cl" in variant else torch.contiguous_format)
    model.eval()

    run = model
    if graphed:
        from light_training.cuda_graphs import GraphedForward
        run = GraphedForward(model, say=print)

    def infer():
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, cache_enabled=not graphed):
            run(x1)

    torch.cuda.empty_cache()
    t_inf, m_inf = cuda_timed(infer, 1 if slow else 3, 3 if slow else repeat)
    if graphed and not run.replays:
        print(f"{name}: no CUDA graph was replayed (capture failed?)", flush=True)
    res = {"model": name, "train_ms": t_train, "train_peak_GiB": m_train, "infer_ms": t_inf, "infer_peak_GiB": m_inf,
           "params": sum(p.numel() for p in model.parameters())}
    del model
    torch.cuda.empty_cache()
    return res


def bench_sliding_window(amp, compiled=False, graph_options=(False,), channels_last=False):
    """Whole-volume sliding window (one model, compiled or not, channels-last or not) with each CUDA-graphs
    setting given; every predictor is warmed up once (compilation, graph capture) before its timed run."""
    from light_training.prediction import SlidingWindowConfig, SlidingWindowPredictor
    from model_segmamba import SegMamba
    os.environ["SEGMAMBA_FORCE_PYTORCH"] = "0"
    model = SegMamba(4, 4).cuda().eval()
    if channels_last:
        from model_segmamba.channels_last import use_channels_last
        use_channels_last(model)
    if compiled:
        from light_training.compile import compile_network
        compile_network(model, "on", torch.device("cuda"), say=print)
    vol = torch.randn(4, 140, 170, 140)
    out = {}
    for graphs in graph_options:
        suffix = ("+compile" if compiled else "") + ("+cl" if channels_last else "") + ("+graphs" if graphs else "")
        for tta, axes in (("none", ()), ("mirror8", (0, 1, 2))):
            pred = SlidingWindowPredictor(SlidingWindowConfig(mirror_axes=axes, amp_dtype=amp, cuda_graphs=graphs),
                                          device="cuda")
            pred.predict_probabilities(model, vol)  # warm-up (compilation, graph capture)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            pred.predict_probabilities(model, vol)
            torch.cuda.synchronize()
            out[tta + suffix] = (time.perf_counter() - t0) * 1000
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_model.json")
    ap.add_argument("--models", default="segmamba,segmamba-pytorch,swinunetr,unetr")
    ap.add_argument("--amp", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--no_sliding_window", action="store_true")
    ap.add_argument("--sw_compile", action="store_true", help="also time the sliding window with --compile on")
    ap.add_argument("--sw_graphs", action="store_true", help="also time the sliding window with CUDA graphs")
    ap.add_argument("--sw_channels_last", action="store_true",
                    help="time the sliding window with channels-last activations (as 4_predict.py's default when "
                         "compiled) instead of the default layout")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "amp": args.amp, "models": []}
    for name in filter(None, args.models.split(",")):  # --models "" times only the sliding window
        r = bench_one(name, args.amp, args.repeat)
        res["models"].append(r)
        train = "train        -            -" if r["train_ms"] is None else \
            f"train {r['train_ms']:8.1f} ms {r['train_peak_GiB']:6.2f} GiB"
        print(f"{r['model']:<22} {train}   infer {r['infer_ms']:7.1f} ms {r['infer_peak_GiB']:5.2f} GiB", flush=True)
        with open(args.out, "w") as f:  # after every model, so a run cut short keeps what it measured
            json.dump(res, f, indent=1)
    if not args.no_sliding_window:
        graph_options = (False, True) if args.sw_graphs else (False,)
        cl = args.sw_channels_last
        res["sliding_window_4x140x170x140_ms"] = bench_sliding_window(args.amp, False, graph_options, cl)
        if args.sw_compile:
            res["sliding_window_4x140x170x140_ms"].update(bench_sliding_window(args.amp, True, graph_options, cl))
        times = res["sliding_window_4x140x170x140_ms"]
        print("sliding window 4x140x170x140:", {k: round(v, 1) for k, v in times.items()})
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
