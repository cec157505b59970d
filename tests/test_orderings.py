"""Scan orders of the tri-orientated block: hand-written example, inverses, flip, and the published
chunk-stack construction; impossible grids are rejected."""
import pytest
import torch

from mamba_ssm.ops.orderings import (legacy_grid, reverse_order, scan_order_indices, slice_order,
                                     slice_order_inverse, slice_view_inverse, validate_grid)


def chunk_stack(x, n):
    """The published construction: torch.chunk into n pieces along L, stack on a new last axis, flatten."""
    return torch.stack(torch.chunk(x, n, dim=-1), dim=-1).flatten(-2)


def test_slice_order_hand_written_example_L8_two_slices():
    tokens = torch.arange(8).view(1, 1, 8)
    assert slice_order(tokens, (2, 2, 2)).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert slice_order(tokens, (2, 4, 1)).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    order, inverse = scan_order_indices("slice", (2, 2, 2))
    assert order.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert inverse.tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_slice_order_visits_all_depths_of_one_in_plane_position_consecutively():
    depth, height, width = 3, 2, 2
    coords = torch.stack(torch.meshgrid(torch.arange(depth), torch.arange(height), torch.arange(width),
                                        indexing="ij"), dim=0).reshape(1, 3, -1)  # (1, 3, L): z, y, x per token
    z, y, x = slice_order(coords, (depth, height, width))[0]
    assert z.tolist() == [0, 1, 2] * 4
    assert list(zip(y.tolist(), x.tolist()))[::3] == [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.parametrize("grid", [(2, 3, 4), (4, 4, 4), (5, 6, 7), (1, 3, 3), (7, 1, 1)])
def test_slice_order_equals_reference_chunk_stack_and_inverts(grid):
    length = grid[0] * grid[1] * grid[2]
    x = torch.randn(2, 3, length)
    permuted = slice_order(x, grid)
    assert torch.equal(permuted, chunk_stack(x, grid[0]))
    assert torch.equal(slice_order_inverse(permuted, grid), x)
    view = slice_view_inverse(permuted, grid)  # the block adds through this view: no copy
    assert view.shape == (2, 3, grid[0], grid[1] * grid[2]) and view.data_ptr() == permuted.data_ptr()
    assert torch.equal(view.reshape(2, 3, length), x)
    order, inverse = scan_order_indices("slice", grid)
    assert torch.equal(x[..., order], permuted)
    assert torch.equal(permuted[..., inverse], x)
    assert torch.equal(order[inverse], torch.arange(length))


@pytest.mark.parametrize("grid", [(2, 3, 4), (5, 6, 7)])
def test_forward_is_identity_and_reverse_is_flip(grid):
    length = grid[0] * grid[1] * grid[2]
    x = torch.randn(1, 2, length)
    order, inverse = scan_order_indices("forward", grid)
    assert torch.equal(order, torch.arange(length)) and torch.equal(inverse, torch.arange(length))
    order, inverse = scan_order_indices("reverse", grid)
    assert torch.equal(x[..., order], x.flip(-1)) and torch.equal(reverse_order(x), x.flip(-1))
    assert torch.equal(reverse_order(reverse_order(x)), x)
    assert torch.equal(x[..., order][..., inverse], x)


def test_128_cubed_stage_grids_match_published_nslices():
    # stage depths of a 128^3 input are the published hard-coded nslices 64/32/16/8
    for side in (64, 32, 16, 8):
        x = torch.arange(side ** 3).view(1, 1, -1)
        assert torch.equal(slice_order(x, (side, side, side)), chunk_stack(x, side))
        assert legacy_grid(side ** 3, side) == (side, side * side, 1)


def test_order_indices_are_cached_per_grid():
    a = scan_order_indices("slice", (2, 3, 4))
    b = scan_order_indices("slice", [2, 3, 4])
    assert a[0] is b[0]


@pytest.mark.parametrize("grid, length, message", [
    ((2, 3, 4), 25, "grid (2, 3, 4) has 24 positions but the sequence has L = 25 tokens"),
    ((0, 4, 2), 0, "three positive integers"),
    ((-2, -3, 4), 24, "three positive integers"),
    ((2, 12), 24, "three positive integers"),
    ((2.5, 2, 2), 10, "three positive integers"),
])
def test_impossible_grids_raise_value_error_naming_grid_and_length(grid, length, message):
    with pytest.raises(ValueError) as err:
        slice_order(torch.zeros(1, 1, length), grid)
    assert message in str(err.value)
    with pytest.raises(ValueError):
        validate_grid(grid, length)


def test_unknown_order_kind_and_bad_legacy_slices_raise():
    with pytest.raises(ValueError, match="unknown scan order"):
        scan_order_indices("diagonal", (2, 2, 2))
    with pytest.raises(ValueError, match="L = 10 is not divisible by nslices = 3"):
        legacy_grid(10, 3)
    with pytest.raises(ValueError, match="positive integer"):
        legacy_grid(10, 0)
