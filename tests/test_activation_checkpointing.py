"""SegMamba.set_activation_checkpointing: the full-resolution blocks are recomputed in the backward pass
instead of keeping their activations. Same outputs and gradients as without it, fewer bytes kept for the
backward pass, nothing changes in evaluation mode or in checkpoints; 3_train.py exposes it as a flag."""
import importlib

import torch

from model_segmamba import SegMamba


def small_segmamba():
    torch.manual_seed(0)
    return SegMamba(4, 3, feat_size=(8, 16, 32, 64), hidden_size=64)


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


def test_checkpointing_keeps_results_and_saves_memory():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 32, 32, 32)
    y = torch.randint(0, 3, (2, 32, 32, 32))
    plain = small_segmamba().train()
    ckpt = small_segmamba().train()
    ckpt.set_activation_checkpointing(True)
    out_a, grads_a, kept_a = step(plain, x, y)
    out_b, grads_b, kept_b = step(ckpt, x, y)
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 100
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)
    # the three full-resolution blocks hold a large share of what the backward keeps (about a third for this
    # narrow network at 32³, about half for the full-size one at 128³): without checkpointing there is no drop
    assert kept_b < 0.75 * kept_a, (kept_a, kept_b)


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
    train = importlib.import_module("3_train")
    assert train.build_parser().parse_args([]).activation_checkpointing is False
    assert train.build_parser().parse_args(["--activation_checkpointing"]).activation_checkpointing is True
