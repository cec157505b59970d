"""The BraTS data scripts end to end on a tiny synthetic dataset: demo generator → 1 (rename) → 2 (preprocess)
and 5 (metrics) on hand-made predictions; defaults equal the documented ones; failures are listed by name."""
import csv
import hashlib
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch

from light_training.io import ImageGeometry, load_case, read_image, write_image
from light_training.splits import save_splits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BRATS_DIR = "./data/raw_data/BraTS2023/ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData"
TINY_SHAPE = ["16", "20", "20"]


def _script(relative_path):
    name = "script_" + os.path.basename(relative_path).replace(".py", "").replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relative_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scripts():
    return {"demo": _script("tools/make_brats_demo.py"), "rename": _script("1_rename_mri_data.py"),
            "preprocess": _script("2_preprocessing_mri.py"), "metrics": _script("5_compute_metrics.py")}


def _tree_digest(folder):
    digest = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            path = os.path.join(dirpath, f)
            digest.update(os.path.relpath(path, folder).encode())
            digest.update(open(path, "rb").read())
    return digest.hexdigest()


def _make_raw(scripts, folder, n_cases=4):
    assert scripts["demo"].main(["--out", str(folder), "--n_cases", str(n_cases), "--shape", *TINY_SHAPE]) == 0
    return sorted(os.listdir(folder))


# ------------------------------------------------------------------------------------------- defaults

def test_script_defaults_equal_the_documented_ones(scripts):
    rename = scripts["rename"].build_parser().parse_args([])
    assert rename.data_dir == BRATS_DIR and scripts["rename"].DATA_DIR == BRATS_DIR
    pre = scripts["preprocess"].build_parser().parse_args([])
    assert pre.data_dir == BRATS_DIR and pre.output_dir == "./data/fullres"
    assert pre.modalities == ["t2w", "t2f", "t1n", "t1c"] and pre.seg_name == "seg.nii.gz"
    assert pre.target_spacing == [1.0, 1.0, 1.0] and pre.labels == [1, 2, 3]
    assert pre.num_processes == 8 and pre.mask_norm is False and not pre.overwrite and not pre.strict
    met = scripts["metrics"].build_parser().parse_args([])
    assert met.pred_name == "segmamba" and met.data_dir == BRATS_DIR
    assert met.prediction_root == "./prediction_results" and met.splits == "./data/fullres/splits.json"
    assert met.split == "test" and met.seg_name == "seg.nii.gz"
    demo = scripts["demo"].build_parser().parse_args([])
    assert demo.out == BRATS_DIR and demo.n_cases == 8 and demo.shape == [48, 64, 64] and demo.seed == 0


def test_help_texts_show_the_defaults(scripts, capsys):
    for key in ("rename", "preprocess", "metrics"):
        with pytest.raises(SystemExit):
            scripts[key].build_parser().parse_args(["--help"])
        # argparse wraps long defaults (also at hyphens): compare without white space.
        assert "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData" in "".join(capsys.readouterr().out.split())


# --------------------------------------------------------------------------------------------- demo

def test_demo_cases_use_the_real_raw_layout_with_four_contrasts_and_nested_labels(scripts, tmp_path):
    names = _make_raw(scripts, tmp_path / "raw", n_cases=2)
    assert names == ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000"]
    folder = tmp_path / "raw" / names[0]
    assert sorted(os.listdir(folder)) == [f"{names[0]}-{m}.nii.gz" for m in ("seg", "t1c", "t1n", "t2f", "t2w")]
    seg, geometry = read_image(folder / f"{names[0]}-seg.nii.gz")
    assert seg.shape == (16, 20, 20) and geometry.origin_xyz != (0.0, 0.0, 0.0)
    assert set(np.unique(seg)) == {0, 1, 2, 3}
    images = {m: read_image(folder / f"{names[0]}-{m}.nii.gz")[0].astype(float) for m in ("t1c", "t1n", "t2f", "t2w")}
    brain = images["t1n"] > 0
    assert brain.mean() > 0.2 and (~brain).any() and all(np.all(img[~brain] == 0) for img in images.values())
    # Enhancing tumour is brighter than oedema on T1c; oedema brighter than normal tissue on FLAIR.
    assert images["t1c"][seg == 3].mean() > 1.3 * images["t1c"][seg == 2].mean()
    assert images["t2f"][seg == 2].mean() > 1.3 * images["t2f"][brain & (seg == 0)].mean()
    # NCR sits inside ET which sits inside ED: each inner label is surrounded by tumour.
    from scipy.ndimage import binary_dilation
    assert np.all(np.isin(seg[binary_dilation(seg == 1) & (seg != 1)], [2, 3]))


