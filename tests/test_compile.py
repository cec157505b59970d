"""light_training.compile: when the network is compiled, what it leaves untouched, and (on a GPU) that the
compiled network computes what the eager one does, forward and backward.

The CPU tests compile SegMamba never (that takes minutes on a small CPU), only a small convolutional block
(Inductor's activation memory budget); the GPU tests compile a narrow SegMamba and compare it with an eager
copy holding the same weights.
"""
import copy
import importlib

import pytest
import torch
import torch.nn.functional as F

from light_training.compile import check_memory_budget, compile_network, should_compile
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


@pytest.fixture
def restore_memory_budget():
    import torch._functorch.config as functorch_config
    before = functorch_config.activation_memory_budget
    yield functorch_config
    functorch_config.activation_memory_budget = before
    torch._dynamo.reset()


def test_memory_budget_is_checked_and_set_only_when_compiling(restore_memory_budget):
    functorch_config = restore_memory_budget
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="memory budget"):
            check_memory_budget(bad)
        with pytest.raises(ValueError, match="memory budget"):
            TrainerConfig(compile_memory_budget=bad)
    before = functorch_config.activation_memory_budget
    lines = []
    assert compile_network(small_segmamba(), "off", torch.device("cpu"), say=lines.append, memory_budget=0.5) is False
    assert functorch_config.activation_memory_budget == before
    assert lines == ["compile memory budget 0.5 ignored: the network is not compiled"]
    lines.clear()
    assert compile_network(small_segmamba(), "on", torch.device("cpu"), say=lines.append, memory_budget=0.5)
    assert functorch_config.activation_memory_budget == 0.5
    assert len(lines) == 1 and "activation memory budget 0.5" in lines[0]
    # a network compiled later in the process gets its own budget, not the earlier one's
    assert compile_network(small_segmamba(), "on", torch.device("cpu"), say=lines.append)
    assert functorch_config.activation_memory_budget == 1.0 and "memory budget" not in lines[1]


@pytest.mark.parametrize("script", ["3_train", "abus_train"])
def test_training_scripts_take_a_memory_budget_in_0_1(script):
    module = importlib.import_module(script)
    assert module.build_parser().parse_args([]).compile_memory_budget == 1.0
    module.check_settings(module.build_parser().parse_args(["--compile_memory_budget", "0.5"]))
    with pytest.raises(ValueError, match="--compile_memory_budget"):
        module.check_settings(module.build_parser().parse_args(["--compile_memory_budget", "0"]))


class ConvNormBlock(torch.nn.Module):
    """Two 3-D convolutions with instance norm and leaky ReLU, as in SegMamba's convolutional blocks."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv3d(2, 8, 3, padding=1), torch.nn.Conv3d(8, 8, 3, padding=1)
        self.norm1, self.norm2 = torch.nn.InstanceNorm3d(8, affine=True), torch.nn.InstanceNorm3d(8, affine=True)
        self.head = torch.nn.Conv3d(8, 3, 1)

    def forward(self, x):
        x = F.leaky_relu(self.norm1(self.conv1(x)), 0.01)
        return self.head(F.leaky_relu(self.norm2(self.conv2(x)), 0.01) + x)


def test_memory_budget_keeps_less_for_backward_with_the_same_gradients_cpu_inductor(restore_memory_budget):
    """A real (CPU Inductor) compilation, about 20 s: with budget 0.5 the compiled block keeps fewer bytes for
    its backward pass than with 1.0, and its gradients are as close to a float64 copy's as eager float32's."""
    torch.manual_seed(0)
    eager = ConvNormBlock()
    oracle = copy.deepcopy(eager).double()
    x = torch.randn(2, 2, 12, 12, 12)
    y = torch.randint(0, 3, (2, 12, 12, 12))

    def run(model, inp):
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(inp), y)
        loss.backward()
        return sum(saved.values()), [p.grad.detach().double() for p in model.parameters()]

    _, reference = run(oracle, x.double())
    _, eager_grads = run(eager, x)
    kept, errors = {}, {}
    for budget in (1.0, 0.5):
        torch._dynamo.reset()
        model = copy.deepcopy(eager)
        assert compile_network(model, "on", torch.device("cpu"), say=lambda _: None, memory_budget=budget)
        kept[budget], grads = run(model, x)
        # conv biases in front of an instance norm have a true gradient of zero: leave them out
        errors[budget] = max(_relative(g, r) for (name, _), g, r in zip(model.named_parameters(), grads, reference)
                             if not (name.endswith("bias") and name.startswith("conv")))
    eager_error = max(_relative(g, r) for (name, _), g, r in zip(eager.named_parameters(), eager_grads, reference)
                      if not (name.endswith("bias") and name.startswith("conv")))
    assert kept[0.5] < kept[1.0], kept
    assert errors[0.5] <= max(2 * eager_error, 1e-5) and errors[1.0] <= max(2 * eager_error, 1e-5), (errors, eager_error)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("eager_part, channels_last, memory_budget",
                         [("block", False, 1.0), ("scan", False, 1.0), ("block", True, 1.0), ("block", True, 0.5)])
def test_compiled_segmamba_matches_eager_on_gpu(eager_part, channels_last, memory_budget, restore_memory_budget):
    """Compiled float32 SegMamba vs a float64 copy (the oracle): output and every gradient may be at most
    twice as far from it as the eager float32 network is (plus a floor), so compilation never costs
    accuracy; then fp16-autocast inference of compiled vs eager. ``channels_last``: the compiled network
    also runs with channels-last activations (what --compile does by default on CUDA); ``memory_budget`` 0.5:
    Inductor recomputes instead of keeping activations (--compile_memory_budget)."""
    dev = torch.device("cuda")
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        eager = small_segmamba().to(dev)
        oracle = copy.deepcopy(eager).double()
        compiled = copy.deepcopy(eager)
        if channels_last:
            use_channels_last(compiled)
        assert compile_network(compiled, "on", dev, say=lambda _: None, eager=eager_part,
                               memory_budget=memory_budget)
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
