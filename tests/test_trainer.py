"""Trainer behaviour on tiny models and data (CPU): schedule, optimiser step, non-finite guard,
checkpoints and resume, model selection, whole-volume validation."""
from __future__ import annotations

import functools
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from light_training.checkpoint import (CHECKPOINT_FORMAT, CheckpointError, capture_rng_state, load_checkpoint,
                                       restore_rng_state, save_checkpoint_atomic)
from light_training.lr_scheduler import PolyLRScheduler, poly_lr
from light_training.prediction import SlidingWindowConfig
from light_training.trainer import (BEST_CHECKPOINT, FINAL_CHECKPOINT, NonFiniteTrainingError, SegmentationLoss,
                                    Trainer, TrainerConfig, TrainingSetupError, WholeVolumeValidator,
                                    nanmean_metrics)
from model_segmamba.channels_last import is_channels_last_3d

PATCH = (8, 8, 8)


class ToyBatchStream:
    """Batches that depend only on their global index (like the real patch stream)."""

    def __init__(self, start_batch: int = 0, batch_size: int = 2, channels: int = 1):
        self.start_batch, self.batch_size, self.channels = start_batch, batch_size, channels

    def __iter__(self):
        index = self.start_batch
        while True:
            rng = np.random.default_rng([7, index])
            data = rng.normal(size=(self.batch_size, self.channels) + PATCH).astype(np.float32)
            seg = (data[:, :1] > 0.3).astype(np.int64)
            yield {"data": torch.from_numpy(data), "seg": torch.from_numpy(seg)}
            index += 1


def tiny_model(seed: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Dropout3d(dropout),
                               torch.nn.Conv3d(4, 2, 1))


def config(tmp_path, **overrides) -> TrainerConfig:
    values = dict(logdir=str(tmp_path / "run"), max_epochs=2, iterations_per_epoch=3, val_every=1,
                  progress_bar=False, tensorboard=False, deterministic=True)
    values.update(overrides)
    return TrainerConfig(**values)


class ScriptedValidator:
    """Returns a fixed metric sequence, one value per validation call."""

    selection_key = "mean_dice"

    def __init__(self, values):
        self.values, self.calls = list(values), 0

    def num_cases(self):
        return 1

    def evaluate_case(self, model, index, device):
        value = self.values[self.calls]
        self.calls += 1
        return {"mean_dice": value, "dice_a": value / 2}


# ------------------------------------------------------------------------------------------ schedule
def test_poly_lr_is_0_005359_at_half_of_the_run_for_lr0_0_01():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler = PolyLRScheduler(optimizer, total_steps=200)
    seen = []
    for _ in range(200):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(0.01)
    assert seen[100] == pytest.approx(0.005359, abs=5e-7)           # published acceptance value
    assert seen[50] == pytest.approx(0.01 * 0.75 ** 0.9, rel=1e-12)
    assert seen[199] == pytest.approx(0.01 * (1 / 200) ** 0.9, rel=1e-9)
    assert optimizer.param_groups[0]["lr"] == 0.0                    # t = T
    assert poly_lr(0.01, 500, 1000) == pytest.approx(0.005358867, abs=1e-9)


def test_poly_lr_warmup_ramps_linearly_then_decays():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = PolyLRScheduler(optimizer, total_steps=14, warmup_steps=4)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert seen[4] == pytest.approx(1.0)
    assert seen[5] == pytest.approx((1 - 1 / 10) ** 0.9)


def test_trainer_uses_reference_sgd_settings_and_schedule_length(tmp_path):
    trainer = Trainer(tiny_model(), config(tmp_path, max_epochs=5, iterations_per_epoch=7), ToyBatchStream())
    group = trainer.optimizer.param_groups[0]
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.01, 0.99, True, 3e-5)
    assert trainer.total_steps == 35
    assert trainer.config.grad_clip_norm == 12.0
    assert not trainer.scaler.is_enabled()  # CPU: plain fp32, no loss scaling


