"""ABUS script interfaces: the seed README's flags and defaults, --help showing every default, clear errors,
and the metric scripts' numbers for perfect predictions of cases from every original folder."""
import json
import os

import numpy as np
import pytest

import abus_compute_metrics
import abus_det_compute_metrics
import abus_preprocessing
import abus_retina_predict
import abus_retina_train
import abus_seg_box_eval
import abus_train
from detection.boxes import mask_to_boxes
from detection.detections_file import CasePrediction, write_detections_json
from light_training.io import read_image, write_image
from tools.make_abus_demo import generate

# Defaults as documented in the seed README's tables (abus_root: the project's documented local default).
SEED_README_DEFAULTS = {
    abus_preprocessing: {"abus_root": "./data/raw_data/ABUS", "output_base": "./data/abus", "seed": 42,
                         "train_ratio": 0.8, "val_ratio": 0.1, "num_processes": 4},
    abus_retina_train: {"pretrained_seg": "", "freeze_backbone": False, "full_volume_val": False, "fg_ratio": 0.5,
                        "det_warmup_epochs": 50, "max_epoch": 500, "data_dir_train": "./data/abus/train",
                        "data_dir_val": "./data/abus/val", "fpn_channels": 128, "num_head_convs": 4,
                        "batch_size": 2, "lr": 1e-4, "weight_decay": 1e-5, "seg_weight": 1.0, "det_weight": 1.0,
                        "focal_alpha": 0.25, "focal_gamma": 2.0, "atss_candidates": 9, "sampler_batch_size": 256,
                        "sampler_pos_fraction": 0.25, "save_dir": "./logs/segmamba_abus_retina",
                        "num_workers": 4, "seed": 42},
    abus_retina_predict: {"data_dir_test": "./data/abus/test", "save_seg": False, "overlap": 0.5,
                          "score_threshold": 0.05, "nms_threshold": 0.5, "batch_size": 2,
                          "save_path": "./prediction_results/segmamba_abus_retina"},
    abus_train: {"data_dir_train": "./data/abus/train", "data_dir_val": "./data/abus/val",
                 "logdir": "./logs/segmamba_abus", "max_epoch": 1000, "batch_size": 2, "val_every": 2, "lr": 0.01},
    abus_compute_metrics: {"pred_name": "segmamba_abus"},
    abus_det_compute_metrics: {"pred_file": "./prediction_results/segmamba_abus_retina/detections.json"},
}


@pytest.mark.parametrize("script", list(SEED_README_DEFAULTS), ids=lambda m: m.__name__)
def test_documented_flags_exist_with_their_documented_defaults(script):
    parser = script.build_parser()
    required = {"abus_retina_predict": ["--model_path", "m.pt"]}.get(script.__name__, [])
    args = vars(parser.parse_args(required))
    for flag, expected in SEED_README_DEFAULTS[script].items():
        assert args[flag] == expected, f"{script.__name__} --{flag}"


@pytest.mark.parametrize("script", [abus_preprocessing, abus_train, abus_retina_train, abus_retina_predict,
                                    abus_compute_metrics, abus_det_compute_metrics, abus_seg_box_eval],
                         ids=lambda m: m.__name__)
def test_help_shows_the_default_of_every_flag(script):
    parser = script.build_parser()
    text = parser.format_help()
    options = text[text.index("options:"):]
    for action in parser._actions:
        if action.dest == "help" or action.required:
            continue
        block = options[options.index("\n  " + action.option_strings[0]):]
        block = block[1:].split("\n  -")[0]  # this option's lines, up to the next option
        assert "(default:" in " ".join(block.split()), action.option_strings[0]


