"""Scripts 1 -> 5 of the BraTS pipeline on a tiny generated dataset (CPU), the training/prediction scripts'
documented defaults, resume through the script, and refusals with clear messages."""
from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(filename: str):
    module_name = "script_" + filename[:-3]  # "3_train" is not an importable name on its own
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(ROOT, filename))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run(*arguments: str, timeout: int = 400) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *arguments], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ----------------------------------------------------------------------------------- documented defaults
def test_train_script_defaults_are_the_documented_ones():
    train = load_script("3_train.py")
    args = train.build_parser().parse_args([])
    documented = {"data_dir": "./data/fullres/train", "splits": "./data/fullres/splits.json",
                  "logdir": "./logs/segmamba", "max_epoch": 1000, "batch_size": 2, "val_every": 2,
                  "roi": [128, 128, 128], "num_gpus": 1, "device": "auto", "iterations_per_epoch": 250,
                  "lr": 0.01, "loss": "ce", "amp": "fp16", "seed": 42, "oversample_foreground": 0.33,
                  "feat_size": [48, 96, 192, 384], "depths": [2, 2, 2, 2], "hidden_size": 768,
                  "val_overlap": 0.5, "resume": False}
    for key, value in documented.items():
        assert getattr(args, key) == value, key
    # the constants at the top of the file are the flags' defaults
    assert (train.DATA_DIR, train.LOGDIR, train.MAX_EPOCH, train.BATCH_SIZE, train.VAL_EVERY, tuple(train.ROI),
            train.NUM_GPUS, train.DEVICE) == (args.data_dir, args.logdir, args.max_epoch, args.batch_size,
                                             args.val_every, tuple(args.roi), args.num_gpus, args.device)


def test_predict_script_defaults_are_the_documented_ones():
    predict = load_script("4_predict.py")
    args = predict.build_parser().parse_args([])
    documented = {"data_dir": "./data/fullres/train", "splits": "./data/fullres/splits.json", "split": "test",
                  "checkpoint": "./logs/segmamba/model/best_model.pt", "output_dir": "./prediction_results/segmamba",
                  "roi": [128, 128, 128], "overlap": 0.5, "sw_batch_size": 2, "mirror_tta": True, "device": "auto"}
    for key, value in documented.items():
        assert getattr(args, key) == value, key
    assert (predict.CHECKPOINT, predict.OUTPUT_DIR, tuple(predict.ROI), predict.OVERLAP) == \
        (args.checkpoint, args.output_dir, tuple(args.roi), args.overlap)
    assert predict.build_parser().parse_args(["--no-mirror_tta"]).mirror_tta is False


# ------------------------------------------------------------------------------------------- refusals
def test_train_script_asking_for_more_gpus_than_exist_exits_nonzero_with_a_clear_message(tmp_path):
    import torch
    too_many = torch.cuda.device_count() + 3
    completed = run("3_train.py", "--num_gpus", str(too_many), "--data_dir", str(tmp_path), "--logdir",
                    str(tmp_path / "logs"), timeout=120)
    assert completed.returncode == 2
    assert f"asked for {too_many} GPU(s)" in completed.stderr
    assert not (tmp_path / "logs").exists()


def test_train_script_rejects_a_patch_size_not_divisible_by_16(tmp_path):
    completed = run("3_train.py", "--roi", "40", "32", "32", "--data_dir", str(tmp_path), timeout=60)
    assert completed.returncode == 2 and "multiple of 16" in completed.stderr


def test_predict_script_names_the_missing_checkpoint(tmp_path):
    splits = tmp_path / "splits.json"
    splits.write_text('{"train": ["a"], "val": [], "test": ["b"]}')
    missing = tmp_path / "model" / "best_model.pt"
    completed = run("4_predict.py", "--splits", str(splits), "--checkpoint", str(missing), timeout=120)
    assert completed.returncode == 1
    assert str(missing) in completed.stderr and "final_model.pt" in completed.stderr


# ---------------------------------------------------------------------------------------------- 1 -> 5
TINY_MODEL = ["--feat_size", "4", "8", "16", "32", "--hidden_size", "32", "--roi", "32", "32", "32"]


