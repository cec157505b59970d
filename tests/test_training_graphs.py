"""Training steps through CUDA graphs (light_training.cuda_graphs.GraphedTrainingStep, TrainerConfig.cuda_graphs,
3_train.py / abus_train.py --cuda_graphs).

CPU: the setting is validated, resolves to "not used" without CUDA (with a warning for "on"), and training is
then exactly the ordinary loop; a GraphedTrainingStep given CPU tensors is a plain forward/backward.
The trainer's graphed branch, driven on the CPU (where the step runs eagerly), trains to exactly the weights
of the ordinary loop and releases the step's graphs before every validation and at close().
GPU (skipped without CUDA): gradients and losses replayed from the graph equal an eager forward/backward of the
same network on fresh batches after the capture (fp32, and fp16 with a GradScaler), also after
``zero_grad(set_to_none=True)``; a second batch shape gets its own graph; release() returns the memory and the
next call captures again; a loss that synchronises with the host cannot be captured and falls back to eager
results, saying so; a Trainer with cuda_graphs="on" trains to the same weights as one without, and a Trainer
subclass with its own training_step does not use graphs.
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from _small_models import relative_distance, small_segmamba
from light_training.cuda_graphs import GraphedTrainingStep
from light_training.distributed import DistributedContext
from light_training.trainer import SegmentationLoss, Trainer, TrainerConfig
from test_trainer import ScriptedValidator, ToyBatchStream, config, tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


# ------------------------------------------------------------------------------------------------ CPU
def test_config_rejects_unknown_setting(tmp_path):
    with pytest.raises(ValueError, match="cuda_graphs"):
        config(tmp_path, cuda_graphs="yes")


def test_cpu_training_with_graphs_on_is_the_ordinary_loop_and_says_so(tmp_path):
    runs = {}
    for setting in ("off", "on"):
        trainer = Trainer(tiny_model(), config(tmp_path / setting, cuda_graphs=setting), ToyBatchStream())
        assert trainer.cuda_graphs is False and trainer._graphed_step is None
        trainer.fit()
        trainer.close()
        runs[setting] = trainer.model.state_dict()
    message = "CUDA graphs for training steps not used: they need a CUDA device"
    assert message in (tmp_path / "on" / "run" / "train.log").read_text()
    assert message not in (tmp_path / "off" / "run" / "train.log").read_text()
    for name, tensor in runs["off"].items():
        assert torch.equal(runs["on"][name], tensor), name


def test_graphed_step_on_cpu_tensors_is_a_plain_forward_backward():
    model = tiny_model()
    data = torch.randn(2, 1, 8, 8, 8)
    target = (data > 0).long()[:, 0]
    step = GraphedTrainingStep(lambda x, y: F.cross_entropy(model(x), y), model.parameters(),
                               scale=lambda loss: loss * 4)
    step(data, target)  # a second call overwrites the gradients, as a replay does
    loss = step(data, target)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    reference = F.cross_entropy(model(data), target)
    (reference * 4).backward()
    assert torch.equal(loss, reference.detach()) and step.graphs == {}
    for g, p in zip(grads, model.parameters()):
        assert torch.equal(g, p.grad)


class CountingStep(GraphedTrainingStep):
    releases = 0

    def release(self):
        CountingStep.releases += 1
        super().release()


def test_trainer_loop_with_a_graphed_step_trains_like_the_ordinary_loop_and_releases_before_validation(tmp_path):
    """The trainer's graphed branch (backward inside the step, not again after it), driven on the CPU where the
    step runs eagerly: same weights as the ordinary loop, exactly; the step's graphs are released before each
    validation (so validation gets their memory) and at close()."""
    runs = {}
    for graphed in (False, True):
        trainer = Trainer(tiny_model(), config(tmp_path / str(graphed)), ToyBatchStream(),
                          validator=ScriptedValidator([0.1, 0.2]))
        if graphed:
            trainer._graphed_step = CountingStep(trainer.compute_loss, trainer.model.parameters(),
                                                 scale=trainer.scaler.scale, autocast=trainer._autocast)
        trainer.fit()
        assert CountingStep.releases == (2 if graphed else 0)  # val_every=1, two epochs
        trainer.close()
        runs[graphed] = trainer.model.state_dict()
    assert CountingStep.releases == 3
    for name, tensor in runs[False].items():
        assert torch.equal(runs[True][name], tensor), name


def test_release_without_graphs_leaves_gradients_alone():
    model = tiny_model()
    step = GraphedTrainingStep(lambda x, y: F.cross_entropy(model(x), y), model.parameters())
    x = torch.randn(2, 1, 8, 8, 8)
    step(x, (x > 0).long()[:, 0])
    grads = [p.grad for p in model.parameters()]
    step.release()
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))


@pytest.mark.parametrize("script", ["3_train", "abus_train"])
def test_training_scripts_default_to_auto(script):
    module = importlib.import_module(script)
    assert module.build_parser().parse_args([]).cuda_graphs == "auto"
    assert module.build_parser().parse_args(["--cuda_graphs", "off"]).cuda_graphs == "off"
    with pytest.raises(SystemExit):
        module.build_parser().parse_args(["--cuda_graphs", "maybe"])


# ------------------------------------------------------------------------------------------------ GPU
@pytest.fixture(autouse=True)
def exact_float32(monkeypatch):
    """fp32 comparisons without TF32 (cuDNN and cuBLAS would otherwise round convolutions and GEMMs to 10-bit
    mantissas, differently for each algorithm they pick)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def segmamba_loss(model):
    def loss_of(x, y):
        return F.cross_entropy(model(x).float(), y)
    return loss_of


