"""Channels-last 3D activations (model_segmamba.channels_last): the same numbers as the default layout, every
feature map stays channels-last through SegMamba, the state dict is untouched; the pieces that keep the
layout (the instance norm, the Mamba layer's token-major output projection) against float64 references."""
import copy
import importlib

import pytest
import torch
import torch.nn.functional as F

from mamba_ssm.ops.selective_scan_interface import channels_first_linear
from _small_models import relative_distance, small_segmamba
from model_segmamba.channels_last import (InstanceNorm3dAnyLayout, channels_last_input, is_channels_last_3d,
                                          should_use_channels_last, use_channels_last)


def run(model, x, y):
    model.zero_grad(set_to_none=True)
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    return logits, [p.grad for p in model.parameters()]


def test_instance_norm_keeps_layout_and_matches_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 7, 8) * 3 + 1
    for affine in (False, True):
        norm = InstanceNorm3dAnyLayout(5, affine=affine)
        if affine:
            with torch.no_grad():
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-1, 1)
        xd = x.double()
        mean = xd.mean(dim=(2, 3, 4), keepdim=True)
        var = ((xd - mean) ** 2).mean(dim=(2, 3, 4), keepdim=True)  # biased, as instance norm uses
        ref = (xd - mean) / torch.sqrt(var + norm.eps)
        if affine:
            ref = ref * norm.weight.double().view(1, -1, 1, 1, 1) + norm.bias.double().view(1, -1, 1, 1, 1)
        out_cl = norm(channels_last_input(x))
        assert is_channels_last_3d(out_cl)
        out = norm(x)  # the default layout goes to PyTorch's kernel and stays contiguous
        assert out.is_contiguous()
        torch.testing.assert_close(out_cl.double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # 16-bit input: statistics in float32, output in the input's dtype (as PyTorch's kernel)
    half = channels_last_input(x.bfloat16())
    out = InstanceNorm3dAnyLayout(5)(half)
    assert out.dtype == torch.bfloat16 and is_channels_last_3d(out)
    torch.testing.assert_close(out.float(), F.instance_norm(half.float()), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("bias", [False, True])
def test_token_major_projection_matches_float64(bias):
    torch.manual_seed(0)
    w = torch.randn(6, 5, requires_grad=True)
    b = torch.randn(6, requires_grad=True) if bias else None
    x = torch.randn(3, 5, 11, requires_grad=True)
    g = torch.randn(3, 6, 11)
    out = channels_first_linear(w, x, b, token_major=True)
    assert out.shape == (3, 6, 11) and out.transpose(1, 2).is_contiguous()
    (out * g).sum().backward()
    wd, xd = w.detach().double().requires_grad_(), x.detach().double().requires_grad_()
    bd = b.detach().double().requires_grad_() if bias else None
    ref = torch.einsum("oi,bil->bol", wd, xd) + (bd[:, None] if bias else 0)
    (ref * g.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    pairs = [(w.grad, wd.grad), (x.grad, xd.grad)] + ([(b.grad, bd.grad)] if bias else [])
    for got, want in pairs:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_segmamba_channels_last_same_results_and_layout():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 32, 32, 32)
    y = torch.randint(0, 3, (2, 32, 32, 32))
    plain = small_segmamba().train()
    cl = use_channels_last(copy.deepcopy(plain))
    assert list(cl.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(cl.state_dict().values(), plain.state_dict().values()))
    assert not any(type(m) is torch.nn.InstanceNorm3d for m in cl.modules())
    not_cl = []

    def check(module, inputs, output):  # every 5-D feature map with more than one channel
        if isinstance(output, torch.Tensor) and output.dim() == 5 and output.shape[1] > 1 \
                and not is_channels_last_3d(output):
            not_cl.append(type(module).__name__)

    hooks = [m.register_forward_hook(check) for m in cl.modules()]
    logits_a, grads_a = run(plain, x, y)
    logits_b, grads_b = run(cl, channels_last_input(x), y)
    for h in hooks:
        h.remove()
    assert not not_cl, f"modules that returned a non-channels-last feature map: {sorted(set(not_cl))}"
    assert relative_distance([logits_b], [logits_a]) < 1e-5
    assert relative_distance(grads_b, grads_a) < 1e-5
    # an ordinary (NCDHW) input is converted on the way in: same values, channels-last logits
    with torch.no_grad():
        out = cl.eval()(x)
        assert is_channels_last_3d(out)
        torch.testing.assert_close(out, plain.eval()(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("script", ["3_train", "4_predict", "abus_train"])
def test_scripts_take_the_channels_last_flag(script):
    parse = importlib.import_module(script).build_parser().parse_args
    assert parse([]).channels_last == "auto"
    assert parse(["--channels_last", "off"]).channels_last == "off"
    with pytest.raises(SystemExit):
        parse(["--channels_last", "maybe"])


@pytest.mark.parametrize("mode", ["mamba", "all"])
def test_channels_last_with_activation_checkpointing(mode):
    """The two memory/speed settings combine (3_train.py --activation_checkpointing on CUDA, where channels-last
    is the default): recomputed blocks give the same logits and gradients and stay channels-last."""
    torch.manual_seed(1)
    x = torch.randn(2, 4, 32, 32, 32)
    y = torch.randint(0, 3, (2, 32, 32, 32))
    plain = use_channels_last(small_segmamba().train())
    ckpt = use_channels_last(small_segmamba().train())
    ckpt.set_activation_checkpointing(mode)
    logits_a, grads_a = run(plain, x, y)
    logits_b, grads_b = run(ckpt, x, y)
    assert is_channels_last_3d(logits_b)
    torch.testing.assert_close(logits_b, logits_a, rtol=0, atol=0)
    assert relative_distance(grads_b, grads_a) < 1e-6


def test_setting_resolution():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert should_use_channels_last("auto", cuda, compiled=True)
    assert not should_use_channels_last("auto", cuda, compiled=False)  # eager training: twice the memory
    assert should_use_channels_last("auto", cuda, compiled=False, training=False)  # eager inference: faster
    assert not should_use_channels_last("auto", cpu, compiled=False, training=False)
    assert not should_use_channels_last("auto", cpu, compiled=True)
    assert should_use_channels_last("on", cpu, compiled=False)
    assert not should_use_channels_last("off", cuda, compiled=True)
    with pytest.raises(ValueError, match="channels_last"):
        should_use_channels_last("yes", cuda, compiled=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (cuDNN's channels-last convolutions)")
@pytest.mark.parametrize("amp", [None, torch.float16])
def test_segmamba_channels_last_on_cuda_as_accurate_as_default(amp, monkeypatch):
    """On the GPU (CUDA kernels, cuDNN, optionally fp16 autocast) the channels-last model is as close to a
    float64 CPU run of the same network as the default layout is. (The two layouts use different cuDNN
    algorithms, so they do not match each other bit for bit; TF32 is switched off so that float32 is float32.
    Measured on an H200, float32, distance of logits / of all gradients together: default 1.0e-6 / 1.18e-3,
    channels-last 1.0e-6 / 1.08e-3.)"""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(1)
    x = torch.randn(2, 4, 32, 32, 32)
    y = torch.randint(0, 3, (2, 32, 32, 32))
    logits_ref, grads_ref = run(small_segmamba().double().train(), x.double(), y)
    errors = {}
    for layout in ("default", "channels_last"):
        model = small_segmamba().cuda().train()
        if layout == "channels_last":
            use_channels_last(model)
        with torch.autocast("cuda", dtype=amp or torch.float16, enabled=amp is not None):
            logits, grads = run(model, x.cuda(), y.cuda())
        assert is_channels_last_3d(logits) == (layout == "channels_last")
        errors[layout] = (relative_distance([logits.cpu()], [logits_ref]),
                          relative_distance([g.cpu() for g in grads], grads_ref))
    (fwd_a, grad_a), (fwd_b, grad_b) = errors["default"], errors["channels_last"]
    limit = 5e-2 if amp else 1e-2
    assert max(fwd_a, grad_a) < limit, errors
    assert fwd_b <= 2 * fwd_a + 1e-6 and grad_b <= 2 * grad_a + 1e-6, errors