@pytest.mark.slow
def test_scripts_1_to_5_run_end_to_end_and_write_label_maps_on_the_raw_grid(tmp_path):
    raw = tmp_path / "raw"
    fullres = tmp_path / "fullres"
    splits = fullres / "splits.json"
    logdir = tmp_path / "logs" / "segmamba"
    predictions = tmp_path / "prediction_results"

    steps = [
        ("tools/make_brats_demo.py", "--out", str(raw), "--n_cases", "5", "--shape", "32", "40", "40"),
        ("1_rename_mri_data.py", "--data_dir", str(raw), "--quiet"),
        ("2_preprocessing_mri.py", "--data_dir", str(raw), "--output_dir", str(fullres), "--num_processes", "1",
         "--no_progress"),
    ]
    for step in steps:
        completed = run(*step)
        assert completed.returncode == 0, f"{step[0]}:\n{completed.stdout[-2000:]}\n{completed.stderr[-2000:]}"

    train = ["3_train.py", "--data_dir", str(fullres / "train"), "--splits", str(splits), "--logdir", str(logdir),
             "--iterations_per_epoch", "2", "--val_every", "1", "--batch_size", "1", "--num_workers", "0",
             "--augmentation", "none", "--no_progress", *TINY_MODEL]
    completed = run(*train, "--max_epoch", "1")
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "device cpu" in completed.stdout and "parameters" in completed.stdout
    assert "3 train / 1 val / 1 test" in completed.stdout  # 5 cases, 70/10/20
    for name in ("model/best_model.pt", "model/final_model.pt", "train.log", "progress.png"):
        assert (logdir / name).is_file(), name

    # a fresh start over an existing run is refused; --resume continues with epoch 2
    refused = run(*train, "--max_epoch", "2")
    assert refused.returncode == 1 and "--resume" in refused.stderr
    resumed = run(*train, "--max_epoch", "2", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    log = (logdir / "train.log").read_text()
    assert "resuming from" in log and "epoch 2/2" in log

    predict = ["4_predict.py", "--data_dir", str(fullres / "train"), "--splits", str(splits),
               "--checkpoint", str(logdir / "model" / "final_model.pt"), "--output_dir",
               str(predictions / "segmamba"), "--roi", "32", "32", "32", "--no_progress"]
    completed = run(*predict)  # mirror TTA on (the default)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "Dice TC" in completed.stdout and "mirror TTA on" in completed.stdout

    import json
    test_cases = json.loads(splits.read_text())["test"]
    assert len(test_cases) == 1
    for name in test_cases:
        written = sitk.ReadImage(str(predictions / "segmamba" / f"{name}.nii.gz"))
        reference = sitk.ReadImage(str(raw / name / "seg.nii.gz"))
        assert written.GetDimension() == 3 and written.GetNumberOfComponentsPerPixel() == 1
        assert written.GetPixelID() == sitk.sitkUInt8
        assert written.GetSize() == reference.GetSize()
        np.testing.assert_allclose(written.GetSpacing(), reference.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(written.GetDirection(), reference.GetDirection(), atol=1e-6)
        assert set(np.unique(sitk.GetArrayFromImage(written)).tolist()) <= {0, 1, 2, 3}

    again = run(*predict)  # finished cases are skipped
    assert again.returncode == 0 and "1 already there" in again.stdout

    completed = run("5_compute_metrics.py", "--pred_name", "segmamba", "--data_dir", str(raw),
                    "--prediction_root", str(predictions), "--splits", str(splits), "--no_progress")
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    with open(predictions / "result_metrics" / "segmamba.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["case"] for row in rows] == test_cases


# ------------------------------------------------------------------------------------------------ demo
def test_demo_runs_the_brats_scripts_in_order_with_small_patch_flags(capsys, tmp_path):
    demo = load_script("run_demo.py")
    assert demo.main(["--list", "--only", "brats", "--workspace", str(tmp_path / "ws")]) == 0
    listing = capsys.readouterr().out
    order = ["0_inference.py", "tools/make_brats_demo.py", "1_rename_mri_data.py", "2_preprocessing_mri.py",
             "3_train.py", "4_predict.py", "5_compute_metrics.py"]
    positions = [listing.index(script) for script in order]
    assert positions == sorted(positions)
    assert listing.count("--roi 32 32 32") == 2  # training patch and sliding window
    assert str(tmp_path / "ws") in listing and "./data" not in listing
    assert not (tmp_path / "ws").exists()  # --list writes nothing


def test_demo_refuses_a_workspace_it_did_not_create(tmp_path):
    demo = load_script("run_demo.py")
    (tmp_path / "my_data.nii.gz").write_bytes(b"precious")
    with pytest.raises(demo.DemoStepError, match="not a demo workspace"):
        demo.prepare_workspace(tmp_path, ["brats"])
    assert (tmp_path / "my_data.nii.gz").read_bytes() == b"precious"


def test_demo_workspace_is_locked_while_a_demo_runs_and_stale_locks_are_taken_over(tmp_path):
    demo = load_script("run_demo.py")
    workspace = tmp_path / "ws"
    lock = demo.prepare_workspace(workspace, ["brats"])
    (workspace / "brats").mkdir()
    (workspace / "brats" / "result.txt").write_text("from the running demo")
    with pytest.raises(demo.DemoStepError, match=f"process {os.getpid()}"):
        demo.prepare_workspace(workspace, ["brats"])
    assert (workspace / "brats" / "result.txt").exists()  # the running demo's files were not deleted
    lock.write_text("999999999")  # a process that does not exist
    demo.prepare_workspace(workspace, ["brats"]).unlink()
    assert not (workspace / "brats").exists()
