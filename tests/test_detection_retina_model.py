"""SegMamba-Retina: parameter counts, reference key layout, output shapes, pretrained loading, post-processing."""
import pytest
import torch

from detection.box_coder import BoxCoder3D
from detection.postprocess import PostProcessConfig, postprocess_detections
from model_segmamba.segmamba import SegMamba
from model_segmamba.segmamba_retina import (PretrainedLoadError, SegMambaWithRetina, build_retina_from_checkpoint,
                                            flatten_detection_outputs, freeze_backbone, load_pretrained_segmamba)

SMALL = dict(feat_size=(8, 16, 32, 64), hidden_size=32, fpn_channels=16, num_head_convs=1)


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_default_model_has_the_reference_parameter_counts_and_state_dict_keys():
    model = SegMambaWithRetina()
    assert count(model) == 73_307_138
    assert count(model.fpn) == 1_905_664
    assert count(model.retina_head) == 4_038_800
    assert freeze_backbone(model) == 73_307_138 - 5_944_464
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 5_944_464
    keys = model.state_dict()
    expected_shapes = {
        "vit.downsample_layers.0.0.weight": (48, 1, 7, 7, 7),
        "fpn.lateral_convs.0.weight": (128, 96, 1, 1, 1),
        "fpn.lateral_convs.3.weight": (128, 384, 1, 1, 1),
        "fpn.output_convs.2.conv.weight": (128, 128, 3, 3, 3),
        "fpn.output_convs.3.norm.bias": (128,),
        "retina_head.cls_tower.9.weight": (128, 128, 3, 3, 3),
        "retina_head.cls_tower.10.weight": (128,),
        "retina_head.reg_tower.0.weight": (128, 128, 3, 3, 3),
        "retina_head.cls_logits.weight": (18, 128, 3, 3, 3),
        "retina_head.box_reg.weight": (108, 128, 3, 3, 3),
        "retina_head.centerness.bias": (18,),
        "seg_out.conv.conv.weight": (2, 48, 1, 1, 1),
        "anchor_generator._dummy": (0,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(keys[key].shape) == shape, key
    assert not any(k.startswith("out.") for k in keys)
    # focal prior: every anchor starts at probability 0.01
    assert torch.sigmoid(model.retina_head.cls_logits.bias).tolist() == pytest.approx([0.01] * 18)


@pytest.fixture(scope="module")
def small_model_and_output():
    torch.manual_seed(0)
    model = SegMambaWithRetina(**SMALL).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 32, 32, 64))
    return model, out


def test_forward_on_a_32x32x64_patch_gives_per_level_maps_and_matching_anchors(small_model_and_output):
    model, out = small_model_and_output
    assert out["seg_logits"].shape == (1, 2, 32, 32, 64)
    level_shapes = [(8, 8, 16), (4, 4, 8), (2, 2, 4), (1, 1, 2)]
    assert [tuple(t.shape[2:]) for t in out["cls_logits"]] == level_shapes
    assert [t.shape[1] for t in out["box_deltas"]] == [108] * 4
    assert out["num_anchors_per_level"] == [18 * 8 * 8 * 16, 18 * 4 * 4 * 8, 18 * 2 * 2 * 4, 18 * 2]
    flat = flatten_detection_outputs(out, 1)
    n = sum(out["num_anchors_per_level"])
    assert flat["cls"].shape == (1, n, 1) and flat["box"].shape == (1, n, 6) and flat["anchors"].shape == (n, 6)


def test_input_smaller_than_32_or_not_a_multiple_of_16_is_refused_with_a_clear_message():
    model = SegMambaWithRetina(**SMALL)
    with pytest.raises(ValueError, match=">= 32"):
        model(torch.zeros(1, 1, 16, 32, 32))
    with pytest.raises(ValueError, match="multiple of 16"):
        model(torch.zeros(1, 1, 40, 32, 32))


def test_load_pretrained_segmamba_copies_backbone_and_renames_out_to_seg_out(tmp_path):
    torch.manual_seed(1)
    seg = SegMamba(1, 2, feat_size=SMALL["feat_size"], hidden_size=SMALL["hidden_size"])
    path = tmp_path / "seg.pt"
    torch.save({"module." + k: v for k, v in seg.state_dict().items()}, path)  # DDP-style prefix
    retina = SegMambaWithRetina(**SMALL)
    head_before = retina.retina_head.cls_logits.weight.clone()
    report = load_pretrained_segmamba(retina, str(path))
    assert report.renamed_out_to_seg_out and report.loaded == len(seg.state_dict())
    assert torch.equal(retina.seg_out.conv.conv.weight, seg.out.conv.conv.weight)
    assert torch.equal(retina.vit.stages[1][0].mamba.in_proj.weight, seg.vit.stages[1][0].mamba.in_proj.weight)
    assert torch.equal(retina.retina_head.cls_logits.weight, head_before)
    assert "retina_head.cls_logits.weight" in report.missing_detection_keys


def test_load_pretrained_segmamba_errors_on_missing_file_and_on_a_backbone_of_another_size(tmp_path):
    retina = SegMambaWithRetina(**SMALL)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_pretrained_segmamba(retina, str(tmp_path / "nope.pt"))
    other = SegMamba(1, 2, feat_size=(16, 32, 64, 128), hidden_size=32)
    path = tmp_path / "other.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(PretrainedLoadError, match=r"other\.pt.*\n.*shape mismatches"):
        load_pretrained_segmamba(retina, str(path))


def test_checkpoint_with_model_config_rebuilds_a_non_default_architecture():
    model = SegMambaWithRetina(**SMALL)
    checkpoint = {"format": "segmamba-checkpoint", "model": model.state_dict(), "model_config": model.model_config()}
    rebuilt = build_retina_from_checkpoint(checkpoint)
    assert rebuilt.fpn_channels == 16 and rebuilt.num_head_convs == 1
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value)


def test_postprocess_thresholds_suppresses_overlaps_and_caps_detections():
    anchors = torch.tensor([[0, 0, 10, 10, 0, 10], [1, 0, 11, 10, 0, 10], [50, 50, 60, 60, 50, 60],
                            [80, 80, 90, 90, 80, 90], [20, 20, 30, 30, 20, 30]], dtype=torch.float32)
    probabilities = torch.tensor([0.9, 0.8, 0.7, 0.04, 0.6])
    logits = torch.log(probabilities / (1 - probabilities))[:, None]
    deltas = torch.zeros(5, 6)
    boxes, scores = postprocess_detections(logits, deltas, anchors, BoxCoder3D(),
                                           PostProcessConfig(score_threshold=0.05, nms_threshold=0.5,
                                                             max_detections=100))
    # anchor 1 overlaps anchor 0 with IoU 9/11 > 0.5 -> suppressed; anchor 3 is below the threshold
    assert scores.tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert boxes[1].tolist() == [50, 50, 60, 60, 50, 60]
    _, capped = postprocess_detections(logits, deltas, anchors, BoxCoder3D(),
                                       PostProcessConfig(score_threshold=0.05, max_detections=2))
    assert capped.tolist() == pytest.approx([0.9, 0.7])
    _, top1 = postprocess_detections(logits, deltas, anchors, BoxCoder3D(),
                                     PostProcessConfig(score_threshold=0.05, pre_nms_top_k=1))
    assert top1.tolist() == pytest.approx([0.9])
