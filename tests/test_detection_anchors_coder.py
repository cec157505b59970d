"""Anchor grid, head-output flattening order and the box coder (vs MONAI's BoxCoder and hand values)."""
import math

import pytest
import torch
from monai.apps.detection.utils.box_coder import BoxCoder as MonaiBoxCoder

from detection.anchors import AnchorGenerator3D
from detection.box_coder import BoxCoder3D
from detection.boxes import INTERNAL_FORMAT, MONAI_FORMAT, convert_boxes
from detection.retina_head import flatten_level_outputs

# Our delta order is [dx, dy, dw, dh, dz, dd]; MONAI's 3D order is [dx, dy, dz, dw, dh, dd].
OURS_TO_MONAI_DELTAS = [0, 1, 4, 2, 3, 5]


def test_default_anchors_for_a_128_cube_patch_match_the_reference_counts_and_first_anchor():
    generator = AnchorGenerator3D()
    anchors, per_level = generator.grid_anchors([(32, 32, 32), (16, 16, 16), (8, 8, 8), (4, 4, 4)])
    assert generator.num_anchors_per_location == 18
    assert per_level == [589824, 73728, 9216, 1152]
    assert anchors.shape == (673920, 6)
    torch.testing.assert_close(anchors[0], torch.tensor([-3.657, -0.828, 7.657, 4.828, 0.0, 4.0]),
                               atol=1e-3, rtol=0)