def test_demo_generation_is_seeded(scripts, tmp_path):
    scripts["demo"].main(["--out", str(tmp_path / "a"), "--n_cases", "1", "--shape", *TINY_SHAPE, "--seed", "3"])
    scripts["demo"].main(["--out", str(tmp_path / "b"), "--n_cases", "1", "--shape", *TINY_SHAPE, "--seed", "3"])
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")


# ------------------------------------------------------------------------------------------- rename

def test_rename_gives_short_names_and_a_second_run_changes_nothing(scripts, tmp_path, capsys):
    raw = tmp_path / "raw"
    names = _make_raw(scripts, raw, n_cases=2)
    assert scripts["rename"].main(["--data_dir", str(raw)]) == 0
    out = capsys.readouterr().out
    assert "renamed 10 files in 2 cases" in out and f"{names[0]}-t1c.nii.gz -> t1c.nii.gz" in out
    for name in names:
        assert sorted(os.listdir(raw / name)) == ["seg.nii.gz", "t1c.nii.gz", "t1n.nii.gz", "t2f.nii.gz", "t2w.nii.gz"]
    digest = _tree_digest(raw)
    assert scripts["rename"].main(["--data_dir", str(raw)]) == 0
    assert "renamed 0 files in 0 cases, 2 cases already had short names" in capsys.readouterr().out
    assert _tree_digest(raw) == digest


def test_rename_never_overwrites_a_different_short_file_and_reports_the_conflict(scripts, tmp_path, capsys):
    raw = tmp_path / "raw"
    names = _make_raw(scripts, raw, n_cases=1)
    folder = raw / names[0]
    shutil.copy(folder / f"{names[0]}-t1n.nii.gz", folder / "t1c.nii.gz")  # a different file under the short name
    before = open(folder / "t1c.nii.gz", "rb").read()
    assert scripts["rename"].main(["--data_dir", str(raw)]) == 1
    captured = capsys.readouterr()
    assert "conflict" in captured.err and f"{names[0]}-t1c.nii.gz" in captured.err
    assert open(folder / "t1c.nii.gz", "rb").read() == before
    assert (folder / f"{names[0]}-t1c.nii.gz").exists() and (folder / "t2w.nii.gz").exists()


def test_rename_dry_run_changes_nothing_and_missing_folder_is_an_error(scripts, tmp_path, capsys):
    raw = tmp_path / "raw"
    _make_raw(scripts, raw, n_cases=1)
    digest = _tree_digest(raw)
    assert scripts["rename"].main(["--data_dir", str(raw), "--dry_run"]) == 0
    assert "would rename 5 files" in capsys.readouterr().out and _tree_digest(raw) == digest
    assert scripts["rename"].main(["--data_dir", str(tmp_path / "nowhere")]) == 1
    assert "nowhere: data directory not found" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- preprocess