def test_one_step_equals_hand_computed_clipped_nesterov_sgd(tmp_path):
    """First SGD step: buf = g, update = g + 0.99 * buf with g = clipped grad + wd * p (computed in float64)."""
    model = tiny_model()
    start = {k: v.detach().double().clone() for k, v in model.named_parameters()}
    batch = next(iter(ToyBatchStream(batch_size=2)))
    huge = lambda logits, target: 1000.0 * F.cross_entropy(logits, target[:, 0])  # forces clipping
    trainer = Trainer(model, config(tmp_path, max_epochs=1, iterations_per_epoch=1), [batch], loss_fn=huge)

    reference = tiny_model().double()
    loss = 1000.0 * F.cross_entropy(reference(batch["data"].double()), batch["seg"][:, 0])
    loss.backward()
    grads = {k: p.grad.clone() for k, p in reference.named_parameters()}
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
    assert norm > 12.0
    scale = 12.0 / (norm + 1e-6)

    trainer.fit()
    for name, parameter in model.named_parameters():
        g = grads[name] * scale + 3e-5 * start[name]
        expected = start[name] - 0.01 * (g + 0.99 * g)
        torch.testing.assert_close(parameter.detach().double(), expected, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------- non-finite handling
class StepRecorder(Trainer):
    """Keeps a copy of the parameters at the start of every step."""

    def training_step(self, batch):
        self.snapshots = getattr(self, "snapshots", [])
        self.snapshots.append([p.detach().clone() for p in self.model.parameters()])
        return super().training_step(batch)


def test_nonfinite_loss_skips_the_step_and_leaves_weights_unchanged(tmp_path):
    calls = {"n": 0}

    def loss_with_one_nan(logits, target):
        calls["n"] += 1
        loss = F.cross_entropy(logits, target[:, 0])
        return loss * float("nan") if calls["n"] == 2 else loss

    trainer = StepRecorder(tiny_model(), config(tmp_path, max_epochs=1, iterations_per_epoch=4), ToyBatchStream(),
                           loss_fn=loss_with_one_nan)
    result = trainer.fit()
    assert result.nonfinite_steps == 1
    # step index 1 was skipped: parameters at the start of step 2 equal those at the start of step 1
    for before, after in zip(trainer.snapshots[1], trainer.snapshots[2]):
        assert torch.equal(before, after)
    for before, after in zip(trainer.snapshots[0], trainer.snapshots[1]):
        assert not torch.equal(before, after)
    assert trainer.scheduler.last_epoch == 4  # the schedule still advances once per iteration
    log = (tmp_path / "run" / "train.log").read_text()
    assert "non-finite loss" in log and "step skipped" in log


class NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_nonfinite_gradient_is_skipped_and_counted(tmp_path):
    calls = {"n": 0}

    def loss_with_nan_gradient(logits, target):
        calls["n"] += 1
        if calls["n"] == 1:
            logits = NaNGradient.apply(logits)
        return F.cross_entropy(logits, target[:, 0])

    trainer = StepRecorder(tiny_model(), config(tmp_path, max_epochs=1, iterations_per_epoch=2), ToyBatchStream(),
                           loss_fn=loss_with_nan_gradient)
    result = trainer.fit()
    assert result.nonfinite_steps == 1
    for before, after in zip(trainer.snapshots[0], trainer.snapshots[1]):
        assert torch.equal(before, after)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert "non-finite gradient norm" in (tmp_path / "run" / "train.log").read_text()


def test_consecutive_nonfinite_steps_stop_training_and_never_write_nan_weights(tmp_path):
    state = {"n": 0}

    def nan_from_second_epoch(logits, target):
        state["n"] += 1
        loss = F.cross_entropy(logits, target[:, 0])
        return loss * float("nan") if state["n"] > 3 else loss

    trainer = Trainer(tiny_model(), config(tmp_path, max_epochs=3, iterations_per_epoch=3,
                                           max_consecutive_nonfinite=3), ToyBatchStream(),
                      loss_fn=nan_from_second_epoch, validator=ScriptedValidator([0.1, 0.2, 0.3]))
    with pytest.raises(NonFiniteTrainingError, match="3 consecutive training steps"):
        trainer.fit()
    checkpoint = load_checkpoint(tmp_path / "run" / "model" / FINAL_CHECKPOINT)
    assert checkpoint["epoch"] == 0  # the last good epoch
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())


def test_saving_refuses_nan_weights(tmp_path):
    trainer = Trainer(tiny_model(), config(tmp_path), ToyBatchStream())
    with torch.no_grad():
        next(trainer.model.parameters())[0] = float("nan")
    with pytest.raises(NonFiniteTrainingError, match="NaN/Inf"):
        trainer.save_checkpoint(FINAL_CHECKPOINT)
    assert not (tmp_path / "run" / "model" / FINAL_CHECKPOINT).exists()