def batches(n, seed, shape=(2, 4, 32, 32, 32)):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return [(torch.randn(shape, device="cuda", generator=generator),
             torch.randint(0, 3, (shape[0],) + shape[2:], device="cuda", generator=generator)) for _ in range(n)]


def eager_step(model, loss_of, scale, autocast, x, y):
    model.zero_grad(set_to_none=True)
    with autocast():
        loss = loss_of(x, y)
    scale(loss).backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@cuda
@pytest.mark.parametrize("amp", [None, torch.float16])
def test_replayed_gradients_match_eager_on_fresh_batches(amp):
    model = small_segmamba().cuda().train()
    loss_of = segmamba_loss(model)
    scaler = torch.amp.GradScaler("cuda", enabled=amp is not None, init_scale=2.0 ** 10)

    def autocast():
        return torch.autocast("cuda", dtype=amp or torch.float16, enabled=amp is not None, cache_enabled=False)

    step = GraphedTrainingStep(loss_of, model.parameters(), scale=scaler.scale, autocast=autocast)
    tol = 1e-4 if amp is None else 5e-3
    for i, (x, y) in enumerate(batches(3, seed=1)):
        model.zero_grad(set_to_none=True)  # as the trainer does: the replay re-attaches its gradient buffers
        loss = step(x, y)
        graphed = [p.grad.clone() for p in model.parameters()]
        reference_loss, reference = eager_step(model, loss_of, scaler.scale, autocast, x, y)
        assert abs(loss.item() - reference_loss.item()) <= tol * abs(reference_loss.item())
        assert relative_distance(graphed, reference) <= tol, i
    assert step.replays == 2 and len(step.graphs) == 1


@cuda
def test_second_batch_shape_gets_its_own_graph_and_both_stay_right():
    model = small_segmamba().cuda().train()
    loss_of = segmamba_loss(model)
    step = GraphedTrainingStep(loss_of, model.parameters())
    small = batches(2, seed=2, shape=(1, 4, 32, 32, 32))
    large = batches(2, seed=3)
    for x, y in (large[0], small[0], large[1], small[1]):
        step(x, y)
        graphed = [p.grad.clone() for p in model.parameters()]
        _, reference = eager_step(model, loss_of, lambda t: t, torch.enable_grad, x, y)
        assert relative_distance(graphed, reference) <= 1e-4
    assert len(step.graphs) == 2 and all(g is not None for g in step.graphs.values()) and step.replays == 2


