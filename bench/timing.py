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


def cuda_timed_stream(fn, warmup=3, calls=20, repeat=5):
    """GPU time per call when calls are queued back to back (the CPU ahead of the GPU, as in a training step):
    ``calls`` calls between two CUDA events, divided by ``calls``; the median of ``repeat`` such runs, in ms.
    Unlike :func:`cuda_timed` it leaves out the host time before a single call's first kernel starts."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)