def test_anchor_index_is_level_then_zyx_location_then_anchor_with_centres_at_half_strides():
    generator = AnchorGenerator3D()
    shapes = [(8, 8, 8), (4, 4, 4), (2, 2, 2), (1, 1, 1)]  # a 32^3 patch
    anchors, per_level = generator.grid_anchors(shapes, dtype=torch.float64)
    assert per_level == [18 * 512, 18 * 64, 18 * 8, 18 * 1] and anchors.shape[0] == 10530
    centres = torch.stack([(anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2,
                           (anchors[:, 4] + anchors[:, 5]) / 2], dim=1)  # x, y, z
    # level 0 (stride 4), location z=1, y=2, x=3 -> index (1*64 + 2*8 + 3) * 18 + a
    for a in (0, 7, 17):
        assert centres[(1 * 64 + 2 * 8 + 3) * 18 + a].tolist() == pytest.approx([14.0, 10.0, 6.0])
    # level 1 (stride 8), location z=0, y=3, x=1
    start = per_level[0]
    assert centres[start + (0 * 16 + 3 * 4 + 1) * 18 + 5].tolist() == pytest.approx([12.0, 28.0, 4.0])
    # the single stride-32 location is centred at 16
    assert centres[-1].tolist() == pytest.approx([16.0, 16.0, 16.0])
    # anchor 17 of a level is (size 3, ratio 2.0, z ratio 1.0): w = s / sqrt 2, h = s * sqrt 2, d = s
    last_level_anchor = anchors[-1]
    size = 256.0
    assert (last_level_anchor[2] - last_level_anchor[0]).item() == pytest.approx(size / math.sqrt(2))
    assert (last_level_anchor[3] - last_level_anchor[1]).item() == pytest.approx(size * math.sqrt(2))
    assert (last_level_anchor[5] - last_level_anchor[4]).item() == pytest.approx(size)


def test_flattened_head_outputs_follow_the_anchor_enumeration_order():
    num_anchors, values = 3, 6
    level_shapes = [(2, 3, 4), (1, 2, 2)]
    maps, expected_rows = [], []
    for level, (d, h, w) in enumerate(level_shapes):
        out = torch.zeros(2, num_anchors * values, d, h, w)
        for a in range(num_anchors):
            for j in range(values):
                for z in range(d):
                    for y in range(h):
                        for x in range(w):
                            # anchor-major channels: channel a * V + j
                            out[:, a * values + j, z, y, x] = level * 1e4 + ((z * h + y) * w + x) * 100 + a * 10 + j
        maps.append(out)
        for loc in range(d * h * w):
            for a in range(num_anchors):
                expected_rows.append([level * 1e4 + loc * 100 + a * 10 + j for j in range(values)])
    flat = flatten_level_outputs(maps, values)
    assert flat.shape == (2, len(expected_rows), values)
    assert torch.equal(flat[1], torch.tensor(expected_rows, dtype=torch.float32))


def test_encode_gives_hand_computed_deltas_in_dx_dy_dw_dh_dz_dd_order():
    anchor = torch.tensor([[0.0, 0.0, 4.0, 4.0, 0.0, 4.0]])  # centre (2, 2, 2), size 4
    box = torch.tensor([[1.0, 0.0, 5.0, 8.0, 0.0, 2.0]])  # centre (3, 4, 1), size (4, 8, 2)
    deltas = BoxCoder3D().encode(box, anchor)
    expected = torch.tensor([[0.25, 0.5, 0.0, math.log(2.0), -0.25, math.log(0.5)]])
    torch.testing.assert_close(deltas, expected)


def test_encode_decode_round_trip_recovers_boxes():
    g = torch.Generator().manual_seed(0)
    lo = torch.rand(500, 3, generator=g, dtype=torch.float64) * 100
    boxes_size = torch.rand(500, 3, generator=g, dtype=torch.float64) * 40 + 1.5
    anchors_size = torch.rand(500, 3, generator=g, dtype=torch.float64) * 60 + 4
    def make(lo_, size):
        hi = lo_ + size
        return torch.stack([lo_[:, 0], lo_[:, 1], hi[:, 0], hi[:, 1], lo_[:, 2], hi[:, 2]], dim=1)
    boxes = make(lo, boxes_size)
    anchors = make(lo + torch.randn(500, 3, generator=g, dtype=torch.float64) * 5, anchors_size)
    coder = BoxCoder3D(weights=(10.0, 10.0, 5.0, 5.0, 10.0, 5.0))
    torch.testing.assert_close(coder.decode(coder.encode(boxes, anchors), anchors), boxes)


def test_encode_and_decode_match_monai_box_coder_with_non_unit_weights():
    g = torch.Generator().manual_seed(1)
    lo = torch.rand(50, 3, generator=g, dtype=torch.float64) * 50
    boxes = torch.cat([lo, lo + torch.rand(50, 3, generator=g, dtype=torch.float64) * 20 + 2], dim=1)  # MONAI fmt
    anchors = torch.cat([lo + 1, lo + 1 + torch.rand(50, 3, generator=g, dtype=torch.float64) * 20 + 2], dim=1)
    ours_weights = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)  # wx, wy, ww, wh, wz, wd
    monai_weights = [ours_weights[i] for i in OURS_TO_MONAI_DELTAS]  # wx, wy, wz, ww, wh, wd
    ours = BoxCoder3D(weights=ours_weights)
    theirs = MonaiBoxCoder(weights=monai_weights)
    boxes_i = convert_boxes(boxes, MONAI_FORMAT, INTERNAL_FORMAT)
    anchors_i = convert_boxes(anchors, MONAI_FORMAT, INTERNAL_FORMAT)
    deltas = ours.encode(boxes_i, anchors_i)
    torch.testing.assert_close(deltas[:, OURS_TO_MONAI_DELTAS], theirs.encode_single(boxes, anchors))
    random_deltas = torch.randn(50, 6, generator=g, dtype=torch.float64) * 0.3
    decoded = ours.decode(random_deltas, anchors_i)
    monai_decoded = theirs.decode_single(random_deltas[:, OURS_TO_MONAI_DELTAS], anchors)
    torch.testing.assert_close(convert_boxes(decoded, INTERNAL_FORMAT, MONAI_FORMAT), monai_decoded)


def test_decode_clamps_log_size_deltas_so_huge_predictions_stay_finite():
    anchor = torch.tensor([[0.0, 0.0, 16.0, 16.0, 0.0, 16.0]])
    decoded = BoxCoder3D().decode(torch.tensor([[0.0, 0.0, 1e4, 0.0, 0.0, 0.0]]), anchor)
    width = (decoded[0, 2] - decoded[0, 0]).item()
    assert width == pytest.approx(16 * 1000 / 16, rel=1e-4)  # exp(ln(1000/16)) * 16
    assert torch.isfinite(decoded).all()
