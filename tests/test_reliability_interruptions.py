"""Killed processes (issue 7): nothing half-written, re-runs complete what is missing.

The processes here are really killed with SIGKILL (no cleanup handler runs): either from outside at a random
moment while they write, or from inside at a chosen point of a real script run (a wrapper patches one library
function to kill its own process there, then runs the unmodified script with ``runpy``).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from _reliability_data import ROOT, load_script, make_abus_raw, make_brats_raw, preprocess_abus, \
    preprocess_brats, tiny_retina_checkpoint, tiny_segmamba_checkpoint
from light_training.io import is_case_complete, load_case, read_image
from light_training.splits import save_splits

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")


from _reliability_data import one_thread  # noqa: E402,F401  (autouse fixture)


def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
                MKL_NUM_THREADS="1")


def run_script_killed_at(script: str, args: list, patch: str, cwd) -> subprocess.CompletedProcess:
    """Run ``script args`` in a fresh interpreter after executing ``patch`` (which kills the process at its
    chosen point); returns the completed process (returncode -SIGKILL when the kill happened)."""
    program = "import os, signal, runpy, sys\n" + textwrap.dedent(patch) + textwrap.dedent(f"""
        sys.argv = [{script!r}] + {list(map(str, args))!r}
        runpy.run_path(os.path.join({ROOT!r}, {script!r}), run_name="__main__")
        """)
    return subprocess.run([sys.executable, "-c", program], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=300)


def run_script(script: str, args: list, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=300)


def temporaries(folder) -> list:
    return sorted(f for f in os.listdir(folder) if ".tmp-" in f)


# ================================================================================ every writer, random kills
WRITER_LOOP = """
import os, sys
import numpy as np
import torch
from detection.detections_file import CasePrediction, write_detections_json
from light_training.checkpoint import save_checkpoint_atomic
from light_training.io import save_case, write_image
from light_training.utils.files import atomic_path, save_json_atomic

out = sys.argv[1]
noise = np.random.default_rng(0).normal(size=(1, 40, 64, 64)).astype(np.float32)  # slow to compress


def write_all(k):
    save_case(out, "case", noise + k, np.full((1, 40, 64, 64), k % 100, np.int8), {"version": k})
    write_image(noise[0] + k, os.path.join(out, "image.nii.gz"))
    save_checkpoint_atomic({"version": k, "weights": torch.from_numpy(noise) + k}, os.path.join(out, "model.pt"))
    save_json_atomic({"version": k, "values": (noise[0, :4] + k).tolist()}, os.path.join(out, "metrics.json"))
    with atomic_path(os.path.join(out, "metrics.csv")) as tmp:
        with open(tmp, "w") as handle:
            handle.writelines(f"{k},{i}\\n" for i in range(20000))
    boxes = np.array([[k % 7, 0, 0, 8, 8, 8]] * 500, dtype=float)
    write_detections_json(os.path.join(out, "detections.json"),
                          {"ABUS_000": CasePrediction(boxes, np.linspace(1, 0, 500), (40, 64, 64))}, {"version": k})


write_all(0)
print("ready", flush=True)
k = 1
while True:
    write_all(k)
    k += 1
