"""CUDA-event timing shared by the GPU benchmarks (run them as ``python bench/<script>.py``)."""
import statistics

import torch


def cuda_timed(fn, warmup=3, repeat=20, calls=1):
    """Run ``fn`` ``warmup`` times, then time ``repeat`` runs of ``calls`` calls each with CUDA events. Returns the
    median time per call in ms and torch's peak allocated memory (GiB) during the timed calls. With ``calls`` = 1
    the events bracket a single call, so the time includes the host work before its first kernel starts; with
    more, the calls are queued back to back and the time is the GPU time per call when the CPU runs ahead (as in a
    training step)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30
