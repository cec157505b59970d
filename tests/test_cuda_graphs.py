"""light_training.cuda_graphs and SlidingWindowPredictor(cuda_graphs=True).

CPU: the option changes nothing (graphs are CUDA-only) and 4_predict.py turns it on only for CUDA.
GPU (skipped without CUDA): a replayed forward equals an eager forward of the same network on the same
input, for fresh inputs after capture, in fp32 and under fp16 autocast; a network that cannot be captured
falls back to eager results and says so; whole-volume sliding-window probabilities are the same with and
without graphs (including the smaller last window batch, a second captured shape).
"""
import importlib

import numpy as np
import pytest
import torch

from light_training.cuda_graphs import GraphedForward
from light_training.prediction import SlidingWindowConfig, SlidingWindowPredictor
from model_segmamba import SegMamba

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def small_segmamba():
    torch.manual_seed(0)
    return SegMamba(4, 3, feat_size=(8, 16, 32, 64), hidden_size=64).eval()


def test_cpu_prediction_identical_with_graphs_option():
    model = small_segmamba()
    volume = np.random.default_rng(0).standard_normal((4, 40, 36, 44)).astype(np.float32)
    results = []
    for graphs in (False, True):
        config = SlidingWindowConfig(roi_size=(32, 32, 32), sw_batch_size=2, cuda_graphs=graphs)
        predictor = SlidingWindowPredictor(config, device="cpu")
        results.append(predictor.predict_probabilities(model, volume))
        assert predictor._graphed is None  # never built on the CPU
    assert torch.equal(results[0], results[1])


def test_graphed_forward_passes_cpu_and_grad_calls_through():
    calls = []

    def net(x):
        calls.append(x.shape)
        return x * 2

    runner = GraphedForward(net)
    x = torch.ones(2, 3)
    assert torch.equal(runner(x), x * 2)  # CPU tensor: plain call
    assert runner.graphs == {} and calls == [(2, 3)]


def test_predict_script_enables_graphs_only_for_cuda():
    predict = importlib.import_module("4_predict")
    args = predict.build_parser().parse_args([])
    assert args.cuda_graphs == "auto"
    assert predict.build_parser().parse_args(["--cuda_graphs", "off"]).cuda_graphs == "off"
    with pytest.raises(SystemExit):
        predict.build_parser().parse_args(["--cuda_graphs", "maybe"])


@cuda
@pytest.mark.parametrize("amp", [None, torch.float16])
def test_replayed_forward_matches_eager(amp):
    model = small_segmamba().cuda()
    runner = GraphedForward(model)
    torch.manual_seed(1)
    inputs = [torch.randn(2, 4, 32, 32, 32, device="cuda") for _ in range(3)]
    with torch.no_grad(), torch.autocast("cuda", dtype=amp or torch.float16, enabled=amp is not None,
                                         cache_enabled=False):
        graphed = [runner(x).clone() for x in inputs]  # first call captures, the others replay
        eager = [model(x) for x in inputs]
    assert runner.replays == 2 and runner.graphs[((2, 4, 32, 32, 32), torch.float32, inputs[0].device)] is not None
    tol = 1e-5 if amp is None else 2e-3
    for g, e in zip(graphed, eager):
        assert g.dtype == e.dtype
        assert torch.linalg.vector_norm((g - e).float()) <= tol * torch.linalg.vector_norm(e.float())
    # outputs of different inputs differ: the replay read the new input, not the captured one
    assert not torch.allclose(graphed[0], graphed[1])


@cuda
def test_uncapturable_network_falls_back_to_eager():
    said = []

    def net(x):
        scale = float(x.abs().max().item())  # a host sync: not allowed while capturing
        return x / scale

    runner = GraphedForward(net, say=said.append)
    x = torch.randn(3, 5, device="cuda")
    with torch.no_grad():
        out = runner(x)
        again = runner(x * 2)
    torch.testing.assert_close(out, x / x.abs().max())
    torch.testing.assert_close(again, (x * 2) / (x * 2).abs().max())
    assert list(runner.graphs.values()) == [None] and runner.replays == 0
    assert len(said) == 1 and "running that shape without CUDA graphs" in said[0]


@cuda
def test_sliding_window_probabilities_same_with_graphs():
    model = small_segmamba().cuda()
    volume = np.random.default_rng(2).standard_normal((4, 50, 50, 50)).astype(np.float32)
    results = []
    for graphs in (False, True):
        # 3 windows per axis -> 27 windows in batches of 2: the last batch holds one window (a second shape)
        config = SlidingWindowConfig(roi_size=(32, 32, 32), sw_batch_size=2, cuda_graphs=graphs, mirror_axes=(0,))
        predictor = SlidingWindowPredictor(config, device="cuda")
        results.append(predictor.predict_probabilities(model, volume))
        if graphs:
            shapes = sorted(key[0][0] for key, graph in predictor._graphed.graphs.items() if graph is not None)
            assert shapes == [1, 2] and predictor._graphed.replays > 20
    torch.testing.assert_close(results[1], results[0], atol=2e-3, rtol=0)


@cuda
def test_compiled_network_replayed_from_graph_matches_eager():
    """4_predict.py's default on a GPU: --compile and --cuda_graphs together (fp16 autocast inference)."""
    import copy

    from light_training.compile import compile_network
    eager = small_segmamba().cuda()
    compiled = copy.deepcopy(eager)
    assert compile_network(compiled, "on", torch.device("cuda"), say=lambda _: None)
    runner = GraphedForward(compiled)
    torch.manual_seed(3)
    inputs = [torch.randn(1, 4, 32, 32, 32, device="cuda") for _ in range(3)]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, cache_enabled=False):
        graphed = [runner(x).float() for x in inputs]
        reference = [eager(x).float() for x in inputs]
    assert runner.replays == 2
    for g, e in zip(graphed, reference):
        assert torch.linalg.vector_norm(g - e) <= 1e-2 * torch.linalg.vector_norm(e)
