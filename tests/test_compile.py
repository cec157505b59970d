"""light_training.compile: when the network is compiled, what it leaves untouched, and (on a GPU) that the
compiled network computes what the eager one does, forward and backward.

The CPU tests never trigger a compilation (that takes minutes on a small CPU); the GPU tests compile a
narrow SegMamba and compare it with an eager copy holding the same weights.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from light_training.compile import compile_network, should_compile
from light_training.trainer import TrainerConfig
from mamba_ssm import Mamba
from model_segmamba import SegMamba
from model_segmamba.channels_last import use_channels_last


def small_segmamba():
    torch.manual_seed(0)
    return SegMamba(4, 4, feat_size=(16, 32, 64, 128), hidden_size=128)


def test_should_compile_resolves_auto_per_device(monkeypatch):
    monkeypatch.delenv("SEGMAMBA_COMPILE", raising=False)
    assert should_compile("auto", torch.device("cuda")) is True
    assert should_compile("auto", torch.device("cpu")) is False
    assert should_compile("on", torch.device("cpu")) is True
    assert should_compile("off", torch.device("cuda")) is False
    monkeypatch.setenv("SEGMAMBA_COMPILE", "0")
    assert should_compile("auto", torch.device("cuda")) is False
    with pytest.raises(ValueError, match="compile setting"):
        should_compile("yes", torch.device("cpu"))


def test_trainer_config_rejects_unknown_compile_setting():
    with pytest.raises(ValueError, match="compile"):
        TrainerConfig(compile="fast")


def test_compile_network_keeps_state_dict_and_marks_mamba_blocks_eager():
    model = small_segmamba()
    keys = list(model.state_dict().keys())
    lines = []
    assert compile_network(model, "off", torch.device("cpu"), say=lines.append) is False
    assert lines == [] and model._compiled_call_impl is None
    assert compile_network(model, "on", torch.device("cpu"), say=lines.append) is True
    assert list(model.state_dict().keys()) == keys  # checkpoints keep the published layout
    blocks = [m for m in model.modules() if isinstance(m, Mamba)]
    assert len(blocks) == 8 and all(getattr(m, "_segmamba_eager", "") == "block" for m in blocks)
    assert model._compiled_call_impl is not None
    assert len(lines) == 1 and "8 Mamba blocks" in lines[0]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("eager_part, channels_last", [("block", False), ("scan", False), ("block", True)])
def test_compiled_segmamba_matches_eager_on_gpu(eager_part, channels_last):
    """Compiled float32 SegMamba vs a float64 copy (the oracle): output and every gradient may be at most
    twice as far from it as the eager float32 network is (plus a floor), so compilation never costs
    accuracy; then fp16-autocast inference of compiled vs eager. ``channels_last``: the compiled network
    also runs with channels-last activations (what --compile does by default on CUDA)."""
    dev = torch.device("cuda")
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        eager = small_segmamba().to(dev)
        oracle = copy.deepcopy(eager).double()
        compiled = copy.deepcopy(eager)
        if channels_last:
            use_channels_last(compiled)
        assert compile_network(compiled, "on", dev, say=lambda _: None, eager=eager_part)
        torch._dynamo.reset()  # each case compiles afresh
        x = torch.randn(2, 4, 64, 64, 64, device=dev)
        y = torch.randint(0, 4, (2, 64, 64, 64), device=dev)
        results = []
        for model, inp in ((oracle, x.double()), (eager, x), (compiled, x)):
            model.zero_grad(set_to_none=True)
            logits = model(inp)
            F.cross_entropy(logits, y).backward()
            results.append((logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                              if p.grad is not None}))
        (ref_out, ref_grads), (e_out, e_grads), (c_out, c_grads) = results
        assert ref_grads.keys() == e_grads.keys() == c_grads.keys() and len(ref_grads) > 100
        # Conv biases right before an instance norm have an exactly zero true gradient (the norm removes
        # them); float64 gives ~1e-20 there and float32 rounding noise, so relative errors of those are
        # meaningless: compare the parameters whose float64 gradient is not negligible.
        scale = max(g.norm().item() for g in ref_grads.values())
        live = [n for n, g in ref_grads.items() if g.norm().item() > 1e-6 * scale]
        assert len(live) > 100
        eager_err = (_relative(e_out, ref_out), max(_relative(e_grads[n], ref_grads[n]) for n in live))
        compiled_err = (_relative(c_out, ref_out), max(_relative(c_grads[n], ref_grads[n]) for n in live))
        print(f"relative error vs float64: eager fp32 out {eager_err[0]:.2e} grads {eager_err[1]:.2e} | "
              f"compiled fp32 out {compiled_err[0]:.2e} grads {compiled_err[1]:.2e}")
        assert compiled_err[0] <= max(2 * eager_err[0], 1e-5)
        assert compiled_err[1] <= max(2 * eager_err[1], 1e-4)
        # inference under fp16 autocast, as the prediction script runs it
        eager.eval(), compiled.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            a, b = eager(x[:1]).float(), compiled(x[:1]).float()
        assert _relative(b, a) <= 1e-2
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
