"""End to end: the five ABUS scripts (+ the Seg→Box baseline) on a tiny generated dataset, on the CPU.

The scripts run in this process through their ``main(argv)`` (same code path as the command line, without
paying the interpreter start-up five times). Model sizes and patches are tiny; the point is that every stage
reads exactly what the previous one wrote, with geometry and coordinates intact.
"""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import abus_compute_metrics
import abus_det_compute_metrics
import abus_preprocessing
import abus_retina_predict
import abus_retina_train
import abus_seg_box_eval
import abus_train
from detection.boxes import box_iou, mask_to_boxes
from detection.detections_file import read_detections_json
from tools.make_abus_demo import generate

TINY_MODEL = ["--depths", "1", "1", "1", "1", "--feat_size", "8", "16", "32", "64", "--hidden_size", "32"]
PATCH = ["--patch_size", "32", "32", "32"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster on a shared 2-core CI machine
    try:
        yield run_pipeline(tmp_path_factory)
    finally:
        torch.set_num_threads(threads)


def run_pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("abus")
    raw = root / "raw"
    generate(str(raw), num_cases=6, num_without_lesion=1, shape_zyx=(32, 48, 48), spacing_xyz=(0.7, 0.7, 0.7),
             seed=3, progress=False)
    out = root / "abus"
    codes = {}
    codes["preprocess"] = abus_preprocessing.main(
        ["--abus_root", str(raw), "--output_base", str(out), "--num_processes", "1", "--train_ratio", "0.6",
         "--val_ratio", "0.2", "--no_progress"])
    seg_log = root / "logs_seg"
    codes["train"] = abus_train.main(
        ["--data_dir_train", str(out / "train"), "--data_dir_val", str(out / "val"), "--logdir", str(seg_log),
         "--max_epoch", "1", "--iterations_per_epoch", "1", "--batch_size", "1", "--num_workers", "0",
         "--device", "cpu", "--augmentation", "none", "--no_progress", *PATCH, *TINY_MODEL])
    retina_log = root / "logs_retina"
    codes["retina_train"] = abus_retina_train.main(
        ["--data_dir_train", str(out / "train"), "--data_dir_val", str(out / "val"),
         "--pretrained_seg", str(seg_log / "model" / "best_model.pt"), "--freeze_backbone", "--full_volume_val",
         "--save_dir", str(retina_log), "--max_epoch", "1", "--iterations_per_epoch", "1", "--batch_size", "1",
         "--fpn_channels", "16", "--num_head_convs", "1", "--num_workers", "0", "--device", "cpu",
         "--det_warmup_epochs", "1", "--no_progress", *PATCH])
    pred_dir = root / "predictions" / "segmamba_abus_retina"
    codes["predict"] = abus_retina_predict.main(
        ["--model_path", str(retina_log / "model" / "best_model.pt"), "--data_dir_test", str(out / "test"),
         "--save_path", str(pred_dir), "--save_seg", "--device", "cpu", "--score_threshold", "0.0",
         "--no_progress"])
    codes["seg_metrics"] = abus_compute_metrics.main(
        ["--pred_name", "segmamba_abus_retina", "--split_info", str(out / "split_info.json"),
         "--results_root", str(root / "predictions"), "--num_processes", "1", "--no_progress"])
    codes["det_metrics"] = abus_det_compute_metrics.main(
        ["--pred_file", str(pred_dir / "detections.json"), "--split_info", str(out / "split_info.json"),
         "--num_processes", "1", "--no_progress"])
    box_dir = root / "predictions" / "seg_box"
    masks_copied = []
    for name in os.listdir(pred_dir):
        if name.endswith(".nii.gz"):
            (box_dir).mkdir(parents=True, exist_ok=True)
            (box_dir / name).write_bytes((pred_dir / name).read_bytes())
            masks_copied.append(name)
    codes["seg_box"] = abus_seg_box_eval.main(
        ["--pred_dir", str(box_dir), "--split_info", str(out / "split_info.json"), "--min_volume", "1",
         "--num_processes", "1", "--no_progress"])
    return {"root": root, "raw": raw, "out": out, "seg_log": seg_log, "retina_log": retina_log,
            "pred_dir": pred_dir, "box_dir": box_dir, "codes": codes}


def test_every_stage_exits_successfully(pipeline):
    assert pipeline["codes"] == {"preprocess": 0, "train": 0, "retina_train": 0, "predict": 0, "seg_metrics": 0,
                                 "det_metrics": 0, "seg_box": 0}


def test_preprocessing_skips_the_lesion_free_case_and_records_the_raw_mask_of_every_case(pipeline):
    info = json.loads((pipeline["out"] / "split_info.json").read_text())
    assert len(info["skipped_without_lesion"]) == 1
    assert (len(info["train"]), len(info["val"]), len(info["test"])) == (3, 1, 1)
    for name, entry in info["cases"].items():
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(pipeline["raw"] / entry["mask"])))
        assert mask.max() > 0 and entry["original_folder"] in entry["mask"]
        assert (pipeline["out"] / entry["split"] / f"{name}.npz").is_file()


def test_checkpoints_store_the_architecture_so_prediction_rebuilds_the_trained_model(pipeline):
    checkpoint = torch.load(pipeline["retina_log"] / "model" / "best_model.pt", weights_only=True)
    assert checkpoint["model_config"]["fpn_channels"] == 16
    assert checkpoint["model_config"]["feat_size"] == [8, 16, 32, 64]  # taken over from the segmentation model
    assert checkpoint["inference"]["patch_size"] == [32, 32, 32]
    assert checkpoint["config"]["selection_key"] == "froc_iou0.3"  # frozen backbone: detection metric
    seg = torch.load(pipeline["seg_log"] / "model" / "best_model.pt", weights_only=True)
    assert seg["run_settings"]["patch_size"] == [32, 32, 32]  # the Seg -> Box script's default window
    assert checkpoint["run_settings"]["freeze_backbone"] is True
    backbone = {k: v for k, v in seg["model"].items() if k.startswith("vit.")}
    for key, value in backbone.items():  # frozen backbone really stayed the pretrained one
        assert torch.equal(checkpoint["model"][key], value), key
    assert (pipeline["retina_log"] / "progress.png").is_file()