@cuda
def test_release_returns_the_graph_memory_and_the_next_call_captures_again():
    model = small_segmamba().cuda().train()
    loss_of = segmamba_loss(model)
    step = GraphedTrainingStep(loss_of, model.parameters())
    (x0, y0), (x1, y1), (x2, y2) = batches(3, seed=5)
    step(x0, y0)
    step(x1, y1)
    reserved = torch.cuda.memory_reserved()
    step.release()
    assert step.graphs == {} and all(p.grad is None for p in model.parameters())
    assert torch.cuda.memory_reserved() < reserved
    step(x2, y2)  # captures again
    graphed = [p.grad.clone() for p in model.parameters()]
    _, reference = eager_step(model, loss_of, lambda t: t, torch.enable_grad, x2, y2)
    assert relative_distance(graphed, reference) <= 1e-4
    assert len(step.graphs) == 1 and step.replays == 1


@cuda
def test_loss_that_syncs_with_the_host_falls_back_to_eager_and_says_so():
    model = small_segmamba().cuda().train()
    said = []

    def loss_of(x, y):
        loss = F.cross_entropy(model(x).float(), y)
        if loss.item() > 1e9:  # a host synchronisation: not capturable
            loss = loss * 0
        return loss

    step = GraphedTrainingStep(loss_of, model.parameters(), say=said.append)
    for x, y in batches(2, seed=4):
        loss = step(x, y)
        graphed = [p.grad.clone() for p in model.parameters()]
        reference_loss, reference = eager_step(model, loss_of, lambda t: t, torch.enable_grad, x, y)
        assert relative_distance(graphed, reference) <= 1e-4
        assert abs(loss.item() - reference_loss.item()) <= 1e-5 * abs(reference_loss.item())
    assert len(said) == 1 and "training those shapes without CUDA graphs" in said[0]
    assert list(step.graphs.values()) == [None] and step.replays == 0


class SegMambaBatches:
    """BraTS-like batches (4 channels, 3 labels) that depend only on their index."""

    def __init__(self, start_batch: int = 0):
        self.index = start_batch

    def __iter__(self):
        while True:
            generator = torch.Generator().manual_seed(100 + self.index)
            data = torch.randn(2, 4, 32, 32, 32, generator=generator)
            yield {"data": data, "seg": (data[:, :1] > 0.5).long() + (data[:, 1:2] > 1.0).long()}
            self.index += 1


@cuda
@pytest.mark.parametrize("loss", ["ce", "dice_ce"])
def test_trainer_with_graphs_trains_to_the_same_weights(tmp_path, loss):
    if loss == "dice_ce":
        pytest.importorskip("monai")
    runs = {}
    context = DistributedContext(device=torch.device("cuda"))
    for setting in ("off", "on"):
        cfg = config(tmp_path / setting, cuda_graphs=setting, max_epochs=1, iterations_per_epoch=4,
                     deterministic=False, amp_dtype="fp16")
        trainer = Trainer(small_segmamba(), cfg, SegMambaBatches(), loss_fn=SegmentationLoss(loss), context=context)
        assert trainer.cuda_graphs is (setting == "on")
        trainer.fit()
        if setting == "on":
            assert trainer._graphed_step.replays == 3  # the first step captures, the other three replay
        runs[setting] = [t.detach().float().clone() for t in trainer.model.state_dict().values()]
        trainer.close()
    # same batches, same schedule; only floating-point summation order may differ (atomics in the backward)
    assert relative_distance(runs["on"], runs["off"]) <= 1e-4


@cuda
def test_trainer_subclass_with_its_own_training_step_does_not_use_graphs(tmp_path):
    class Custom(Trainer):
        def training_step(self, batch):
            return super().training_step(batch)

    trainer = Custom(small_segmamba(), config(tmp_path, cuda_graphs="on"), SegMambaBatches(),
                     context=DistributedContext(device=torch.device("cuda")))
    assert trainer.cuda_graphs is False
    assert "CUDA graphs for training steps not used: Custom overrides training_step" in \
        (tmp_path / "run" / "train.log").read_text()