def test_retina_train_refuses_a_missing_pretrained_checkpoint(tmp_path, capsys):
    code = abus_retina_train.main(["--pretrained_seg", str(tmp_path / "best_model.pt"), "--device", "cpu",
                                   "--data_dir_train", str(tmp_path), "--data_dir_val", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert "best_model.pt" in err and "not found" in err


def test_predict_with_a_missing_checkpoint_exits_with_a_message(tmp_path, capsys):
    assert abus_retina_predict.main(["--model_path", str(tmp_path / "nope.pt"), "--device", "cpu"]) == 1
    assert "nope.pt" in capsys.readouterr().err


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
    root = tmp_path_factory.mktemp("abus_cli")
    generate(str(root / "raw"), num_cases=6, num_without_lesion=0, shape_zyx=(16, 24, 24), seed=9, progress=False)
    # a large test share, so that test cases come from the Train folder as well as from Test
    assert abus_preprocessing.main(["--abus_root", str(root / "raw"), "--output_base", str(root / "abus"),
                                    "--num_processes", "1", "--train_ratio", "0.34", "--val_ratio", "0.16",
                                    "--no_progress"]) == 0
    return root


def test_perfect_predictions_score_one_for_test_cases_from_any_original_folder(preprocessed, capsys):
    root = preprocessed
    info = json.loads((root / "abus" / "split_info.json").read_text())
    folders = {info["cases"][n]["original_folder"] for n in info["test"]}
    assert len(info["test"]) == 3 and folders - {"Test"}, folders  # GT must be found outside data/Test too
    detections = {}
    pred_dir = root / "predictions" / "perfect"
    for name in info["test"]:
        mask, geometry = read_image(str(root / "raw" / info["cases"][name]["mask"]))
        boxes = mask_to_boxes(mask > 0)[0]
        detections[name] = CasePrediction(boxes, np.linspace(0.9, 0.5, len(boxes)), mask.shape, geometry.spacing_zyx)
        write_image((mask > 0).astype(np.uint8), str(pred_dir / f"{name}.nii.gz"), geometry)
    write_detections_json(pred_dir / "detections.json", detections)
    split_info = str(root / "abus" / "split_info.json")
    assert abus_det_compute_metrics.main(["--pred_file", str(pred_dir / "detections.json"), "--split_info", split_info,
                                          "--num_processes", "1", "--no_progress"]) == 0
    summary = json.loads((pred_dir / "metrics" / "detection_metrics.json").read_text())["summary"]
    assert summary["AP"] == {"0.1": 1.0, "0.25": 1.0, "0.5": 1.0} and summary["mAP"] == 1.0
    assert summary["FROC"]["0.3"]["score"] == 1.0 and summary["lesion_recall"]["0.5"] == 1.0
    assert abus_compute_metrics.main(["--pred_name", "perfect", "--split_info", split_info, "--results_root",
                                      str(root / "predictions"), "--num_processes", "1", "--no_progress"]) == 0
    seg = json.loads((root / "predictions" / "result_metrics" / "perfect.json").read_text())
    assert seg["summary"]["dice"]["mean"] == 1.0 and seg["summary"]["hd95_mm"]["max"] == 0.0
    assert seg["summary"]["hausdorff_mm"]["max"] == 0.0
    # Seg -> Box on the perfect masks finds every lesion exactly (scores from component size)
    assert abus_seg_box_eval.main(["--pred_dir", str(pred_dir), "--split_info", split_info, "--min_volume", "1",
                                   "--num_processes", "1", "--no_progress"]) == 0
    seg_box = json.loads((pred_dir / "seg_box_metrics" / "detection_metrics.json").read_text())["summary"]
    assert seg_box["lesion_recall"]["0.5"] == 1.0 and seg_box["lesion_precision"]["0.5"] == 1.0


def test_metric_scripts_list_missing_predictions_and_refuse_foreign_detection_files(preprocessed, capsys):
    root = preprocessed
    info = json.loads((root / "abus" / "split_info.json").read_text())
    split_info = str(root / "abus" / "split_info.json")
    pred_dir = root / "predictions" / "partial"
    first = info["test"][0]
    mask, geometry = read_image(str(root / "raw" / info["cases"][first]["mask"]))
    write_image(np.zeros(mask.shape, np.uint8), str(pred_dir / f"{first}.nii.gz"), geometry)
    assert abus_compute_metrics.main(["--pred_name", "partial", "--split_info", split_info, "--results_root",
                                      str(root / "predictions"), "--num_processes", "1", "--no_progress"]) == 3
    err = capsys.readouterr().err
    assert info["test"][1] in err
    result = json.loads((root / "predictions" / "result_metrics" / "partial.json").read_text())
    assert result["per_case"][first]["dice"] == 0.0 and result["per_case"][first]["hd95_mm"] == 50.0
    foreign = pred_dir / "detections.json"
    foreign.write_text(json.dumps({first[5:]: {"boxes": [[0, 0, 0, 4, 4, 4]], "scores": [0.9]}}))
    assert abus_det_compute_metrics.main(["--pred_file", str(foreign), "--split_info", split_info,
                                          "--no_progress"]) == 1
    assert "detections.json" in capsys.readouterr().err


def test_segmentation_metrics_of_shifted_cubes_match_medpy_on_the_full_volume_and_the_hand_value():
    from medpy.metric.binary import hd as medpy_hd

    gt = np.zeros((20, 24, 40), dtype=bool)
    gt[4:10, 5:11, 6:12] = True
    pred = np.roll(gt, 3, axis=2)  # shifted by 3 voxels along x
    spacing_zyx = (2.0, 1.0, 0.5)
    metrics = abus_compute_metrics.surface_distance_metrics(pred, gt, spacing_zyx)
    assert metrics["hausdorff_mm"] == pytest.approx(1.5)  # 3 voxels x 0.5 mm
    assert metrics["hausdorff_mm"] == pytest.approx(medpy_hd(pred, gt, voxelspacing=spacing_zyx))
    assert metrics["dice"] == pytest.approx(2 * 6 * 6 * 3 / (2 * 216))
    assert abus_compute_metrics.surface_distance_metrics(np.zeros_like(gt), np.zeros_like(gt), spacing_zyx) == \
        {"dice": 1.0, "hd95_mm": 0.0, "hausdorff_mm": 0.0, "gt_voxels": 0, "pred_voxels": 0}
