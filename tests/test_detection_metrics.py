"""AP, lesion recall/precision and FROC on hand-worked examples; the detections.json schema round trip."""
import json
import math

import numpy as np
import pytest

from detection.detections_file import (CasePrediction, DetectionsFileError, read_detections_json,
                                       write_detections_json)
from detection.metrics import (CaseDetections, average_precision, evaluate_detections, froc,
                               lesion_recall_precision, match_case, mean_average_precision)

G1 = [0, 0, 0, 10, 10, 10]  # file format z1 y1 x1 z2 y2 x2
G2 = [20, 20, 20, 30, 30, 30]
G3 = [40, 0, 0, 50, 10, 10]


def worked_example():
    """Two volumes, three lesions, four predictions.

    case a: 0.9 -> G1 with IoU 0.6 (TP); 0.8 -> G1 again with IoU 0.5 (duplicate: FP)
    case b: 0.7 -> G2 exactly (TP); 0.6 -> nowhere (FP); G3 is missed
    pooled by score: TP, FP, TP, FP; 3 lesions
    """
    case_a = CaseDetections("a", [[0, 0, 0, 10, 10, 6], [0, 0, 0, 10, 10, 5]], [0.9, 0.8], [G1])
    case_b = CaseDetections("b", [[20, 20, 20, 30, 30, 30], [60, 60, 60, 64, 64, 64]], [0.7, 0.6], [G2, G3])
    return [case_a, case_b]


def test_average_precision_of_the_worked_example_is_five_ninths():
    # recall 1/3, 1/3, 2/3, 2/3; precision 1, 1/2, 2/3, 1/2; envelope 1, 2/3, 2/3, 1/2
    # AP = 1/3 * 1 + 1/3 * 2/3 = 5/9
    assert average_precision(worked_example(), 0.25) == pytest.approx(5 / 9)
    # at IoU 0.55 the first prediction still counts (0.6) and nothing else changes
    assert average_precision(worked_example(), 0.55) == pytest.approx(5 / 9)
    # at IoU 0.65 case a has no TP: TP only at rank 3 -> AP = 1/3 * 1/3
    assert average_precision(worked_example(), 0.65) == pytest.approx(1 / 9)


def test_average_precision_edge_cases_perfect_none_and_no_lesions():
    perfect = [CaseDetections("p", [G1, G2], [0.9, 0.1], [G1, G2])]
    assert average_precision(perfect, 0.5) == pytest.approx(1.0)
    no_predictions = [CaseDetections("n", np.zeros((0, 6)), [], [G1])]
    assert average_precision(no_predictions, 0.5) == 0.0
    no_lesions = [CaseDetections("e", [G1], [0.5], np.zeros((0, 6)))]
    assert math.isnan(average_precision(no_lesions, 0.5))


def test_map_is_the_mean_over_the_iou_thresholds():
    cases = worked_example()
    # thresholds 0.10 … 0.50 (all <= 0.6): AP 5/9 everywhere
    assert mean_average_precision(cases) == pytest.approx(5 / 9)
    assert mean_average_precision(cases, [0.25, 0.65]) == pytest.approx((5 / 9 + 1 / 9) / 2)


def test_lesion_recall_and_precision_of_the_worked_example():
    recall, precision = lesion_recall_precision(worked_example(), 0.25)
    assert recall == pytest.approx(2 / 3) and precision == pytest.approx(2 / 4)


def test_greedy_matching_gives_a_lesion_taken_by_a_higher_score_to_the_next_best_lesion():
    # prediction 2 overlaps G1 (IoU 0.6) more than GA (IoU 0.4) but G1 is already taken by prediction 1
    ga = [0, 0, 4, 10, 10, 14]
    p1 = G1
    p2 = [0, 0, 0, 10, 10, 6]  # IoU with G1 = 0.6, with ga: inter x 4..6 = 2*100=200, union 600+1000-200 -> 1/7
    case = CaseDetections("c", [p2, p1], [0.5, 0.9], [G1, ga])
    match = match_case(case, 0.1)
    assert match.is_true_positive.tolist() == [True, True]
    assert match.matched_gt.tolist() == [1, 0]
    strict = match_case(case, 0.2)  # 1/7 < 0.2: the duplicate is a false positive
    assert strict.is_true_positive.tolist() == [False, True]