def test_preprocessing_script_writes_cases_and_summary_into_the_output_root_only(scripts, tmp_path, monkeypatch, capsys):
    raw, out = tmp_path / "raw", tmp_path / "fullres"
    names = _make_raw(scripts, raw, n_cases=3)
    scripts["rename"].main(["--data_dir", str(raw), "--quiet"])
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    code = scripts["preprocess"].main(["--data_dir", str(raw), "--output_dir", str(out), "--num_processes", "2",
                                       "--no_progress"])
    assert code == 0
    assert os.listdir(workdir) == []  # nothing written to the current directory
    assert sorted(os.listdir(out)) == ["dataset_summary.json", "train"]
    assert sorted(os.listdir(out / "train")) == sorted([f"{n}.json" for n in names] + [f"{n}.npz" for n in names])
    data, seg, props = load_case(out / "train" / f"{names[0]}.npz")
    assert data.shape[0] == 4 and props["channel_names"] == ["t2w", "t2f", "t1n", "t1c"]
    assert props["target_spacing_zyx"] == [1.0, 1.0, 1.0]
    summary = json.loads((out / "dataset_summary.json").read_text())
    assert summary["n_cases"] == 3 and summary["n_failed"] == 0 and set(summary["cases"]) == set(names)
    assert "spacing (mm)" in capsys.readouterr().out
    # Second run: everything skipped, files untouched.
    digest = _tree_digest(out / "train")
    assert scripts["preprocess"].main(["--data_dir", str(raw), "--output_dir", str(out), "--num_processes", "1",
                                       "--no_progress"]) == 0
    assert "0 preprocessed, 3 already done" in capsys.readouterr().out
    assert _tree_digest(out / "train") == digest


