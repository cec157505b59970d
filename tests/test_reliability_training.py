"""Training under faults (issue 7): a really killed training script resumes to the state an uninterrupted run
reaches, and NaN/Inf steps are skipped, counted and logged, and stop training after a set number in a row
without ever writing non-finite weights. Both training scripts that the issue names: 3_train.py (BraTS) and
abus_retina_train.py (ABUS detection).
"""
from __future__ import annotations

import os
import signal
import sys

import numpy as np
import pytest
import torch

from _reliability_data import (TINY_FLAGS, load_script, make_abus_raw, make_brats_raw, preprocess_abus,
                               preprocess_brats, rewrite_case, with_nan)
from light_training.checkpoint import load_checkpoint, tensors_are_finite
from light_training.io import load_case
from light_training.splits import save_splits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_reliability_interruptions import run_script_killed_at  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")


from _reliability_data import one_thread  # noqa: E402,F401  (autouse fixture)


KILL_AT_STEP_3 = """
from light_training.trainer import Trainer
_next_batch = Trainer._next_batch
def _killed_mid_epoch(self):
    if self.global_step == 3:  # epoch 2 of 2, after its first step: that step's work is lost
        os.kill(os.getpid(), signal.SIGKILL)
    return _next_batch(self)
Trainer._next_batch = _killed_mid_epoch
"""