# --------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_holds_full_training_state_readable_with_weights_only(tmp_path):
    trainer = Trainer(tiny_model(), config(tmp_path, max_epochs=2, val_every=2), ToyBatchStream(),
                      validator=ScriptedValidator([0.4]), model_config={"in_chans": 1, "out_chans": 2})
    trainer.fit()
    path = tmp_path / "run" / "model" / FINAL_CHECKPOINT
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["format"] == CHECKPOINT_FORMAT
    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "global_step", "config", "model_config",
                "metrics", "best_metric", "best_epoch", "history", "rng"):
        assert key in checkpoint, key
    assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == 6
    assert checkpoint["config"]["learning_rate"] == 0.01 and checkpoint["config"]["max_epochs"] == 2
    assert checkpoint["model_config"] == {"in_chans": 1, "out_chans": 2}
    assert checkpoint["metrics"] == {"mean_dice": 0.4, "dice_a": 0.2}
    assert checkpoint["scheduler"]["last_epoch"] == 6
    assert len(checkpoint["optimizer"]["state"]) == len(list(trainer.model.parameters()))  # momentum buffers
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(checkpoint["model"][name], tensor)
    assert set(checkpoint["rng"]) >= {"python", "numpy", "torch"}


def test_channels_last_training_matches_default_layout_and_checkpoints_load_anywhere(tmp_path):
    """TrainerConfig(channels_last="on"): the model is switched to channels-last weights and inputs, trains to
    the same weights as the default layout, and its checkpoint loads into an ordinary model."""
    runs = {}
    for setting in ("off", "on"):
        model = tiny_model()
        layouts = []  # whether the first convolution's (4-channel) output was channels-last, per step
        model[0].register_forward_hook(lambda m, i, out: layouts.append(is_channels_last_3d(out)))
        trainer = Trainer(model, config(tmp_path / setting, channels_last=setting), ToyBatchStream())
        assert trainer.channels_last is (setting == "on")
        trainer.fit()
        assert len(layouts) == 6 and set(layouts) == {setting == "on"}
        runs[setting] = trainer.model
    for (name, a), b in zip(runs["off"].state_dict().items(), runs["on"].state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    checkpoint = torch.load(tmp_path / "on" / "run" / "model" / FINAL_CHECKPOINT, map_location="cpu",
                            weights_only=True)
    plain = tiny_model()
    plain.load_state_dict(checkpoint["model"])
    for name, tensor in runs["on"].state_dict().items():
        assert torch.equal(plain.state_dict()[name], tensor)
    with pytest.raises(ValueError, match="channels_last"):
        config(tmp_path, channels_last="yes")


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    save_checkpoint_atomic({"rng": capture_rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_interrupted_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "model" / "final_model.pt"
    save_checkpoint_atomic({"epoch": 1}, path)
    original_save = torch.save

    def dying_save(obj, handle, *args, **kwargs):
        handle.write(b"partial bytes")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint_atomic({"epoch": 2}, path)
    monkeypatch.setattr(torch, "save", original_save)
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(path.parent) == ["final_model.pt"]  # no temporary file left behind


def test_resume_removes_partial_checkpoints_of_killed_writers_but_not_of_live_ones(tmp_path):
    """A SIGKILL during save_checkpoint_atomic leaves its temporary '.tmp-PID-ID-final_model.pt' (hundreds of
    MB for the real model); the next start removes it, unless the writing process still runs."""
    Trainer(tiny_model(), config(tmp_path, max_epochs=1), ToyBatchStream()).fit()
    model_dir = tmp_path / "run" / "model"
    writer = subprocess.Popen([sys.executable, "-c", "import os, sys, time\n"
                               f"open(os.path.join({str(model_dir)!r}, '.tmp-%d-0badf00d-final_model.pt' % os.getpid()), "
                               "'wb').write(b'partial'); print('written', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "written"
    dead = f".tmp-{writer.pid}-0badf00d-final_model.pt"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (model_dir / f".tmp-{live.pid}-0badf00d-best_model.pt").write_bytes(b"still being written")
        (model_dir / "notes.tmp-1").write_bytes(b"not a checkpoint temporary")
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        Trainer(tiny_model(), config(tmp_path, max_epochs=2), ToyBatchStream()).fit(resume=True)
        names = sorted(p.name for p in model_dir.iterdir())
        assert dead not in names
        assert f".tmp-{live.pid}-0badf00d-best_model.pt" in names and "notes.tmp-1" in names
        assert "removed 1 partial checkpoint" in (tmp_path / "run" / "train.log").read_text()
    finally:
        live.kill()
        live.wait()
        writer.stdout.close()


def test_unreadable_checkpoint_error_names_the_file(tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pt"):
        load_checkpoint(broken)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_resume_into_a_different_model_is_refused_with_the_file_name(tmp_path):
    Trainer(tiny_model(), config(tmp_path, max_epochs=1), ToyBatchStream()).fit()
    wider = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Dropout3d(0.0),
                                torch.nn.Conv3d(8, 2, 1))
    with pytest.raises(CheckpointError, match="final_model.pt does not fit"):
        Trainer(wider, config(tmp_path, max_epochs=2), ToyBatchStream()).fit(resume=True)


def test_fresh_run_refuses_to_overwrite_an_existing_run(tmp_path):
    Trainer(tiny_model(), config(tmp_path, max_epochs=1), ToyBatchStream()).fit()
    with pytest.raises(TrainingSetupError, match="--resume"):
        Trainer(tiny_model(), config(tmp_path, max_epochs=1), ToyBatchStream()).fit()
    Trainer(tiny_model(), config(tmp_path, max_epochs=1), ToyBatchStream()).fit(overwrite=True)


# ---------------------------------------------------------------------------------------------- resume
class KilledAfterEpoch(Trainer):
    def __init__(self, *args, kill_after: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.kill_after = kill_after

    def on_epoch_end(self, epoch):
        if epoch == self.kill_after:
            raise KeyboardInterrupt("simulated kill")


def assert_same_training_state(a: dict, b: dict) -> None:
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for index, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][index]["momentum_buffer"])
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    assert a["scheduler"] == b["scheduler"]
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    assert a["history"] == b["history"]
    assert (a["best_metric"], a["best_epoch"]) == (b["best_metric"], b["best_epoch"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert torch.equal(a["rng"]["numpy"]["keys"], b["rng"]["numpy"]["keys"])
    assert a["rng"]["python"] == b["rng"]["python"]


@pytest.mark.parametrize("data_kind", ["toy_stream", "patch_loader"])
def test_resume_after_kill_reaches_the_same_state_as_an_uninterrupted_run(tmp_path, data_kind):
    if data_kind == "toy_stream":
        factory = lambda start_batch: ToyBatchStream(start_batch)  # noqa: E731
    else:
        factory = real_patch_loader_factory(tmp_path)
    validator_values = [0.3, 0.6, 0.5, 0.7]
    settings = dict(max_epochs=4, iterations_per_epoch=3, val_every=2)

    uninterrupted = Trainer(tiny_model(dropout=0.3), config(tmp_path / "a", **settings), factory,
                            validator=ScriptedValidator(validator_values))
    uninterrupted.fit()

    killed = KilledAfterEpoch(tiny_model(dropout=0.3), config(tmp_path / "b", **settings), factory,
                              validator=ScriptedValidator(validator_values), kill_after=1)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    after_kill = load_checkpoint(tmp_path / "b" / "run" / "model" / FINAL_CHECKPOINT)
    assert after_kill["epoch"] == 1

    # a new process: other initial weights and RNG, everything must come from the checkpoint
    torch.manual_seed(12345)
    np.random.seed(12345)
    resumed = Trainer(tiny_model(seed=99, dropout=0.3), config(tmp_path / "b", **settings), factory,
                      validator=ScriptedValidator(validator_values[1:]))
    result = resumed.fit(resume=True)
    assert result.last_epoch == 3

    for name in (FINAL_CHECKPOINT, BEST_CHECKPOINT):
        assert_same_training_state(load_checkpoint(tmp_path / "a" / "run" / "model" / name),
                                   load_checkpoint(tmp_path / "b" / "run" / "model" / name))


def real_patch_loader_factory(tmp_path):
    """The data helper's patch stream over two tiny preprocessed cases, as 3_train.py builds it."""
    from light_training.dataloading import CaseDataset, make_patch_loader
    from light_training.io import save_case

    folder = tmp_path / "cases"
    for index in range(2):
        rng = np.random.default_rng(index)
        data = rng.normal(size=(1, 12, 10, 11)).astype(np.float32)
        seg = (data > 0.5).astype(np.int8)
        locations = {"1": np.argwhere(seg[0] == 1)[:50].tolist()}
        save_case(folder, f"case{index}", data, seg, {"class_locations": locations})
    dataset = CaseDataset.from_folder(folder)
    return functools.partial(make_patch_loader, dataset, PATCH, 2, seed=5, rank=0)


# ------------------------------------------------------------------------------- validation and output
def test_model_selection_keeps_the_best_validation_epoch_under_fixed_file_names(tmp_path):
    validator = ScriptedValidator([0.2, 0.5, 0.3])
    trainer = Trainer(tiny_model(), config(tmp_path, max_epochs=3, tensorboard=True), ToyBatchStream(),
                      validator=validator)
    result = trainer.fit()
    trainer.close()
    model_dir = tmp_path / "run" / "model"
    assert sorted(os.listdir(model_dir)) == ["best_model.pt", "final_model.pt"]
    best, final = load_checkpoint(model_dir / BEST_CHECKPOINT), load_checkpoint(model_dir / FINAL_CHECKPOINT)
    assert (best["epoch"], best["metrics"]["mean_dice"]) == (1, 0.5)
    assert (final["epoch"], final["metrics"]["mean_dice"], final["best_metric"]) == (2, 0.3, 0.5)
    assert (result.best_epoch, result.best_metric) == (1, 0.5)
    assert final["history"]["validation"]["mean_dice"] == [0.2, 0.5, 0.3]
    assert final["history"]["validation_epochs"] == [0, 1, 2]
    run_dir = tmp_path / "run"
    assert (run_dir / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir))
    log = (run_dir / "train.log").read_text()
    assert "validation after epoch 2" in log and "new best mean_dice" in log


def test_validation_runs_every_val_every_epochs_and_at_the_end(tmp_path):
    validator = ScriptedValidator([0.1, 0.2, 0.3])
    Trainer(tiny_model(), config(tmp_path, max_epochs=5, val_every=2), ToyBatchStream(), validator=validator).fit()
    history = load_checkpoint(tmp_path / "run" / "model" / FINAL_CHECKPOINT)["history"]
    assert history["validation_epochs"] == [1, 3, 4]


def test_whole_volume_validator_scores_every_voxel_of_a_volume_larger_than_the_patch():
    """A 'perfect' model (logits = one-hot of channel 0) scores Dice 1 only if windows cover the volume."""
    labels = np.zeros((1, 21, 13, 30), np.int64)
    labels[0, 2:19, 3:12, 25:30] = 1
    labels[0, 0, 0, 0] = 1  # a corner voxel
    labels[0, -1, -1, -1] = 1  # the opposite corner
    data = labels.astype(np.float32)

    class OneHot(torch.nn.Module):
        def forward(self, x):
            return torch.cat([10 * (1 - x), 10 * x], dim=1)

    def dice(pred, gt):
        return {"dice": 2.0 * np.sum((pred == 1) & (gt == 1)) / (np.sum(pred == 1) + np.sum(gt == 1))}

    validator = WholeVolumeValidator(lambda i: (data, labels), 1, SlidingWindowConfig(roi_size=PATCH, overlap=0.5),
                                     dice, selection_key="dice")
    assert validator.evaluate_case(OneHot(), 0, torch.device("cpu")) == {"dice": 1.0}


def test_nanmean_metrics_ignores_nan_cases():
    summary = nanmean_metrics([{"a": 1.0, "b": math.nan}, {"a": 0.0, "b": math.nan}, {"a": math.nan}])
    assert summary["a"] == 0.5 and math.isnan(summary["b"])


def test_segmentation_loss_treats_outside_marker_as_background_and_matches_hand_values():
    logits = torch.zeros(1, 2, 1, 1, 2)
    logits[0, 1, 0, 0, 0] = math.log(3.0)  # p(class 1) = 3/4 at voxel 0
    target = torch.tensor([[[[[1, -1]]]]])
    expected = (-math.log(0.75) - math.log(0.5)) / 2
    assert SegmentationLoss("ce")(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # soft Dice over class 1: intersection 0.75, sums 1.25 + 1 -> 1 - 1.5 / 2.25
    dice = 1 - (2 * 0.75 + 1e-5) / (1.25 + 1 + 1e-5)
    assert SegmentationLoss("dice_ce")(logits, target).item() == pytest.approx(expected + dice, rel=1e-5)
    with pytest.raises(ValueError, match="ce"):
        SegmentationLoss("focal")
