"""CUDA-event timing shared by the GPU benchmarks (run them as ``python bench/<script>.py``)."""
import statistics

import torch


def cuda_timed(fn, warmup=3, repeat=20):
    """Run ``fn`` ``warmup`` times, then time ``repeat`` calls with CUDA events. Returns the median in ms and
    torch's peak allocated memory (GiB) during the timed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30
