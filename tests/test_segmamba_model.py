"""SegMamba model: parameter counts from the published architecture, shapes for cubic and non-cubic inputs,
the reference state-dict layout, checked weight loading, and that it learns on CPU."""
import math

import pytest
import torch
import torch.nn.functional as F

from model_segmamba import GSC, CheckpointMismatchError, MambaEncoder, MambaLayer, MlpChannel, SegMamba
from model_segmamba.weights import load_model_weights


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_match_the_published_model():
    # Totals from reference-behaviour.md Appendix A (computed there from layer shapes, not from this code).
    assert n_params(SegMamba(in_chans=4, out_chans=4)) == 67_416_196
    assert n_params(SegMamba(in_chans=1, out_chans=2)) == 67_362_674
    assert n_params(MambaEncoder(in_chans=1)) == 15_668_688
    assert n_params(MambaLayer(48)) == 31_488


@pytest.mark.parametrize("c", [48, 96, 192])
def test_block_parameter_formulas(c):
    r = math.ceil(c / 16)
    assert n_params(GSC(c)) == 56 * c * c + 4 * c
    assert n_params(MlpChannel(c, 2 * c)) == 4 * c * c + 3 * c
    assert n_params(MambaLayer(c)) == 6 * c * c + 332 * c + 12 * c * r


def test_output_head_follows_feat_size():
    m = SegMamba(in_chans=1, out_chans=3, feat_size=[16, 32, 64, 128], hidden_size=256)
    assert m.out.conv.conv.weight.shape == (3, 16, 1, 1, 1)
    with torch.no_grad():
        assert m(torch.randn(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_forward_shape_for_a_64_cube_with_four_channels():
    torch.manual_seed(0)
    m = SegMamba(in_chans=4, out_chans=4).eval()
    with torch.no_grad():
        y = m(torch.randn(1, 4, 64, 64, 64))
    assert y.shape == (1, 4, 64, 64, 64)
    assert torch.isfinite(y).all()


def test_forward_shapes_for_a_non_cubic_input_including_encoder_outputs():
    torch.manual_seed(0)
    m = SegMamba(in_chans=1, out_chans=2).eval()
    x = torch.randn(1, 1, 32, 48, 64)
    with torch.no_grad():
        outs = m.vit(x)
        y = m(x)
    assert [tuple(o.shape) for o in outs] == [(1, 48, 16, 24, 32), (1, 96, 8, 12, 16), (1, 192, 4, 6, 8),
                                              (1, 384, 2, 3, 4)]
    assert y.shape == (1, 2, 32, 48, 64)


def test_input_not_divisible_by_16_is_rejected_with_a_clear_error():
    m = SegMamba(in_chans=1, out_chans=2)
    with pytest.raises(ValueError, match="multiple of 16"):
        m(torch.randn(1, 1, 32, 40, 32))
    with pytest.raises(ValueError, match=r"expects \(B, 1, D, H, W\)"):
        m(torch.randn(1, 4, 32, 32, 32))


def reference_state_dict_keys(in_chans=4):
    """The published SegMamba state-dict keys, written out from reference-behaviour.md section 1.10."""
    keys = ["vit.downsample_layers.0.0.weight", "vit.downsample_layers.0.0.bias"]
    for i in (1, 2, 3):
        keys += [f"vit.downsample_layers.{i}.1.weight", f"vit.downsample_layers.{i}.1.bias"]
    for i in range(4):
        for proj in ("proj", "proj2", "proj3", "proj4"):
            keys += [f"vit.gscs.{i}.{proj}.weight", f"vit.gscs.{i}.{proj}.bias"]
        for j in range(2):
            p = f"vit.stages.{i}.{j}."
            keys += [p + "norm.weight", p + "norm.bias", p + "mamba.in_proj.weight", p + "mamba.out_proj.weight"]
            for sfx in ("", "_b", "_s"):
                keys += [f"{p}mamba.conv1d{sfx}.weight", f"{p}mamba.conv1d{sfx}.bias",
                         f"{p}mamba.x_proj{sfx}.weight", f"{p}mamba.dt_proj{sfx}.weight",
                         f"{p}mamba.dt_proj{sfx}.bias", f"{p}mamba.D{sfx}"]
            keys += [p + "mamba.A_log", p + "mamba.A_b_log", p + "mamba.A_s_log"]
        keys += [f"vit.mlps.{i}.fc1.weight", f"vit.mlps.{i}.fc1.bias", f"vit.mlps.{i}.fc2.weight",
                 f"vit.mlps.{i}.fc2.bias"]
    for k in range(1, 6):  # encoder1..5: residual UNETR blocks, 1x1 projection only when channels change
        keys += [f"encoder{k}.layer.conv1.conv.weight", f"encoder{k}.layer.conv2.conv.weight",
                 f"encoder{k}.layer.conv3.conv.weight"]
    for k in range(2, 6):
        keys += [f"decoder{k}.transp_conv.conv.weight"] + [f"decoder{k}.conv_block.conv{c}.conv.weight"
                                                            for c in (1, 2, 3)]
    keys += ["decoder1.layer.conv1.conv.weight", "decoder1.layer.conv2.conv.weight",
             "out.conv.conv.weight", "out.conv.conv.bias"]
    return set(keys)


def test_state_dict_keys_follow_the_reference_layout():
    assert set(SegMamba(in_chans=4, out_chans=4).state_dict()) == reference_state_dict_keys()


def test_reference_layout_checkpoint_loads_with_wrappers_and_prefixes(tmp_path):
    src = SegMamba(in_chans=1, out_chans=2)
    wrapped = {"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}
    path = tmp_path / "ref.pt"
    torch.save(wrapped, path)
    dst = SegMamba(in_chans=1, out_chans=2)
    load_model_weights(dst, str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_checkpoint_of_another_model_is_refused_with_the_mismatches_listed(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(SegMamba(in_chans=1, out_chans=2).state_dict(), path)
    dst = SegMamba(in_chans=4, out_chans=4)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as err:
        load_model_weights(dst, str(path))
    msg = str(err.value)
    assert "shape mismatches" in msg and "vit.downsample_layers.0.0.weight" in msg and "out.conv.conv.weight" in msg
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())  # untouched


def test_missing_checkpoint_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_model_weights(SegMamba(1, 2), str(tmp_path / "nope.pt"))


def test_training_steps_on_cpu_reduce_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    m = SegMamba(in_chans=4, out_chans=4, feat_size=[16, 32, 64, 128], hidden_size=128)
    x = torch.randn(1, 4, 32, 32, 32)
    y = (x[:, :1] > 0.5).long().squeeze(1) + (x[:, 1:2] > 1.0).long().squeeze(1)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
