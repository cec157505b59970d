"""Helpers of the GPU benchmark scripts that can be checked on the CPU."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_busy_time_is_the_union_of_kernel_intervals():
    busy_time = load("profile_model").busy_time
    assert busy_time([]) == 0.0
    # by hand: [0, 4] and [2, 5] overlap -> 5; [7, 8] -> 1; [7.5, 7.8] inside it -> 0; [10, 12] -> 2: total 8
    assert busy_time([(10, 12), (2, 5), (7, 8), (0, 4), (7.5, 7.8)]) == 8
    assert busy_time([(0, 1), (1, 2)]) == 2  # touching, not overlapping


def test_profile_largest_gaps_by_hand():
    largest_gaps = load("profile_model").largest_gaps
    kernels = [(0, 4, "a"), (2, 5, "b"), (7, 8, "c"), (7.5, 7.8, "d"), (10, 12, "e"), (12, 13, "f")]
    # idle: 5 -> 7 (after b, before c) and 8 -> 10 (after c, the kernel reaching furthest, before e)
    assert largest_gaps(kernels, 5) == [(2, "b", "c"), (2, "c", "e")]
    assert largest_gaps([(0, 1, "a"), (3, 4, "b"), (4.5, 5, "c")], 1) == [(2, "a", "b")]
    assert largest_gaps(kernels, 0) == []


def test_cuda_timed_divides_back_to_back_calls(monkeypatch):
    """cuda_timed with calls > 1 queues that many calls between two events and reports the time per call; checked
    with stand-in events whose elapsed time is 2 ms per call made between their records."""
    timing = load("timing")
    count = {"n": 0}

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.at = None

        def record(self):
            self.at = count["n"]

        def elapsed_time(self, end):
            return 2.0 * (end.at - self.at)

    cuda = timing.torch.cuda
    monkeypatch.setattr(cuda, "Event", FakeEvent)
    monkeypatch.setattr(cuda, "synchronize", lambda: None)
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda: 3 * 2**30)

    def fn():
        count["n"] += 1

    ms, peak = timing.cuda_timed(fn, warmup=2, repeat=5, calls=20)
    assert ms == 2.0 and peak == 3.0
    assert count["n"] == 2 + 5 * 20  # warm-up calls, then repeat x calls
    count["n"] = 0
    assert timing.cuda_timed(fn, warmup=0, repeat=3)[0] == 2.0 and count["n"] == 3  # one call per event pair