def test_detections_json_boxes_lie_in_the_raw_volume_with_sorted_scores(pipeline):
    detections = read_detections_json(pipeline["pred_dir"] / "detections.json")
    info = json.loads((pipeline["out"] / "split_info.json").read_text())
    assert sorted(detections) == info["test"]
    for name, prediction in detections.items():
        raw_shape = info["cases"][name]["shape_zyx"]
        assert list(prediction.image_shape_zyx) == raw_shape
        assert prediction.boxes.shape[0] > 0  # score threshold 0 keeps the best boxes even untrained
        assert np.all(prediction.boxes[:, :3] >= 0) and np.all(prediction.boxes[:, 3:] <= np.asarray(raw_shape))
        assert np.all(prediction.boxes[:, 3:] > prediction.boxes[:, :3])
        assert np.all(np.diff(prediction.scores) <= 0)


def test_saved_masks_keep_the_raw_geometry(pipeline):
    info = json.loads((pipeline["out"] / "split_info.json").read_text())
    for name in info["test"]:
        prediction = sitk.ReadImage(str(pipeline["pred_dir"] / f"{name}.nii.gz"))
        raw = sitk.ReadImage(str(pipeline["raw"] / info["cases"][name]["image"]))
        assert prediction.GetSize() == raw.GetSize()
        assert prediction.GetSpacing() == pytest.approx(raw.GetSpacing())
        assert prediction.GetOrigin() == pytest.approx(raw.GetOrigin())
        assert prediction.GetDirection() == pytest.approx(raw.GetDirection())


def test_metric_scripts_read_the_prediction_outputs_and_report_consistent_numbers(pipeline):
    seg_summary = json.loads((pipeline["root"] / "predictions" / "result_metrics" / "segmamba_abus_retina.json").read_text())
    assert seg_summary["num_cases"] == 1 and 0.0 <= seg_summary["summary"]["dice"]["mean"] <= 1.0
    report = json.loads((pipeline["pred_dir"] / "metrics" / "detection_metrics.json").read_text())
    summary = report["summary"]
    detections = read_detections_json(pipeline["pred_dir"] / "detections.json")
    assert summary["num_predictions"] == sum(p.boxes.shape[0] for p in detections.values())
    # The lesions counted are the 6-connected components of the raw test masks.
    info = json.loads((pipeline["out"] / "split_info.json").read_text())
    lesions, best = 0, []
    for name in info["test"]:
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(pipeline["raw"] / info["cases"][name]["mask"])))
        gt = mask_to_boxes(mask > 0, connectivity=6)[0]
        lesions += gt.shape[0]
        best.append(box_iou(detections[name].boxes, gt.astype(float), fmt="zyxzyx").max())
    assert summary["num_lesions"] == lesions
    assert summary["mean_best_iou"] == pytest.approx(float(np.mean(best)))
    assert set(summary["FROC"]) == {"0.3", "0.1"} and (pipeline["pred_dir"] / "metrics" / "froc.png").is_file()
    assert (pipeline["box_dir"] / "seg_box_metrics" / "detection_metrics.json").is_file()
    seg_box = read_detections_json(pipeline["box_dir"] / "detections.json")
    assert sorted(seg_box) == info["test"]


def test_interrupted_retina_training_resumes_to_the_same_weights_and_never_overwrites_a_run(pipeline, capsys,
                                                                                        monkeypatch):
    from detection.retina_training import RetinaTrainer

    out, logs = pipeline["out"], pipeline["root"]
    common = ["--data_dir_train", str(out / "train"), "--data_dir_val", str(out / "val"), "--max_epoch", "2",
              "--iterations_per_epoch", "1", "--batch_size", "1", "--fpn_channels", "8", "--num_head_convs", "1",
              "--num_workers", "0", "--device", "cpu", "--no_progress", "--det_warmup_epochs", "2", *PATCH,
              *TINY_MODEL]
    assert abus_retina_train.main([*common, "--save_dir", str(logs / "straight")]) == 0

    def stop_after_first_epoch(self, epoch):
        if epoch == 0:
            raise KeyboardInterrupt("simulated kill after epoch 1")
    with monkeypatch.context() as patch:
        patch.setattr(RetinaTrainer, "on_epoch_end", stop_after_first_epoch)
        with pytest.raises(KeyboardInterrupt):
            abus_retina_train.main([*common, "--save_dir", str(logs / "interrupted")])
    interrupted = torch.load(logs / "interrupted" / "model" / "final_model.pt", weights_only=True)
    assert interrupted["epoch"] == 0
    assert abus_retina_train.main([*common, "--save_dir", str(logs / "interrupted")]) == 1  # never overwritten
    assert "--resume" in capsys.readouterr().err
    assert abus_retina_train.main([*common, "--save_dir", str(logs / "interrupted"), "--resume"]) == 0
    resumed = torch.load(logs / "interrupted" / "model" / "final_model.pt", weights_only=True)
    straight = torch.load(logs / "straight" / "model" / "final_model.pt", weights_only=True)
    assert resumed["epoch"] == straight["epoch"] == 1 and resumed["global_step"] == 2
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert any(not torch.equal(interrupted["model"][k], straight["model"][k]) for k in straight["model"]
               if k.startswith("retina_head."))  # the second epoch did change the detector