"""


def check_every_output_is_one_whole_version(out, noise) -> None:
    from detection.detections_file import read_detections_json

    if is_case_complete(out, "case"):  # the JSON is written last: without it the case is redone on a re-run
        data, seg, properties = load_case(out / "case.npz")
        version = properties["version"]
        assert np.array_equal(data, noise + version) and np.all(seg == version % 100)
    image, _ = read_image(out / "image.nii.gz")
    version = int(round(float((image - noise[0]).mean())))
    assert np.array_equal(image, noise[0] + version)
    checkpoint = torch.load(out / "model.pt", weights_only=True)
    assert torch.equal(checkpoint["weights"], torch.from_numpy(noise) + checkpoint["version"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.allclose(metrics["values"], noise[0, :4] + metrics["version"])
    lines = (out / "metrics.csv").read_text().splitlines()
    assert len(lines) == 20000 and len({line.split(",")[0] for line in lines}) == 1
    detections = read_detections_json(out / "detections.json")
    assert detections["ABUS_000"].boxes.shape == (500, 6)


def test_killing_a_writer_at_random_moments_leaves_only_whole_old_or_new_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "writer.py"
    script.write_text(WRITER_LOOP)
    noise = np.random.default_rng(0).normal(size=(1, 40, 64, 64)).astype(np.float32)
    interrupted_writes = 0
    # Up to 12 kills at varied moments, stopping once one of them (after the first two) landed inside a write:
    # on a loaded 2-core machine six fixed moments once all fell between writes.
    for attempt, delay in enumerate([0.35, 0.8, 0.15, 0.55, 1.1, 0.25, 0.45, 0.7, 0.2, 0.95, 0.3, 0.6]):
        child = subprocess.Popen([sys.executable, str(script), str(out)], cwd=tmp_path, env=_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
        check_every_output_is_one_whole_version(out, noise)
        interrupted_writes += bool(temporaries(out))
        for leftover in temporaries(out):  # what an interrupted write leaves: only under a temporary name
            os.remove(out / leftover)
        if interrupted_writes >= 1 and attempt >= 1:
            break
    assert interrupted_writes >= 1, "no kill landed inside a write; the test proved nothing"
    assert sorted(os.listdir(tmp_path)) == ["out", "writer.py"]


# ========================================================================================= preprocessing
KILL_IN_SECOND_NPZ_WRITE = """
import numpy as np
_savez, _calls = np.savez_compressed, [0]
def _killed_mid_write(file, *args, **kwargs):
    _calls[0] += 1
    _savez(file, *args, **kwargs)
    if _calls[0] == 2:
        os.truncate(file, os.path.getsize(file) // 2)   # half of the archive is on disk...
        os.kill(os.getpid(), signal.SIGKILL)            # ...when the process dies
np.savez_compressed = _killed_mid_write
"""


def test_brats_preprocessing_killed_mid_write_leaves_no_partial_case_and_the_rerun_completes(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "fullres"
    names = make_brats_raw(raw, n_cases=3)
    args = ["--data_dir", raw, "--output_dir", out, "--num_processes", "1", "--no_progress"]
    killed = run_script_killed_at("2_preprocessing_mri.py", args, KILL_IN_SECOND_NPZ_WRITE, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    train = out / "train"
    assert is_case_complete(train, names[0]) and load_case(train / f"{names[0]}.npz")[0].shape[0] == 4
    assert not (train / f"{names[1]}.npz").exists() and not (train / f"{names[1]}.json").exists()
    assert len(temporaries(train)) == 1  # the half-written archive, under its temporary name only
    first_case = (train / f"{names[0]}.npz").read_bytes()

    rerun = run_script("2_preprocessing_mri.py", args, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "2 preprocessed, 1 already done (skipped)" in rerun.stdout  # the half-written case is redone
    assert temporaries(train) == []
    assert all(is_case_complete(train, name) for name in names)
    assert (train / f"{names[0]}.npz").read_bytes() == first_case  # a finished case is not redone
    assert sorted(os.listdir(tmp_path)) == ["fullres", "raw"]  # nothing written to the working directory


KILL_BEFORE_SECOND_JSON_RENAME = """
_replace, _calls = os.replace, [0]
def _killed_before_rename(source, target):
    if str(target).endswith(".json") and os.path.basename(str(target)).startswith("ABUS_"):
        _calls[0] += 1
        if _calls[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # the case's .npz is in place, its .json not yet
    return _replace(source, target)
os.replace = _killed_before_rename
"""


def test_abus_preprocessing_killed_between_a_cases_two_files_redoes_that_case(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "abus"
    make_abus_raw(raw, num_cases=4)
    args = ["--abus_root", raw, "--output_base", out, "--num_processes", "1", "--train_ratio", "1.0",
            "--val_ratio", "0.0", "--no_progress"]
    killed = run_script_killed_at("abus_preprocessing.py", args, KILL_BEFORE_SECOND_JSON_RENAME, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    train = out / "train"
    assert is_case_complete(train, "ABUS_000")
    assert (train / "ABUS_001.npz").exists() and not is_case_complete(train, "ABUS_001")  # incomplete
    assert not (out / "split_info.json").exists()

    rerun = run_script("abus_preprocessing.py", args, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "train: 3 preprocessed, 1 already done" in rerun.stdout  # ABUS_001 redone, ABUS_000 kept
    assert temporaries(train) == [] and all(is_case_complete(train, f"ABUS_00{i}") for i in range(4))
    assert json.loads((out / "split_info.json").read_text())["train"] == [f"ABUS_00{i}" for i in range(4)]
    assert sorted(os.listdir(tmp_path)) == ["abus", "raw"]


# ============================================================================================ prediction
KILL_IN_SECOND_IMAGE_WRITE = """
import SimpleITK
_write, _calls = SimpleITK.WriteImage, [0]
def _killed_mid_write(image, path, *args, **kwargs):
    _calls[0] += 1
    _write(image, path, *args, **kwargs)
    if _calls[0] == 2:
        os.truncate(path, os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
SimpleITK.WriteImage = _killed_mid_write
"""


@pytest.fixture(scope="module")
def brats_for_prediction(tmp_path_factory):
    root = tmp_path_factory.mktemp("brats_predict")
    names = make_brats_raw(root / "raw", n_cases=3)
    assert preprocess_brats(root / "raw", root / "fullres") == 0
    save_splits(root / "splits.json", {"train": [], "val": [], "test": names})
    tiny_segmamba_checkpoint(root / "model.pt")
    return root, names


def test_brats_prediction_killed_mid_write_keeps_finished_cases_and_the_rerun_completes(brats_for_prediction,
                                                                                      tmp_path, monkeypatch, capsys):
    root, names = brats_for_prediction
    out = tmp_path / "pred"
    args = ["--data_dir", root / "fullres" / "train", "--splits", root / "splits.json", "--checkpoint",
            root / "model.pt", "--output_dir", out, "--roi", "32", "32", "32", "--no-mirror_tta", "--device", "cpu",
            "--no_progress"]
    killed = run_script_killed_at("4_predict.py", args, KILL_IN_SECOND_IMAGE_WRITE, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(f for f in os.listdir(out) if ".tmp-" not in f) == [f"{names[0]}.nii.gz"]
    assert len(temporaries(out)) == 1
    first = read_image(out / f"{names[0]}.nii.gz")[0]

    monkeypatch.chdir(tmp_path)
    assert load_script("4_predict.py").main([str(a) for a in args]) == 0  # the re-run (same code, same files)
    stdout = capsys.readouterr().out
    assert "removed 1 unfinished file(s)" in stdout and "2 written, 1 already there (skipped" in stdout
    assert temporaries(out) == []
    for name in names:
        labels, _ = read_image(out / f"{name}.nii.gz")
        assert labels.shape == (16, 16, 16) and set(np.unique(labels).tolist()) <= {0, 1, 2, 3}
    assert np.array_equal(read_image(out / f"{names[0]}.nii.gz")[0], first)
    assert sorted(os.listdir(tmp_path)) == ["pred"]


KILL_BEFORE_SECOND_DETECTIONS_UPDATE = """
_replace, _calls = os.replace, [0]
def _killed_before_rename(source, target):
    if str(target).endswith("detections.json"):
        _calls[0] += 1
        if _calls[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # the second case is predicted, the file not yet updated
    return _replace(source, target)
os.replace = _killed_before_rename
"""


def test_abus_prediction_killed_mid_run_resumes_from_detections_json_to_the_uninterrupted_result(tmp_path, capsys,
                                                                                               monkeypatch):
    from detection.detections_file import read_detections_json

    predict = load_script("abus_retina_predict.py").main
    monkeypatch.chdir(tmp_path)
    raw, pre = tmp_path / "raw", tmp_path / "abus"
    make_abus_raw(raw, num_cases=3)
    assert preprocess_abus(raw, pre, 1.0, 0.0) == 0
    tiny_retina_checkpoint(tmp_path / "retina.pt")

    def args(out):
        return [str(a) for a in ["--model_path", tmp_path / "retina.pt", "--data_dir_test", pre / "train",
                                 "--save_path", out, "--device", "cpu", "--score_threshold", "0.0",
                                 "--max_detections", "5", "--save_seg", "--no_progress"]]

    assert predict(args(tmp_path / "straight")) == 0
    killed = run_script_killed_at("abus_retina_predict.py", args(tmp_path / "killed"),
                                  KILL_BEFORE_SECOND_DETECTIONS_UPDATE, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    partial = json.loads((tmp_path / "killed" / "detections.json").read_text())
    assert sorted(partial["cases"]) == ["ABUS_000"] and partial["source"]["complete"] is False
    assert partial["source"]["pending_cases"] == ["ABUS_001", "ABUS_002"]

    assert len(temporaries(tmp_path / "killed")) == 1  # the update it was writing
    capsys.readouterr()
    assert predict(args(tmp_path / "killed")) == 0  # the re-run
    assert "1 case(s) already in" in capsys.readouterr().out
    done = json.loads((tmp_path / "killed" / "detections.json").read_text())
    assert done["source"]["complete"] is True and done["source"]["pending_cases"] == []
    expected = read_detections_json(tmp_path / "straight" / "detections.json")
    result = read_detections_json(tmp_path / "killed" / "detections.json")
    assert sorted(result) == sorted(expected) == ["ABUS_000", "ABUS_001", "ABUS_002"]
    for name in expected:
        np.testing.assert_allclose(result[name].boxes, expected[name].boxes)
        np.testing.assert_allclose(result[name].scores, expected[name].scores)
    assert temporaries(tmp_path / "killed") == []

    # other settings: nothing of the old file is reused; --overwrite redoes everything
    assert predict([*args(tmp_path / "killed"), "--overlap", "0.25"]) == 0
    assert "another model or other settings" in capsys.readouterr().err
    assert predict([*args(tmp_path / "killed"), "--overwrite"]) == 0
    assert "already in" not in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["abus", "killed", "raw", "retina.pt", "straight"]