def test_froc_of_the_worked_example_at_the_challenge_fp_rates():
    result = froc(worked_example(), iou_threshold=0.3)
    # operating points (FP per volume, sensitivity): (0, 0), (0, 1/3), (0.5, 1/3), (0.5, 2/3), (1, 2/3)
    assert result.fp_per_volume.tolist() == pytest.approx([0, 0, 0.5, 0.5, 1.0])
    assert result.sensitivity.tolist() == pytest.approx([0, 1 / 3, 1 / 3, 2 / 3, 2 / 3])
    # rates 1/8, 1/4 -> 1/3; 1/2, 1, 2, 4, 8 -> 2/3
    assert result.sensitivity_at_rates.tolist() == pytest.approx([1 / 3, 1 / 3] + [2 / 3] * 5)
    assert result.score == pytest.approx((2 / 3 + 10 / 3) / 7)
    assert result.num_volumes == 2 and result.num_lesions == 3


def test_froc_counts_volumes_without_predictions_and_groups_tied_scores():
    # one TP and one FP with the same score in volume 1; volumes 2-4 have no predictions (and no lesions)
    cases = [CaseDetections("t", [G1, G3], [0.5, 0.5], [G1])] + \
        [CaseDetections(f"empty{i}", np.zeros((0, 6)), [], np.zeros((0, 6))) for i in range(3)]
    result = froc(cases, 0.3, fp_rates=(0.125, 0.25, 1.0))
    # the tie enters together: (FP 1 / 4 volumes = 0.25, sensitivity 1)
    assert result.fp_per_volume.tolist() == pytest.approx([0.0, 0.25])
    assert result.sensitivity_at_rates.tolist() == pytest.approx([0.0, 1.0, 1.0])


def test_evaluate_detections_report_is_strict_json_with_all_documented_keys():
    report = evaluate_detections(worked_example()).to_json()
    text = json.dumps(report, allow_nan=False)
    loaded = json.loads(text)
    summary = loaded["summary"]
    assert set(summary["AP"]) == {"0.1", "0.25", "0.5"}
    assert summary["AP"]["0.25"] == pytest.approx(5 / 9)
    assert set(summary["FROC"]) == {"0.3", "0.1"}
    assert summary["FROC"]["0.3"]["score"] == pytest.approx(4 / 7)
    assert summary["lesion_recall"]["0.25"] == pytest.approx(2 / 3)
    assert summary["num_cases"] == 2 and summary["num_lesions"] == 3 and summary["num_predictions"] == 4
    assert [c["case"] for c in loaded["per_case"]] == ["a", "b"]
    assert loaded["per_case"][1]["best_iou"] == pytest.approx(1.0)


def test_detections_json_round_trip_sorts_scores_and_keeps_geometry(tmp_path):
    path = tmp_path / "detections.json"
    cases = {"ABUS_001": CasePrediction([[1, 2, 3, 4, 5, 6], [0, 0, 0, 9, 9, 9]], [0.2, 0.8], (10, 20, 30),
                                        (1.0, 0.5, 0.5)),
             "ABUS_002": CasePrediction(np.zeros((0, 6)), [], (5, 5, 5), (1, 1, 1))}
    write_detections_json(path, cases, {"model_path": "m.pt"})
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == 1 and raw["box_format"] == "z1,y1,x1,z2,y2,x2" and raw["axis_order"] == "zyx"
    assert raw["cases"]["ABUS_001"]["scores"] == [0.8, 0.2]
    back = read_detections_json(path)
    assert back["ABUS_001"].boxes.tolist() == [[0, 0, 0, 9, 9, 9], [1, 2, 3, 4, 5, 6]]
    assert list(back["ABUS_001"].image_shape_zyx) == [10, 20, 30]
    assert back["ABUS_002"].boxes.shape == (0, 6)


def test_reading_a_reference_style_detections_file_fails_with_a_message_naming_the_file(tmp_path):
    path = tmp_path / "detections.json"
    path.write_text(json.dumps({"001": {"boxes": [[0, 0, 0, 1, 1, 1]], "scores": [0.5]}}))
    with pytest.raises(DetectionsFileError, match=r"detections\.json.*segmamba-detections"):
        read_detections_json(path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_detections_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "segmamba-detections", "schema_version": 1, "box_format": "z1,y1,x1,z2,y2,x2",
                               "cases": {"X": {"boxes": [[0, 0, 0, 1, 1, 1]], "scores": []}}}))
    with pytest.raises(DetectionsFileError, match="case 'X'"):
        read_detections_json(bad)
