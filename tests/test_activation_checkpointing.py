"""SegMamba.set_activation_checkpointing: the Mamba layers and/or the full-resolution blocks are recomputed in
the backward pass instead of keeping their activations. Same outputs and gradients as without it, fewer
bytes kept for the backward pass, nothing changes in evaluation mode or in checkpoints; 3_train.py exposes
it as a flag."""
import importlib

import pytest
import torch

from _small_models import relative_distance, small_segmamba


def step(model, x, y):
    """Logits and every parameter gradient of one cross-entropy step, plus the bytes autograd kept for it."""
    model.zero_grad(set_to_none=True)
    storages = {}

    def pack(t):
        storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = sum(n for ptr, n in storages.items() if ptr not in weights)
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, kept


@pytest.mark.parametrize("mode, share", [("full_res", 0.8), ("mamba", 0.8), ("all", 0.4)])
def test_checkpointing_keeps_results_and_saves_memory(mode, share):
    torch.manual_seed(1)
    x = torch.randn(2, 4, 32, 32, 32)
    y = torch.randint(0, 3, (2, 32, 32, 32))
    plain = small_segmamba().train()
    ckpt = small_segmamba().train()
    ckpt.set_activation_checkpointing(mode)
    out_a, grads_a, kept_a = step(plain, x, y)
    out_b, grads_b, kept_b = step(ckpt, x, y)
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 100
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)
    # for this narrow network at 32³ the full-resolution blocks and the Mamba layers each hold about a third
    # of what the backward pass keeps (about 45% and a quarter for the full-size one at 128³); without
    # checkpointing there is no drop
    assert kept_b < share * kept_a, (kept_a, kept_b)


def test_checkpointing_modes_and_errors():
    model = small_segmamba()
    layers = [m for m in model.modules() if type(m).__name__ == "MambaLayer"]
    assert len(layers) == 8
    for mode, full_res, mamba in [("off", False, False), ("mamba", False, True), ("full_res", True, False),
                                  ("all", True, True), (True, False, True), (False, False, False)]:
        model.set_activation_checkpointing(mode)
        assert model.checkpoint_full_res is full_res and all(m.checkpoint is mamba for m in layers), mode
    with pytest.raises(ValueError, match="mamba"):
        model.set_activation_checkpointing("encoder")


def test_checkpointing_is_training_only_and_not_in_state_dict():
    model = small_segmamba()
    keys = list(model.state_dict())
    model.set_activation_checkpointing(True)
    assert list(model.state_dict()) == keys
    model.eval()
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad():
        a = model(x)
    model.set_activation_checkpointing(False)
    with torch.no_grad():
        b = model(x)
    assert torch.equal(a, b)


def test_train_script_flag():
    from model_segmamba.segmamba import CHECKPOINT_MODES
    train = importlib.import_module("3_train")
    parse = train.build_parser().parse_args
    assert set(train.CHECKPOINT_DESCRIPTIONS) == set(CHECKPOINT_MODES)
    assert parse([]).activation_checkpointing == "off"
    assert parse(["--activation_checkpointing"]).activation_checkpointing == "mamba"
    assert parse(["--activation_checkpointing", "all"]).activation_checkpointing == "all"
    with pytest.raises(SystemExit):
        parse(["--activation_checkpointing", "everything"])


def gradient_distance(grads, reference):
    """‖grads − reference‖ / ‖reference‖ over all parameters together, as one vector."""
    assert grads.keys() == reference.keys()
    return relative_distance([grads[n] for n in reference], list(reference.values()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the kernels run again in the backward pass)")
@pytest.mark.parametrize("mode", ["mamba", "all"])
@pytest.mark.parametrize("amp", [None, torch.float16])
def test_checkpointing_on_cuda_matches_plain(mode, amp, monkeypatch):
    """On the GPU (CUDA scan and conv1d kernels, optionally fp16 autocast) the recomputed forward pass gives
    the same logits as keeping the activations, and gradients no further from the plain run's than a second
    plain run's are. (With cuDNN's default algorithms two float32 runs differ by about 1e-4: its backward
    convolutions sum in varying order. Measured on an H200: 1.25e-4 plain vs plain, 1.31e-4 "mamba" and
    1.27e-4 "all" vs plain; fp16 autocast: identical.)"""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.manual_seed(1)
    x = torch.randn(2, 4, 32, 32, 32, device="cuda")
    y = torch.randint(0, 3, (2, 32, 32, 32), device="cuda")
    results = []
    for checkpointing in ("off", "off", mode):
        model = small_segmamba().cuda().train()
        model.set_activation_checkpointing(checkpointing)
        with torch.autocast("cuda", dtype=amp or torch.float16, enabled=amp is not None):
            results.append(step(model, x, y))
    (out_a, grads_a, kept_a), (_, grads_again, _), (out_b, grads_b, kept_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    run_to_run = gradient_distance(grads_again, grads_a)
    assert run_to_run < 1e-3
    assert gradient_distance(grads_b, grads_a) <= 10 * run_to_run + 1e-6, (gradient_distance(grads_b, grads_a),
                                                                           run_to_run)
    assert kept_b < kept_a