def test_preprocessing_lists_failed_cases_by_name_and_strict_mode_stops(scripts, tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "fullres"
    names = _make_raw(scripts, raw, n_cases=3)
    scripts["rename"].main(["--data_dir", str(raw), "--quiet"])
    os.remove(raw / names[1] / "t2f.nii.gz")                                    # missing modality
    for f in os.listdir(raw / names[2]):                                        # not renamed
        os.rename(raw / names[2] / f, raw / names[2] / f"{names[2]}-{f}")
    code = scripts["preprocess"].main(["--data_dir", str(raw), "--output_dir", str(out), "--num_processes", "1",
                                       "--no_progress"])
    assert code == 3
    err = capsys.readouterr().err
    assert f"{names[1]}:" in err and "t2f.nii.gz" in err
    assert f"{names[2]}:" in err and "run 1_rename_mri_data.py first" in err
    assert os.path.isfile(out / "train" / f"{names[0]}.npz")
    summary = json.loads((out / "dataset_summary.json").read_text())
    assert summary["n_cases"] == 1 and set(summary["failed"]) == {names[1], names[2]}
    assert scripts["preprocess"].main(["--data_dir", str(raw), "--output_dir", str(tmp_path / "strict"),
                                       "--num_processes", "1", "--no_progress", "--strict"]) == 1
    assert "strict" in capsys.readouterr().err


def test_preprocessing_refuses_a_missing_data_dir(scripts, tmp_path, capsys):
    assert scripts["preprocess"].main(["--data_dir", str(tmp_path / "none"), "--output_dir", str(tmp_path / "o")]) == 1
    assert "raw data directory not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ metrics

def _monai_dice(pred, gt):
    from monai.metrics import DiceMetric
    return float(DiceMetric(include_background=True, reduction="none")(
        torch.tensor(pred)[None, None].float(), torch.tensor(gt)[None, None].float()))


def test_metrics_script_scores_test_cases_lists_missing_ones_and_writes_csv_and_json(scripts, tmp_path, capsys):
    raw = tmp_path / "raw"
    names = _make_raw(scripts, raw, n_cases=4)
    scripts["rename"].main(["--data_dir", str(raw), "--quiet"])
    splits_path = tmp_path / "splits.json"
    test_cases = names[1:]
    save_splits(splits_path, {"train": [names[0]], "val": [], "test": test_cases})
    pred_root = tmp_path / "prediction_results"
    # Case 1: perfect prediction; case 2: ET predicted as ED (no ET); case 3: missing.
    gt1, geometry1 = read_image(raw / test_cases[0] / "seg.nii.gz")
    write_image(gt1, pred_root / "demo_run" / f"{test_cases[0]}.nii.gz", geometry1)
    gt2, geometry2 = read_image(raw / test_cases[1] / "seg.nii.gz")
    pred2 = np.where(gt2 == 3, 2, gt2).astype(np.uint8)
    write_image(pred2, pred_root / "demo_run" / f"{test_cases[1]}.nii.gz", geometry2)
    code = scripts["metrics"].main(["--pred_name", "demo_run", "--data_dir", str(raw), "--prediction_root",
                                    str(pred_root), "--splits", str(splits_path), "--no_progress"])
    assert code == 3
    captured = capsys.readouterr()
    assert f"{test_cases[2]}.nii.gz" in captured.err and "missing" in captured.err
    assert "TC" in captured.out and "Dice (brats)" in captured.out
    rows = {r["case"]: r for r in csv.DictReader(open(pred_root / "result_metrics" / "demo_run.csv"))}
    assert list(rows) == test_cases
    assert rows[test_cases[2]]["status"] == "missing"
    perfect = rows[test_cases[0]]
    assert all(float(perfect[f"{r}_dice_reference"]) == 1.0 and float(perfect[f"{r}_hd95_brats"]) == 0.0
               for r in ("TC", "WT", "ET"))
    partial = rows[test_cases[1]]
    tc_pred, tc_gt = np.isin(pred2, [1, 3]), np.isin(gt2, [1, 3])
    assert float(partial["TC_dice_reference"]) == pytest.approx(_monai_dice(tc_pred, tc_gt), abs=1e-6)
    assert float(partial["WT_dice_brats"]) == 1.0
    assert float(partial["ET_dice_brats"]) == 0.0 and float(partial["ET_hd95_brats"]) == pytest.approx(373.13)
    assert float(partial["ET_hd95_reference"]) == 50.0
    summary = json.loads((pred_root / "result_metrics" / "demo_run.json").read_text())
    assert summary["n_cases_in_split"] == 3 and summary["n_evaluated"] == 2
    assert summary["missing_predictions"] == [test_cases[2]]
    assert summary["summary"]["reference"]["WT"]["dice"]["mean"] == pytest.approx(1.0)
    expected_tc = np.mean([1.0, float(partial["TC_dice_reference"])])
    assert summary["summary"]["brats"]["TC"]["dice"]["mean"] == pytest.approx(expected_tc)


def test_metrics_script_refuses_predictions_on_another_grid(scripts, tmp_path, capsys):
    raw = tmp_path / "raw"
    names = _make_raw(scripts, raw, n_cases=1)
    scripts["rename"].main(["--data_dir", str(raw), "--quiet"])
    save_splits(tmp_path / "splits.json", {"train": [], "val": [], "test": names})
    gt, geometry = read_image(raw / names[0] / "seg.nii.gz")
    wrong = ImageGeometry(geometry.spacing_xyz, (0.0, 0.0, 0.0), geometry.direction)
    write_image(gt, tmp_path / "preds" / "run" / f"{names[0]}.nii.gz", wrong)
    args = ["--pred_name", "run", "--data_dir", str(raw), "--prediction_root", str(tmp_path / "preds"),
            "--splits", str(tmp_path / "splits.json"), "--no_progress"]
    assert scripts["metrics"].main(args) == 1
    assert "geometry differs" in capsys.readouterr().err
    assert scripts["metrics"].main(args + ["--ignore_geometry"]) == 0


def test_metrics_script_needs_the_shared_splits_file(scripts, tmp_path, capsys):
    raw = tmp_path / "raw"
    _make_raw(scripts, raw, n_cases=1)
    assert scripts["metrics"].main(["--data_dir", str(raw), "--splits", str(tmp_path / "nope.json"),
                                    "--prediction_root", str(tmp_path / "p"), "--no_progress"]) == 1
    assert "nope.json: splits file not found" in capsys.readouterr().err