def assert_same_training_state(expected: dict, actual: dict) -> None:
    """Model, optimiser, scheduler, counters, history, selection state and RNG of two checkpoints agree."""
    assert expected["model"].keys() == actual["model"].keys()
    for name, value in expected["model"].items():
        assert torch.equal(value, actual["model"][name]), name
    assert expected["optimizer"]["param_groups"] == actual["optimizer"]["param_groups"]
    for index, state in expected["optimizer"]["state"].items():
        for key, value in state.items():
            other = actual["optimizer"]["state"][index][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (index, key)
    for key in ("scheduler", "epoch", "global_step", "history", "best_metric", "best_epoch", "metrics",
                "nonfinite_total"):
        assert expected[key] == actual[key], key
    assert torch.equal(expected["rng"]["torch"], actual["rng"]["torch"])


# ================================================================================================ BraTS
@pytest.fixture(scope="module")
def brats_training_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("brats_train")
    names = make_brats_raw(root / "raw", n_cases=4)
    assert preprocess_brats(root / "raw", root / "fullres") == 0
    save_splits(root / "splits.json", {"train": names[:2], "val": names[2:3], "test": names[3:]})
    return root, names


def brats_train_args(root, logdir, data_dir=None, *extra):
    return [str(a) for a in ["--data_dir", data_dir or root / "fullres" / "train", "--splits",
                             root / "splits.json", "--logdir", logdir, "--max_epoch", "3",
                             "--iterations_per_epoch", "2", "--val_every", "1", "--batch_size", "1",
                             "--num_workers", "0", "--augmentation", "none", "--roi", "32", "32", "32",
                             "--device", "cpu", "--no_progress", "--no_tensorboard", *TINY_FLAGS, *extra]]


def test_brats_training_killed_mid_epoch_resumes_to_the_uninterrupted_runs_checkpoints(brats_training_data,
                                                                                     tmp_path, monkeypatch):
    root, _ = brats_training_data
    monkeypatch.chdir(tmp_path)
    train = load_script("3_train.py")
    two_epochs = ["--max_epoch", "2"]
    assert train.main(brats_train_args(root, tmp_path / "straight", None, *two_epochs)) == 0

    killed = run_script_killed_at("3_train.py", brats_train_args(root, tmp_path / "killed", None, *two_epochs),
                                  KILL_AT_STEP_3, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    at_kill = load_checkpoint(tmp_path / "killed" / "model" / "final_model.pt")
    assert (at_kill["epoch"], at_kill["global_step"]) == (0, 2)  # the last checkpoint before the kill

    assert train.main(brats_train_args(root, tmp_path / "killed", None, *two_epochs, "--resume")) == 0
    assert "resuming from" in (tmp_path / "killed" / "train.log").read_text()
    for name in ("final_model.pt", "best_model.pt"):
        assert_same_training_state(load_checkpoint(tmp_path / "straight" / "model" / name),
                                   load_checkpoint(tmp_path / "killed" / "model" / name))
    final = load_checkpoint(tmp_path / "killed" / "model" / "final_model.pt")
    assert (final["epoch"], final["global_step"]) == (1, 4)
    assert sorted(os.listdir(tmp_path)) == ["killed", "straight"]  # nothing in the working directory


@pytest.fixture
def brats_nan_data(brats_training_data, tmp_path):
    """A copy of the preprocessed cases whose two training cases hold NaN voxels (validation case intact)."""
    import shutil

    root, names = brats_training_data
    data_dir = tmp_path / "nan_data"
    shutil.copytree(root / "fullres" / "train", data_dir)
    return data_dir, names


def test_brats_training_on_nan_data_stops_after_the_set_number_of_skipped_steps_and_keeps_weights_finite(
        brats_training_data, brats_nan_data, tmp_path, capsys):
    root, _ = brats_training_data
    data_dir, names = brats_nan_data
    for name in names[:2]:
        rewrite_case(data_dir / f"{name}.npz", data=np.full_like(load_case(data_dir / f"{name}.npz")[0], np.nan))
    code = load_script("3_train.py").main(brats_train_args(root, tmp_path / "run", data_dir,
                                                           "--max_nonfinite_steps", "3"))
    assert code == 1
    err = capsys.readouterr().err
    assert "3 consecutive training steps had a non-finite loss or gradient" in err
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("non-finite loss") == 3 and "(3 in a row, 3 in total, limit 3)" in log
    # epoch 1 ended with two skipped steps, so its checkpoint holds the untouched initial weights
    checkpoint = load_checkpoint(tmp_path / "run" / "model" / "final_model.pt")
    assert checkpoint["epoch"] == 0 and checkpoint["nonfinite_total"] == 2
    assert tensors_are_finite(checkpoint["model"].values())
    assert checkpoint["optimizer"]["state"] == {}  # no optimiser step was ever applied


def test_brats_training_skips_and_counts_sporadic_nan_steps_and_finishes(brats_training_data, brats_nan_data,
                                                                        tmp_path):
    root, _ = brats_training_data
    data_dir, names = brats_nan_data
    case = data_dir / f"{names[0]}.npz"
    rewrite_case(case, data=with_nan(load_case(case)[0]))  # one NaN voxel in one of the two training cases
    args = brats_train_args(root, tmp_path / "run", data_dir, "--max_nonfinite_steps", "3")
    args[args.index("--max_epoch") + 1] = "1"
    args[args.index("--iterations_per_epoch") + 1] = "6"
    assert load_script("3_train.py").main(args) == 0
    checkpoint = load_checkpoint(tmp_path / "run" / "model" / "final_model.pt")
    skipped = checkpoint["nonfinite_total"]
    assert 0 < skipped < checkpoint["global_step"] == 6
    assert tensors_are_finite(checkpoint["model"].values())
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("step skipped") == skipped
    assert sum(int(line.split(", ")[-1].split(" ")[0]) for line in log.splitlines()
               if "non-finite step(s) skipped" in line) == skipped  # the per-epoch count in the log


# ================================================================================================= ABUS
@pytest.fixture(scope="module")
def abus_training_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("abus_train")
    make_abus_raw(root / "raw", num_cases=4)
    assert preprocess_abus(root / "raw", root / "abus", 0.5, 0.5) == 0
    return root


def retina_train_args(root, save_dir, train_dir=None, *extra):
    return [str(a) for a in ["--data_dir_train", train_dir or root / "abus" / "train", "--data_dir_val",
                             root / "abus" / "val", "--save_dir", save_dir, "--max_epoch", "3",
                             "--iterations_per_epoch", "2", "--batch_size", "1", "--fpn_channels", "8",
                             "--num_head_convs", "1", "--num_workers", "0", "--device", "cpu",
                             "--det_warmup_epochs", "2", "--patch_size", "32", "32", "32", "--no_progress",
                             *TINY_FLAGS, *extra]]


def test_abus_retina_training_killed_mid_epoch_resumes_to_the_uninterrupted_runs_checkpoints(abus_training_data,
                                                                                           tmp_path, monkeypatch):
    root = abus_training_data
    monkeypatch.chdir(tmp_path)
    train = load_script("abus_retina_train.py")
    two_epochs = ["--max_epoch", "2"]
    assert train.main(retina_train_args(root, tmp_path / "straight", None, *two_epochs)) == 0

    killed = run_script_killed_at("abus_retina_train.py", retina_train_args(root, tmp_path / "killed", None,
                                                                            *two_epochs), KILL_AT_STEP_3, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    at_kill = load_checkpoint(tmp_path / "killed" / "model" / "final_model.pt")
    assert (at_kill["epoch"], at_kill["global_step"]) == (0, 2)

    assert train.main(retina_train_args(root, tmp_path / "killed", None, *two_epochs, "--resume")) == 0
    for name in ("final_model.pt", "best_model.pt"):
        assert_same_training_state(load_checkpoint(tmp_path / "straight" / "model" / name),
                                   load_checkpoint(tmp_path / "killed" / "model" / name))
    assert load_checkpoint(tmp_path / "killed" / "model" / "final_model.pt")["global_step"] == 4
    assert sorted(os.listdir(tmp_path)) == ["killed", "straight"]


def test_abus_retina_training_on_nan_data_stops_with_a_clear_error_and_never_writes_nan_weights(
        abus_training_data, tmp_path, capsys):
    import shutil

    root = abus_training_data
    train_dir = tmp_path / "train"
    shutil.copytree(root / "abus" / "train", train_dir)
    for case in train_dir.glob("*.npz"):
        rewrite_case(case, data=np.full_like(load_case(case)[0], np.nan))
    code = load_script("abus_retina_train.py").main(
        retina_train_args(root, tmp_path / "run", train_dir, "--max_nonfinite_steps", "3"))
    assert code == 1
    err = capsys.readouterr().err
    assert "error: 3 consecutive training steps had a non-finite loss or gradient" in err and "Traceback" not in err
    assert (tmp_path / "run" / "train.log").read_text().count("step skipped") == 3
    for checkpoint in (tmp_path / "run" / "model").glob("*.pt"):
        state = load_checkpoint(checkpoint)
        assert tensors_are_finite(state["model"].values()) and state["nonfinite_total"] == 2


# ======================================================================================== schedule on resume
def test_resuming_with_more_epochs_continues_the_learning_rate_on_the_longer_schedule(tmp_path):
    from light_training.lr_scheduler import poly_lr
    from light_training.trainer import Trainer, TrainerConfig

    def batches(start_batch=0):
        index = start_batch
        while True:
            rng = np.random.default_rng(index)
            data = torch.from_numpy(rng.normal(size=(1, 1, 4, 4, 4)).astype(np.float32))
            yield {"data": data, "seg": (data > 0).long()}
            index += 1

    class RecordingTrainer(Trainer):
        rates: list = []

        def training_step(self, batch):
            self.rates.append(self.optimizer.param_groups[0]["lr"])  # the rate this step is taken with
            return super().training_step(batch)

    def trainer(max_epochs):
        torch.manual_seed(0)
        model = torch.nn.Conv3d(1, 2, 1)
        config = TrainerConfig(logdir=str(tmp_path / "run"), max_epochs=max_epochs, iterations_per_epoch=3,
                               progress_bar=False, tensorboard=False)
        return RecordingTrainer(model, config, batches)

    trainer(2).fit()  # 6 steps, schedule of 6 steps: its last step ran at poly_lr(0.01, 5, 6)
    RecordingTrainer.rates = []
    longer = trainer(4)
    longer.fit(resume=True)  # steps 6..11 of a 12-step schedule
    expected = [poly_lr(0.01, step, 12) for step in range(6, 12)]
    assert RecordingTrainer.rates == pytest.approx(expected, rel=1e-12)
    assert RecordingTrainer.rates[0] == pytest.approx(0.01 * 0.5 ** 0.9)  # not 0, the old schedule's end
