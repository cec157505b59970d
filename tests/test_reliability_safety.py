"""Safe loading and safe output paths (issue 7).

* No pickle: the source tree is scanned (with Python's own parser, so comments and docstrings do not count)
  for pickle-family imports, ``np.load`` without ``allow_pickle=False`` and ``torch.load`` without
  ``weights_only=True``; a planted offender proves the scanner catches each pattern.
* A checkpoint carrying a pickled object is refused without running its code; checkpoints of another model
  are refused with the mismatches listed, at every loading site of the scripts.
* Case and run names cannot lead outputs out of their folders, and the scripts write nothing outside the
  folders they document (the working directory stays empty).
"""
from __future__ import annotations

import ast
import json
import os
import shutil

import numpy as np
import pytest
import torch

from _reliability_data import (ROOT, TINY_FLAGS, load_script, make_abus_raw, make_brats_raw, preprocess_abus,
                               tiny_retina_checkpoint, tiny_segmamba_checkpoint)
from light_training.io import read_image, write_image
from light_training.splits import save_splits

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
SKIPPED_DIRS = {".git", "__pycache__", "build", "dist", "data", "logs", "demo_output", "prediction_results"}


from _reliability_data import one_thread  # noqa: E402,F401  (autouse fixture)


# ================================================================================================ pickle
def unsafe_loading_sites(source: str, filename: str) -> list:
    """``file:line what`` for every pickle-family import, ``np.load`` without ``allow_pickle=False``,
    ``torch.load`` without ``weights_only=True`` and pickle-based readers (``pd.read_pickle``)."""
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names]
            if isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module)
            for name in names:
                if name.split(".")[0] in PICKLE_MODULES:
                    problems.append(f"{filename}:{node.lineno} imports {name}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            keywords = {k.arg: k.value for k in node.keywords}

            def constant(key):
                value = keywords.get(key)
                return value.value if isinstance(value, ast.Constant) else "missing or not a constant"

            if node.func.attr == "load" and owner in ("np", "numpy") and constant("allow_pickle") is not False:
                problems.append(f"{filename}:{node.lineno} np.load without allow_pickle=False")
            if node.func.attr == "load" and owner == "torch" and constant("weights_only") is not True:
                problems.append(f"{filename}:{node.lineno} torch.load without weights_only=True")
            if node.func.attr in ("read_pickle", "to_pickle"):
                problems.append(f"{filename}:{node.lineno} {node.func.attr}")
    return problems


def python_files():
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def test_no_source_file_loads_data_through_pickle():
    files = list(python_files())
    assert len(files) > 50  # the scan covers the tree: scripts, packages, tools, tests, bench
    problems = [p for path in files for p in unsafe_loading_sites(open(path, encoding="utf-8").read(),
                                                                   os.path.relpath(path, ROOT))]
    assert problems == []


@pytest.mark.parametrize("offender", [
    "import pickle", "from joblib import load", "import dill as d",
    "x = np.load('a.npz', allow_pickle=True)", "x = np.load('a.npy')", "x = numpy.load(path, mmap_mode='r')",
    "x = torch.load('m.pt')", "x = torch.load('m.pt', weights_only=False)", "x = torch.load(p, weights_only=flag)",
    "df = pd.read_pickle('t.pkl')"])
def test_the_scanner_catches_each_unsafe_pattern(offender):
    assert len(unsafe_loading_sites(offender, "planted.py")) == 1
    assert unsafe_loading_sites("x = np.load(p, allow_pickle=False)\ny = torch.load(p, weights_only=True)\n"
                                "# import pickle\n'''np.load(p, allow_pickle=True)'''", "fine.py") == []


class RunsCodeWhenUnpickled:
    """Unpickling calls ``open(marker, "w")``: if the file appears, loading executed code from the checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_checkpoint_carrying_a_pickled_object_is_refused_without_running_it(tmp_path, capsys):
    config = tiny_segmamba_checkpoint(tmp_path / "clean.pt")
    state = torch.load(tmp_path / "clean.pt", weights_only=True)
    state["payload"] = RunsCodeWhenUnpickled(tmp_path / "code_ran")
    torch.save(state, tmp_path / "evil.pt")
    save_splits(tmp_path / "splits.json", {"train": [], "val": [], "test": ["case"]})
    code = load_script("4_predict.py").main(
        ["--checkpoint", str(tmp_path / "evil.pt"), "--splits", str(tmp_path / "splits.json"), "--data_dir",
         str(tmp_path), "--output_dir", str(tmp_path / "out"), "--device", "cpu", "--no_progress"])
    assert code == 1
    assert f"could not read checkpoint {tmp_path / 'evil.pt'}" in capsys.readouterr().err
    assert not (tmp_path / "code_ran").exists()
    torch.save(config, tmp_path / "plain.pt")  # the same loader reads plain data fine: the refusal is the object
    assert load_script("abus_retina_predict.py").main(
        ["--model_path", str(tmp_path / "evil.pt"), "--data_dir_test", str(tmp_path), "--save_path",
         str(tmp_path / "out"), "--device", "cpu", "--no_progress"]) == 1
    assert str(tmp_path / "evil.pt") in capsys.readouterr().err
    assert not (tmp_path / "code_ran").exists() and not (tmp_path / "out").exists()


# ================================================================================ checkpoints of other models
@pytest.fixture(scope="module")
def abus_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("abus_safety")
    make_abus_raw(root / "raw", num_cases=4)
    assert preprocess_abus(root / "raw", root / "abus", 0.5, 0.0) == 0
    return root


def test_retina_training_refuses_a_pretrained_backbone_of_another_size_listing_the_mismatches(abus_data, tmp_path,
                                                                                            capsys):
    other = tmp_path / "other_width.pt"
    tiny_segmamba_checkpoint(other, in_chans=1, out_chans=2, bare=True, feat_size=[8, 16, 32, 48])
    code = load_script("abus_retina_train.py").main(
        ["--data_dir_train", str(abus_data / "abus" / "train"), "--data_dir_val", str(abus_data / "abus" / "test"),
         "--pretrained_seg", str(other), "--save_dir", str(tmp_path / "run"), "--device", "cpu", "--no_progress",
         "--num_workers", "0", "--patch_size", "32", "32", "32", *TINY_FLAGS])
    assert code == 1
    err = capsys.readouterr().err
    assert f"{other} does not fit the SegMamba-Retina backbone" in err and "shape mismatches" in err
    assert "vs model (64" in err and not (tmp_path / "run" / "model").exists()


def test_seg_box_evaluation_refuses_a_checkpoint_of_another_model_listing_the_mismatches(abus_data, tmp_path,
                                                                                       capsys):
    retina = tmp_path / "retina.pt"
    tiny_retina_checkpoint(retina)
    code = load_script("abus_seg_box_eval.py").main(
        ["--model_path", str(retina), "--data_dir_test", str(abus_data / "abus" / "test"), "--pred_dir",
         str(tmp_path / "pred"), "--split_info", str(abus_data / "abus" / "split_info.json"), "--device", "cpu",
         "--num_processes", "1", "--no_progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert f"checkpoint {retina} does not fit SegMamba" in err and "unexpected keys" in err and "fpn." in err


# =========================================================================================== output paths
def tree(folder) -> dict:
    """Every file under ``folder`` with its size and modification time (what a script could have touched)."""
    listing = {}
    for path, _, files in os.walk(folder):
        for name in files:
            full = os.path.join(path, name)
            stat = os.stat(full)
            listing[os.path.relpath(full, folder)] = (stat.st_size, stat.st_mtime_ns)
    return listing


def new_or_changed(before: dict, after: dict) -> list:
    return sorted(path for path, stamp in after.items() if before.get(path) != stamp)


def test_brats_metrics_write_only_their_two_result_files(tmp_path, monkeypatch):
    names = make_brats_raw(tmp_path / "raw", n_cases=2)
    save_splits(tmp_path / "splits.json", {"train": [], "val": [], "test": names})
    for name in names:
        gt, geometry = read_image(tmp_path / "raw" / name / "seg.nii.gz")
        write_image(gt, tmp_path / "preds" / "run" / f"{name}.nii.gz", geometry)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    before = tree(tmp_path)
    assert load_script("5_compute_metrics.py").main(
        ["--pred_name", "run", "--data_dir", str(tmp_path / "raw"), "--prediction_root", str(tmp_path / "preds"),
         "--splits", str(tmp_path / "splits.json"), "--no_progress"]) == 0
    assert new_or_changed(before, tree(tmp_path)) == [os.path.join("preds", "result_metrics", "run.csv"),
                                                      os.path.join("preds", "result_metrics", "run.json")]


@pytest.fixture
def abus_outputs(abus_data, tmp_path):
    """split_info with every lesion case in the test split, perfect masks and detections for them."""
    from detection.boxes import mask_to_boxes
    from detection.detections_file import CasePrediction, write_detections_json

    info = json.loads((abus_data / "abus" / "split_info.json").read_text())
    info["test"], info["train"] = sorted(info["train"] + info["test"]), []
    (tmp_path / "split_info.json").write_text(json.dumps(info))
    detections = {}
    for name in info["test"]:
        mask, geometry = read_image(abus_data / "raw" / info["cases"][name]["mask"])
        write_image((mask > 0).astype(np.uint8), tmp_path / "preds" / "run" / f"{name}.nii.gz", geometry)
        boxes = mask_to_boxes(mask > 0)[0]
        detections[name] = CasePrediction(boxes, np.ones(len(boxes)), mask.shape, geometry.spacing_zyx)
    write_detections_json(tmp_path / "preds" / "run" / "detections.json", detections)
    return info


def test_abus_metric_scripts_write_only_their_documented_files(abus_data, abus_outputs, tmp_path, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    split_info = str(tmp_path / "split_info.json")
    before = tree(tmp_path)
    raw_before = tree(abus_data)
    assert load_script("abus_compute_metrics.py").main(
        ["--pred_name", "run", "--split_info", split_info, "--results_root", str(tmp_path / "preds"),
         "--num_processes", "1", "--no_progress"]) == 0
    assert load_script("abus_det_compute_metrics.py").main(
        ["--pred_file", str(tmp_path / "preds" / "run" / "detections.json"), "--split_info", split_info,
         "--num_processes", "1", "--no_progress"]) == 0
    result = os.path.join("preds", "result_metrics")
    metrics = os.path.join("preds", "run", "metrics")
    assert new_or_changed(before, tree(tmp_path)) == sorted([
        os.path.join(metrics, "detection_metrics.json"), os.path.join(metrics, "detection_per_case.csv"),
        os.path.join(metrics, "froc.png"), os.path.join(result, "run.csv"), os.path.join(result, "run.json")])
    assert tree(abus_data) == raw_before  # the raw dataset (ground truth) is never written to


@pytest.mark.parametrize("script", ["5_compute_metrics.py", "abus_compute_metrics.py"])
@pytest.mark.parametrize("pred_name", ["../outside", "/tmp/absolute_name", "sub/dir", ".."])
def test_a_pred_name_that_is_a_path_is_refused_before_anything_is_written(script, pred_name, tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "split_info.json").write_text(json.dumps({"cases": {}, "train": [], "val": [], "test": ["A"]}))
    save_splits(tmp_path / "splits.json", {"train": [], "val": [], "test": ["A"]})
    common = ["--pred_name", pred_name, "--no_progress"]
    extra = (["--data_dir", str(tmp_path), "--prediction_root", str(tmp_path / "p"), "--splits",
              str(tmp_path / "splits.json")] if script.startswith("5") else
             ["--split_info", str(tmp_path / "split_info.json"), "--results_root", str(tmp_path / "p")])
    assert load_script(script).main(common + extra) == 2
    assert "--pred_name" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["split_info.json", "splits.json"]
    assert not os.path.exists("/tmp/absolute_name.csv") and not os.path.exists("/tmp/absolute_name.json")


@pytest.mark.parametrize("script", ["abus_compute_metrics.py", "abus_det_compute_metrics.py", "abus_seg_box_eval.py"])
@pytest.mark.parametrize("bad_name", ["../../outside", "/tmp/absolute_case", "ABUS_000/../../x"])
def test_abus_scripts_refuse_a_split_info_whose_case_names_are_paths(script, bad_name, abus_outputs, tmp_path,
                                                                    capsys):
    info = dict(abus_outputs, test=abus_outputs["test"] + [bad_name])
    (tmp_path / "split_info.json").write_text(json.dumps(info))
    args = {"abus_compute_metrics.py": ["--pred_name", "run", "--results_root", str(tmp_path / "preds")],
            "abus_det_compute_metrics.py": ["--pred_file", str(tmp_path / "preds" / "run" / "detections.json")],
            "abus_seg_box_eval.py": ["--pred_dir", str(tmp_path / "preds" / "run")]}[script]
    before = tree(tmp_path)
    assert load_script(script).main([*args, "--split_info", str(tmp_path / "split_info.json"), "--num_processes", "1",
                                     "--no_progress"]) == 1
    err = capsys.readouterr().err
    assert "split_info.json" in err and f"invalid case name {bad_name!r}" in err
    assert tree(tmp_path) == before


def test_abus_prediction_writes_only_into_its_save_path(abus_data, tmp_path, monkeypatch):
    tiny_retina_checkpoint(tmp_path / "retina.pt")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    before, raw_before = tree(tmp_path), tree(abus_data)
    assert load_script("abus_retina_predict.py").main(
        ["--model_path", str(tmp_path / "retina.pt"), "--data_dir_test", str(abus_data / "abus" / "test"),
         "--save_path", str(tmp_path / "out"), "--device", "cpu", "--save_seg", "--no_progress"]) == 0
    names = json.loads((abus_data / "abus" / "split_info.json").read_text())["test"]
    assert new_or_changed(before, tree(tmp_path)) == sorted(
        [os.path.join("out", "detections.json")] + [os.path.join("out", f"{n}.nii.gz") for n in names])
    assert tree(abus_data) == raw_before


def test_training_writes_only_into_its_run_folder(abus_data, tmp_path, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    data_before = tree(abus_data)
    assert load_script("abus_train.py").main(
        ["--data_dir_train", str(abus_data / "abus" / "train"), "--data_dir_val", str(abus_data / "abus" / "test"),
         "--logdir", str(tmp_path / "run"), "--max_epoch", "1", "--iterations_per_epoch", "1", "--batch_size", "1",
         "--num_workers", "0", "--device", "cpu", "--augmentation", "none", "--no_progress",
         "--patch_size", "32", "32", "32", *TINY_FLAGS]) == 0
    assert os.listdir(tmp_path / "cwd") == [] and tree(abus_data) == data_before
    written = sorted(tree(tmp_path / "run"))
    assert [f for f in written if not f.startswith("events.out.tfevents")] == [
        os.path.join("model", "best_model.pt"), os.path.join("model", "final_model.pt"), "progress.png", "train.log"]
    shutil.rmtree(tmp_path / "run")
