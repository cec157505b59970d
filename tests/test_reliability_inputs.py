"""Bad input files, one fault at a time, for every script family that reads them (issue 7).

Each fault is injected into one case of an otherwise good tiny dataset. By default the script goes on, names
the file and the problem in a summary at the end and exits with 3 (the good cases are written); with
``--strict`` it stops at the first failure with exit code 1. Faults that make the whole run impossible (an
empty directory, a checkpoint of another model, a tampered split file) stop it with exit code 1 (2 for a bad
flag). No fault may end in a bare traceback: every run goes through ``main(argv)`` and must return a code.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from _reliability_data import (TINY_FLAGS, abus_files, cropped, load_script, make_abus_raw, make_brats_raw,
                               not_an_image, other_spacing, preprocess_abus, preprocess_brats, rewrite, rewrite_case,
                               tiny_retina_checkpoint, tiny_segmamba_checkpoint, truncate, with_nan, write_2d,
                               write_4d)
from light_training.io import load_case, read_image, write_image
from light_training.splits import save_splits


from _reliability_data import one_thread  # noqa: E402,F401  (autouse fixture)


# =========================================================================================== BraTS step 2
def _all_zero(array):
    return np.zeros_like(array)


BRATS_RAW_FAULTS = {
    # fault: (file of the faulty case, injector, words the message must contain)
    "missing modality": ("t1c.nii.gz", os.remove, ["missing t1c.nii.gz"]),
    "truncated nii.gz": ("t2w.nii.gz", truncate, ["t2w.nii.gz", "truncated"]),
    "not an image behind .nii.gz": ("t2f.nii.gz", not_an_image, ["t2f.nii.gz", "not"]),
    "2D image": ("t1n.nii.gz", write_2d, ["t1n.nii.gz", "expected a 3D image, got 2D"]),
    "4D image": ("t1c.nii.gz", write_4d, ["t1c.nii.gz", "expected a 3D image, got 4D"]),
    "seg of another shape": ("seg.nii.gz", lambda p: rewrite(p, cropped), ["seg.nii.gz", "shape"]),
    "seg of another spacing": ("seg.nii.gz", lambda p: rewrite(p, lambda a: a, other_spacing),
                               ["seg.nii.gz", "spacing"]),
    "NaN voxels": ("t2w.nii.gz", lambda p: rewrite(p, with_nan), ["t2w.nii.gz", "NaN"]),
    "label outside 0-3": ("seg.nii.gz", lambda p: rewrite(p, lambda a: np.where(a == 3, 4, a)),
                          ["seg.nii.gz", "unexpected label values [4]", "BraTS 2021"]),
    "fractional labels": ("seg.nii.gz", lambda p: rewrite(p, lambda a: a.astype(np.float32) * 0.5),
                          ["seg.nii.gz", "non-integer"]),
}


@pytest.fixture(scope="module")
def brats_raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("brats_raw")
    names = make_brats_raw(root, n_cases=3)
    return root, names


def _copy(tree, tmp_path, name="data"):
    target = tmp_path / name
    shutil.copytree(tree, target)
    return target


@pytest.mark.parametrize("fault", list(BRATS_RAW_FAULTS))
def test_brats_preprocessing_skips_a_broken_case_names_file_and_problem_and_strict_stops(fault, brats_raw, tmp_path,
                                                                                       capsys):
    preprocess = load_script("2_preprocessing_mri.py")
    raw = _copy(brats_raw[0], tmp_path)
    good, bad = brats_raw[1][:2], brats_raw[1][2]
    filename, inject, words = BRATS_RAW_FAULTS[fault]
    inject(raw / bad / filename)
    out = tmp_path / "fullres"
    args = ["--data_dir", str(raw), "--num_processes", "1", "--no_progress"]
    assert preprocess.main([*args, "--output_dir", str(out)]) == 3
    err = capsys.readouterr().err
    summary = err[err.index("case(s) failed:"):]  # the list at the end names the case, the file and the problem
    assert bad in summary and all(word in summary for word in words), summary
    assert "Traceback" not in err
    assert sorted(os.listdir(out / "train")) == sorted(f"{n}.{ext}" for n in good for ext in ("json", "npz"))
    assert json.loads((out / "dataset_summary.json").read_text())["failed"].keys() == {bad}
    assert preprocess.main([*args, "--output_dir", str(tmp_path / "strict"), "--strict"]) == 1
    err = capsys.readouterr().err
    assert "strict" in err and bad in err and all(word in err for word in words)


def test_brats_preprocessing_of_an_all_zero_case_and_an_unsafe_folder_name_lists_both(brats_raw, tmp_path, capsys):
    preprocess = load_script("2_preprocessing_mri.py")
    raw = _copy(brats_raw[0], tmp_path)
    names = brats_raw[1]
    for filename in os.listdir(raw / names[1]):
        if filename != "seg.nii.gz":
            rewrite(raw / names[1] / filename, _all_zero)
    os.rename(raw / names[2], raw / "case two")  # a space: no safe output file name
    out = tmp_path / "fullres"
    assert preprocess.main(["--data_dir", str(raw), "--output_dir", str(out), "--num_processes", "1",
                            "--no_progress"]) == 3
    err = capsys.readouterr().err
    assert f"{names[1]}: " in err and "zero everywhere" in err
    assert "case two: " in err and "invalid case name 'case two'" in err
    assert sorted(os.listdir(out / "train")) == [f"{names[0]}.json", f"{names[0]}.npz"]


def test_brats_preprocessing_of_an_empty_directory_stops_with_exit_code_1(tmp_path, capsys):
    preprocess = load_script("2_preprocessing_mri.py")
    (tmp_path / "raw").mkdir()
    assert preprocess.main(["--data_dir", str(tmp_path / "raw"), "--output_dir", str(tmp_path / "out"),
                            "--no_progress"]) == 1
    assert "no case folders found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ============================================================================================ ABUS step 1
ABUS_RAW_FAULTS = {
    "missing mask": ("mask", os.remove, ["MASK_000.nrrd", "missing"]),
    "truncated image nrrd": ("image", truncate, ["DATA_000.nrrd", "corrupt, truncated"]),
    "not an image behind .nrrd": ("mask", not_an_image, ["MASK_000.nrrd", "cannot read"]),
    "2D image": ("image", write_2d, ["DATA_000.nrrd", "expected a 3D image, got 2D"]),
    "4D mask": ("mask", write_4d, ["MASK_000.nrrd", "expected a 3D image, got 4D"]),
    "mask of another shape": ("mask", lambda p: rewrite(p, cropped), ["MASK_000.nrrd", "shape"]),
    "mask of another spacing": ("mask", lambda p: rewrite(p, lambda a: a, other_spacing),
                                ["MASK_000.nrrd", "spacing"]),
    "NaN voxels": ("image", lambda p: rewrite(p, with_nan), ["DATA_000.nrrd", "NaN"]),
    "all-zero image": ("image", lambda p: rewrite(p, _all_zero), ["DATA_000.nrrd", "zero everywhere"]),
    "negative mask values": ("mask", lambda p: rewrite(p, lambda a: np.where(a > 0, -1, 0).astype(np.int16)),
                             ["MASK_000.nrrd", "negative"]),
}


@pytest.fixture(scope="module")
def abus_raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("abus_raw")
    make_abus_raw(root, num_cases=4)
    return root


def _abus_preprocess(raw, out, *extra):
    return preprocess_abus(raw, out, 0.34, 0.33, *extra)


@pytest.mark.parametrize("fault", list(ABUS_RAW_FAULTS))
def test_abus_preprocessing_skips_a_broken_case_names_file_and_problem_and_strict_stops(fault, abus_raw, tmp_path,
                                                                                      capsys):
    raw = _copy(abus_raw, tmp_path)
    which, inject, words = ABUS_RAW_FAULTS[fault]
    image, mask = abus_files(raw, "000")
    inject(image if which == "image" else mask)
    out = tmp_path / "abus"
    assert _abus_preprocess(raw, out) == 3
    err = capsys.readouterr().err
    summary = err[err.index("case(s) failed"):]
    assert "ABUS_000: " in summary and all(word in summary for word in words), summary
    assert "Traceback" not in err
    info = json.loads((out / "split_info.json").read_text())
    assert "ABUS_000" in info["failed"] and sorted(info["cases"]) == ["ABUS_001", "ABUS_002", "ABUS_003"]
    assert not any((out / split / "ABUS_000.npz").exists() for split in ("train", "val", "test"))
    assert _abus_preprocess(raw, tmp_path / "strict", "--strict") == 1
    assert "strict" in capsys.readouterr().err


def test_abus_preprocessing_of_an_empty_dataset_stops_with_exit_code_1(tmp_path, capsys):
    for folder in ("Train", "Validation", "Test"):
        (tmp_path / "raw" / "data" / folder / "DATA").mkdir(parents=True)
    assert _abus_preprocess(tmp_path / "raw", tmp_path / "out") == 1
    assert "no DATA_<id>.nrrd file" in capsys.readouterr().err
    assert _abus_preprocess(tmp_path / "nothing_here", tmp_path / "out") == 1
    assert "no raw ABUS data found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ============================================================================================ BraTS step 4
@pytest.fixture(scope="module")
def brats_preprocessed(tmp_path_factory, brats_raw):
    root = tmp_path_factory.mktemp("brats_pre")
    assert preprocess_brats(brats_raw[0], root / "fullres") == 0
    tiny_segmamba_checkpoint(root / "model.pt")
    return root


def _predict_args(root, data, splits, out, *extra):
    return ["--data_dir", str(data), "--splits", str(splits), "--checkpoint", str(root / "model.pt"),
            "--output_dir", str(out), "--roi", "32", "32", "32", "--no-mirror_tta", "--device", "cpu",
            "--no_progress", *extra]


BRATS_CASE_FAULTS = {
    "missing case file": (lambda npz: os.remove(npz), ["npz", "not found"]),
    "truncated npz": (truncate, ["npz", "corrupt or truncated"]),
    "not an npz behind .npz": (not_an_image, ["npz", "corrupt or truncated"]),
    "missing properties json": (lambda npz: os.remove(npz[:-4] + ".json"), [".json", "not found"]),
    "NaN in the image data": (lambda npz: rewrite_case(npz, data=with_nan(load_case(npz)[0])), ["npz", "NaN"]),
    "wrong channel count": (lambda npz: rewrite_case(npz, data=load_case(npz)[0][:2]),
                            ["npz", "2 channels, the model expects 4"]),
}


@pytest.mark.parametrize("fault", list(BRATS_CASE_FAULTS))
def test_brats_prediction_skips_a_broken_case_names_the_file_and_strict_stops(fault, brats_preprocessed, brats_raw,
                                                                            tmp_path, capsys):
    predict = load_script("4_predict.py")
    data = _copy(brats_preprocessed / "fullres" / "train", tmp_path)
    names = brats_raw[1]
    splits = tmp_path / "splits.json"
    save_splits(splits, {"train": [], "val": [], "test": names})
    inject, words = BRATS_CASE_FAULTS[fault]
    inject(str(data / f"{names[1]}.npz"))
    out = tmp_path / "pred"
    assert predict.main(_predict_args(brats_preprocessed, data, splits, out)) == 3
    err = capsys.readouterr().err
    summary = err[err.index("case(s) failed:"):]
    assert names[1] in summary and all(word in summary for word in words), summary
    assert sorted(os.listdir(out)) == [f"{names[0]}.nii.gz", f"{names[2]}.nii.gz"]
    assert predict.main(_predict_args(brats_preprocessed, data, splits, tmp_path / "strict", "--strict")) == 1
    err = capsys.readouterr().err
    assert "strict" in err and names[1] in err
    assert sorted(os.listdir(tmp_path / "strict")) == [f"{names[0]}.nii.gz"]  # stopped at the second case


def test_brats_prediction_refuses_a_checkpoint_of_another_model_listing_the_mismatches(brats_preprocessed, brats_raw,
                                                                                     tmp_path, capsys):
    predict = load_script("4_predict.py")
    splits = tmp_path / "splits.json"
    save_splits(splits, {"train": [], "val": [], "test": brats_raw[1]})
    other = tmp_path / "other.pt"
    tiny_segmamba_checkpoint(other, bare=True, feat_size=[8, 16, 32, 48])  # a bare state dict of another width
    args = _predict_args(brats_preprocessed, brats_preprocessed / "fullres" / "train", splits, tmp_path / "out")
    args[args.index("--checkpoint") + 1] = str(other)
    assert predict.main([*args, *TINY_FLAGS]) == 1
    err = capsys.readouterr().err
    assert f"checkpoint {other} does not fit SegMamba" in err and "shape mismatches" in err and "vs model (64" in err
    assert not (tmp_path / "out").exists()


def test_brats_prediction_loads_a_reference_layout_state_dict(brats_preprocessed, brats_raw, tmp_path):
    predict = load_script("4_predict.py")
    splits = tmp_path / "splits.json"
    save_splits(splits, {"train": [], "val": [], "test": brats_raw[1][:1]})
    bare = tmp_path / "reference_layout.pt"
    tiny_segmamba_checkpoint(bare, bare=True)
    args = _predict_args(brats_preprocessed, brats_preprocessed / "fullres" / "train", splits, tmp_path / "out")
    args[args.index("--checkpoint") + 1] = str(bare)
    assert predict.main([*args, *TINY_FLAGS]) == 0
    assert os.listdir(tmp_path / "out") == [f"{brats_raw[1][0]}.nii.gz"]


@pytest.mark.parametrize("case_name", ["../escaped", "/tmp/absolute", "a/b"])
def test_brats_prediction_refuses_a_split_file_whose_case_names_are_paths(case_name, brats_preprocessed, tmp_path,
                                                                        capsys):
    predict = load_script("4_predict.py")
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": [], "val": [], "test": [case_name]}))
    out = tmp_path / "nested" / "out"
    assert predict.main(_predict_args(brats_preprocessed, brats_preprocessed / "fullres" / "train", splits,
                                      out)) == 1
    err = capsys.readouterr().err
    assert str(splits) in err and "invalid case name" in err
    assert sorted(os.listdir(tmp_path)) == ["splits.json"]  # nothing written anywhere near


def test_brats_prediction_with_an_empty_test_split_or_no_data_directory_stops(brats_preprocessed, tmp_path, capsys):
    predict = load_script("4_predict.py")
    splits = tmp_path / "splits.json"
    save_splits(splits, {"train": [], "val": [], "test": []})
    data = brats_preprocessed / "fullres" / "train"
    assert predict.main(_predict_args(brats_preprocessed, data, splits, tmp_path / "out")) == 1
    assert "split is empty" in capsys.readouterr().err
    save_splits(splits, {"train": [], "val": [], "test": ["BraTS-GLI-00000-000"]})
    assert predict.main(_predict_args(brats_preprocessed, tmp_path / "nowhere", splits, tmp_path / "out")) == 1
    assert "nowhere: preprocessed data directory not found" in capsys.readouterr().err


# ============================================================================================ BraTS step 5
def _label_map(array):
    return array.astype(np.uint8)


BRATS_PREDICTION_FAULTS = {
    "missing prediction": ("pred", os.remove, ["pred", "missing"]),
    "truncated prediction": ("pred", truncate, ["pred", "truncated"]),
    "not an image behind .nii.gz": ("pred", not_an_image, ["pred", "not"]),
    "2D prediction": ("pred", write_2d, ["pred", "got 2D"]),
    "4D prediction": ("pred", write_4d, ["pred", "got 4D"]),
    "prediction of another shape": ("pred", lambda p: rewrite(p, cropped), ["pred", "shape"]),
    "prediction of another spacing": ("pred", lambda p: rewrite(p, lambda a: a, other_spacing), ["pred", "spacing"]),
    "NaN in the prediction": ("pred", lambda p: rewrite(p, with_nan), ["pred", "NaN"]),
    "label outside 0-3": ("pred", lambda p: rewrite(p, lambda a: np.where(a == 3, 7, a).astype(np.uint8)),
                          ["pred", "unexpected label values [7]"]),
    "fractional labels": ("pred", lambda p: rewrite(p, lambda a: a * np.float32(0.5)), ["pred", "non-integer"]),
    "missing ground truth": ("gt", os.remove, ["seg.nii.gz", "not found"]),
    "ground truth with label 4": ("gt", lambda p: rewrite(p, lambda a: np.where(a == 3, 4, a).astype(np.uint8)),
                                  ["seg.nii.gz", "unexpected label values [4]"]),
}


@pytest.fixture
def brats_metrics_setup(brats_raw, tmp_path):
    raw = _copy(brats_raw[0], tmp_path, "raw")
    names = brats_raw[1]
    splits = tmp_path / "splits.json"
    save_splits(splits, {"train": [], "val": [], "test": names})
    for name in names:  # perfect predictions: the ground truth itself
        gt, geometry = read_image(raw / name / "seg.nii.gz")
        write_image(gt, tmp_path / "preds" / "run" / f"{name}.nii.gz", geometry)
    args = ["--pred_name", "run", "--data_dir", str(raw), "--prediction_root", str(tmp_path / "preds"),
            "--splits", str(splits), "--no_progress"]
    return raw, names, args


@pytest.mark.parametrize("fault", list(BRATS_PREDICTION_FAULTS))
def test_brats_metrics_skip_a_broken_case_name_the_file_and_strict_stops(fault, brats_metrics_setup, tmp_path,
                                                                       capsys):
    metrics = load_script("5_compute_metrics.py")
    raw, names, args = brats_metrics_setup
    which, inject, words = BRATS_PREDICTION_FAULTS[fault]
    pred_path = tmp_path / "preds" / "run" / f"{names[1]}.nii.gz"
    inject(pred_path if which == "pred" else raw / names[1] / "seg.nii.gz")
    words = [str(pred_path) if word == "pred" else word for word in words]
    assert metrics.main(args) == 3
    err = capsys.readouterr().err
    assert names[1] in err and all(word in err for word in words), err
    result = json.loads((tmp_path / "preds" / "result_metrics" / "run.json").read_text())
    assert result["n_evaluated"] == 2  # the other cases are scored
    assert result["summary"]["brats"]["WT"]["dice"]["mean"] == 1.0
    os.remove(tmp_path / "preds" / "result_metrics" / "run.json")
    assert metrics.main([*args, "--strict"]) == 1
    assert "strict" in capsys.readouterr().err
    assert not (tmp_path / "preds" / "result_metrics" / "run.json").exists()  # a stopped run writes no summary


@pytest.mark.parametrize("pred_name", ["../escaped", "/tmp/absolute_metrics", "a/b"])
def test_brats_metrics_refuse_a_pred_name_that_would_write_outside_result_metrics(pred_name, brats_metrics_setup,
                                                                                tmp_path, capsys):
    metrics = load_script("5_compute_metrics.py")
    args = list(brats_metrics_setup[2])
    args[args.index("--pred_name") + 1] = pred_name
    before = sorted(os.listdir(tmp_path))
    assert metrics.main(args) == 2
    assert "--pred_name" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == before and not os.path.exists("/tmp/absolute_metrics.csv")
    assert not (tmp_path / "preds" / "result_metrics").exists()


def test_brats_metrics_with_an_empty_prediction_directory_stop_with_exit_code_1(brats_metrics_setup, tmp_path,
                                                                              capsys):
    metrics = load_script("5_compute_metrics.py")
    shutil.rmtree(tmp_path / "preds" / "run")
    (tmp_path / "preds" / "run").mkdir()
    assert metrics.main(brats_metrics_setup[2]) == 1
    assert "no case could be evaluated" in capsys.readouterr().err


# ====================================================================================== ABUS steps 4 and 5
@pytest.fixture(scope="module")
def abus_preprocessed(tmp_path_factory, abus_raw):
    root = tmp_path_factory.mktemp("abus_pre")
    # every lesion case in the test split: the scripts below see all of them
    assert _abus_preprocess(abus_raw, root / "abus", "--train_ratio", "1.0", "--val_ratio", "0.0") == 0
    info = json.loads((root / "abus" / "split_info.json").read_text())
    for name in info["train"]:
        for ext in ("npz", "json"):
            os.makedirs(root / "abus" / "test", exist_ok=True)
            shutil.copy(root / "abus" / "train" / f"{name}.{ext}", root / "abus" / "test" / f"{name}.{ext}")
    info["test"], info["train"] = info["train"], []
    (root / "abus" / "split_info.json").write_text(json.dumps(info))
    tiny_retina_checkpoint(root / "retina.pt")
    return root, info


def _abus_predict(root, data_dir, out, *extra):
    return load_script("abus_retina_predict.py").main(
        ["--model_path", str(root / "retina.pt"), "--data_dir_test", str(data_dir), "--save_path", str(out),
         "--device", "cpu", "--no_progress", "--score_threshold", "0.0", "--max_detections", "5", *extra])


ABUS_CASE_FAULTS = {
    "truncated npz": (truncate, ["ABUS_001.npz", "corrupt or truncated"]),
    "NaN in the image data": (lambda npz: rewrite_case(npz, data=with_nan(load_case(npz)[0])),
                              ["ABUS_001.npz", "NaN"]),
    "case id present twice (a copied case)": (
        lambda npz: [shutil.copy(npz.replace("ABUS_001", "ABUS_000")[:-4] + ext, npz[:-4] + ext)
                     for ext in (".npz", ".json")],
        ["ABUS_001.npz", "name the case 'ABUS_000'"]),
}


@pytest.mark.parametrize("fault", list(ABUS_CASE_FAULTS))
def test_abus_prediction_skips_a_broken_case_and_writes_the_others_to_detections_json(fault, abus_preprocessed,
                                                                                     tmp_path, capsys):
    from detection.detections_file import read_detections_json

    root, info = abus_preprocessed
    data = _copy(root / "abus" / "test", tmp_path)
    inject, words = ABUS_CASE_FAULTS[fault]
    inject(str(data / "ABUS_001.npz"))
    assert _abus_predict(root, data, tmp_path / "out") == 3
    err = capsys.readouterr().err
    summary = err[err.index("case(s) failed"):]
    assert "ABUS_001" in summary and all(word in summary for word in words), summary
    detections = read_detections_json(tmp_path / "out" / "detections.json")
    assert sorted(detections) == sorted(set(info["test"]) - {"ABUS_001"})
    assert _abus_predict(root, data, tmp_path / "strict", "--strict") == 1
    assert "strict" in capsys.readouterr().err


def test_abus_prediction_refuses_a_segmentation_checkpoint_listing_the_mismatches(abus_preprocessed, tmp_path,
                                                                                 capsys):
    root, _ = abus_preprocessed
    segmentation = tmp_path / "segmamba.pt"
    tiny_segmamba_checkpoint(segmentation, in_chans=1, out_chans=2)
    code = load_script("abus_retina_predict.py").main(
        ["--model_path", str(segmentation), "--data_dir_test", str(root / "abus" / "test"), "--save_path",
         str(tmp_path / "out"), "--device", "cpu", "--no_progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert str(segmentation) in err and "missing keys" in err and "retina_head." in err and "unexpected keys" in err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def abus_metric_inputs(abus_preprocessed, abus_raw, tmp_path):
    """Perfect predicted masks and detections for every test case, and the split_info pointing at a raw copy."""
    from detection.boxes import mask_to_boxes
    from detection.detections_file import CasePrediction, write_detections_json

    root, info = abus_preprocessed
    raw = _copy(abus_raw, tmp_path, "raw")
    info = dict(info, abus_root=str(raw))
    split_info = tmp_path / "split_info.json"
    split_info.write_text(json.dumps(info))
    pred_dir = tmp_path / "preds" / "run"
    detections = {}
    for name in info["test"]:
        mask, geometry = read_image(raw / info["cases"][name]["mask"])
        write_image((mask > 0).astype(np.uint8), pred_dir / f"{name}.nii.gz", geometry)
        boxes = mask_to_boxes(mask > 0)[0]
        detections[name] = CasePrediction(boxes, np.linspace(0.9, 0.5, len(boxes)), mask.shape, geometry.spacing_zyx)
    write_detections_json(pred_dir / "detections.json", detections)
    return raw, info, split_info, pred_dir


ABUS_MASK_FAULTS = {
    "missing prediction": ("pred", os.remove, ["ABUS_001.nii.gz"]),
    "truncated prediction": ("pred", truncate, ["ABUS_001.nii.gz", "truncated"]),
    "prediction of another shape": ("pred", lambda p: rewrite(p, cropped), ["ABUS_001.nii.gz", "shape"]),
    "negative values in the prediction": ("pred", lambda p: rewrite(p, lambda a: -a.astype(np.int16)),
                                          ["ABUS_001.nii.gz", "negative"]),
    "raw ground-truth mask gone": ("gt", os.remove, ["MASK_001.nrrd", "not found"]),
}


@pytest.mark.parametrize("fault", list(ABUS_MASK_FAULTS))
def test_abus_segmentation_metrics_skip_a_broken_case_and_strict_stops(fault, abus_metric_inputs, tmp_path, capsys):
    raw, info, split_info, pred_dir = abus_metric_inputs
    which, inject, words = ABUS_MASK_FAULTS[fault]
    inject(pred_dir / "ABUS_001.nii.gz" if which == "pred" else raw / info["cases"]["ABUS_001"]["mask"])
    metrics = load_script("abus_compute_metrics.py")
    args = ["--pred_name", "run", "--split_info", str(split_info), "--results_root", str(tmp_path / "preds"),
            "--num_processes", "1", "--no_progress"]
    assert metrics.main(args) == 3
    err = capsys.readouterr().err
    summary = err[err.index("incomplete:"):]
    assert "ABUS_001" in summary and all(word in summary for word in words), summary
    result = json.loads((tmp_path / "preds" / "result_metrics" / "run.json").read_text())
    assert result["num_cases"] == len(info["test"]) - 1 and result["summary"]["dice"]["min"] == 1.0
    os.remove(tmp_path / "preds" / "result_metrics" / "run.json")
    assert metrics.main([*args, "--strict"]) == 1
    assert "strict" in capsys.readouterr().err
    assert not (tmp_path / "preds" / "result_metrics" / "run.json").exists()  # a stopped run writes no summary


def test_abus_metrics_refuse_a_split_info_listing_a_case_twice(abus_metric_inputs, tmp_path, capsys):
    _, info, split_info, _ = abus_metric_inputs
    info = dict(info, test=info["test"] + info["test"][:1])
    split_info.write_text(json.dumps(info))
    assert load_script("abus_compute_metrics.py").main(
        ["--pred_name", "run", "--split_info", str(split_info), "--results_root", str(tmp_path / "preds"),
         "--num_processes", "1", "--no_progress"]) == 1
    assert f"case {info['test'][0]} is listed twice" in capsys.readouterr().err


def _edit_detections(path, edit):
    payload = json.loads(open(path).read())
    edit(payload)
    with open(path, "w") as handle:
        json.dump(payload, handle)


DETECTION_FILE_FAULTS = {
    "truncated detections.json": (truncate, "not valid JSON"),
    "case present twice": (lambda p: _replace_text(p, _duplicate_case_text), "listed more than once"),
    "inverted box": (lambda p: _edit_detections(p, lambda d: d["cases"]["ABUS_001"]["boxes"].__setitem__(
        0, [9, 9, 9, 2, 2, 2])), "inverted"),
    "box outside the image": (lambda p: _edit_detections(p, lambda d: d["cases"]["ABUS_001"]["boxes"].__setitem__(
        0, [0, 0, 0, 999, 5, 5])), "outside the image"),
    "NaN score": (lambda p: _replace_text(p, _nan_score_text), "non-finite"),
}


def _replace_text(path, make_text):
    text = make_text(open(path).read())
    with open(path, "w") as handle:
        handle.write(text)


def _duplicate_case_text(text):
    """The same case key twice in "cases" (json.load alone would silently keep the second entry)."""
    entry = json.dumps(json.loads(text)["cases"]["ABUS_001"])
    assert '"cases": {' in text
    return text.replace('"cases": {', '"cases": {"ABUS_001": ' + entry + ", ", 1)


def _nan_score_text(text):
    payload = json.loads(text)
    payload["cases"]["ABUS_001"]["scores"][0] = float("nan")
    return json.dumps(payload)  # json writes the non-standard NaN token, as a careless writer would


@pytest.mark.parametrize("fault", list(DETECTION_FILE_FAULTS))
def test_abus_detection_metrics_refuse_a_broken_detections_file_naming_it(fault, abus_metric_inputs, capsys):
    _, _, split_info, pred_dir = abus_metric_inputs
    inject, words = DETECTION_FILE_FAULTS[fault]
    path = pred_dir / "detections.json"
    content = open(path).read()
    inject(str(path))
    assert open(path).read() != content
    assert load_script("abus_det_compute_metrics.py").main(
        ["--pred_file", str(path), "--split_info", str(split_info), "--num_processes", "1", "--no_progress"]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and words in err
    assert not (pred_dir / "metrics").exists()


def test_abus_detection_metrics_list_a_case_without_entry_and_strict_stops(abus_metric_inputs, capsys):
    _, info, split_info, pred_dir = abus_metric_inputs
    path = pred_dir / "detections.json"
    _edit_detections(path, lambda d: d["cases"].pop("ABUS_001"))
    script = load_script("abus_det_compute_metrics.py")
    args = ["--pred_file", str(path), "--split_info", str(split_info), "--num_processes", "1", "--no_progress"]
    assert script.main(args) == 3
    err = capsys.readouterr().err
    assert f"ABUS_001: no entry in {path}" in err[err.index("incomplete:"):]
    report = json.loads((pred_dir / "metrics" / "detection_metrics.json").read_text())
    assert report["missing_predictions"] == ["ABUS_001"] and report["summary"]["num_cases"] == len(info["test"]) - 1
    shutil.rmtree(pred_dir / "metrics")
    assert script.main([*args, "--strict"]) == 1
    assert "strict" in capsys.readouterr().err and not (pred_dir / "metrics").exists()


@pytest.mark.skipif(torch.cuda.device_count() > 8, reason="needs a machine without a ninth GPU")
@pytest.mark.parametrize("script", ["4_predict.py", "abus_retina_predict.py"])
def test_prediction_on_a_device_that_does_not_exist_is_refused_as_bad_settings(script, tmp_path, capsys):
    flag = "--checkpoint" if script == "4_predict.py" else "--model_path"
    assert load_script(script).main([flag, str(tmp_path / "model.pt"), "--device", "cuda:8", "--no_progress"]) == 2
    assert "cuda:8" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
