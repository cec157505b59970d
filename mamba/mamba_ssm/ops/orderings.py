"""Scan orders of the tri-orientated Mamba block, derived from the feature map's explicit (D, H, W) grid.

Tokens of a (B, C, D, H, W) feature map are numbered in C order: ``t = d*H*W + h*W + w``.

* forward: the identity;
* reverse: ``flip`` along the token axis;
* through-slice: new position ``p = j*n + i`` holds original token ``i*(L/n) + j`` with ``n = D`` (number
  of z slices) and ``L/n = H*W``: for each in-plane position (h, w) all depth positions come one after
  the other (a through-plane scan). Example L = 8, grid (2, 2, 2): order [0, 4, 1, 5, 2, 6, 3, 7].

The ``apply``/``undo`` helpers are reshapes and transposes (no gather); the index tensors are provided for
checks and for kernels that want them.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence, Tuple

import torch

Grid = Tuple[int, int, int]


def grid_tuple(grid: Sequence[int]) -> Grid:
    """``grid`` as a tuple of three positive ints; ValueError naming the grid otherwise."""
    try:
        g = tuple(int(v) for v in grid)
        integral = all(float(v) == float(o) for v, o in zip(g, grid))
    except (TypeError, ValueError):
        raise ValueError(f"scan grid must be three positive integers (D, H, W); got {grid!r}") from None
    if len(g) != 3 or not integral or any(v <= 0 for v in g):
        raise ValueError(f"scan grid must be three positive integers (D, H, W); got {tuple(grid)}")
    return g  # type: ignore[return-value]


def validate_grid(grid: Sequence[int], length: int) -> Grid:
    """Return ``grid`` as a tuple of three positive ints whose product is ``length``; ValueError otherwise."""
    g = grid_tuple(grid)
    if g[0] * g[1] * g[2] != length:
        raise ValueError(f"scan grid {g} has {g[0] * g[1] * g[2]} positions but the sequence has "
                         f"L = {length} tokens; the grid must be the (D, H, W) of the feature map")
    return g  # type: ignore[return-value]


def reverse_order(x: torch.Tensor) -> torch.Tensor:
    """Reverse scan: (..., L) -> (..., L) flipped along the last axis (its own inverse)."""
    return x.flip(-1)


def slice_order(x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Through-slice scan order: (B, C, L) with L = D*H*W -> (B, C, L), position ``hw*D + d`` holds
    token ``d*H*W + hw``."""
    depth, height, width = validate_grid(grid, x.shape[-1])
    lead = x.shape[:-1]
    return x.reshape(*lead, depth, height * width).transpose(-1, -2).reshape(*lead, -1)


def slice_order_inverse(x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Undo :func:`slice_order`: (B, C, L) in through-slice order -> (B, C, L) in C order."""
    depth, height, width = validate_grid(grid, x.shape[-1])
    lead = x.shape[:-1]
    return x.reshape(*lead, height * width, depth).transpose(-1, -2).reshape(*lead, -1)


def slice_view_inverse(x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """:func:`slice_order_inverse` as a view without a copy: (B, C, L) in through-slice order -> a
    (B, C, D, H*W) strided view in C order (``.reshape(B, C, L)`` of it equals ``slice_order_inverse``)."""
    depth, height, width = validate_grid(grid, x.shape[-1])
    return x.reshape(*x.shape[:-1], height * width, depth).transpose(-1, -2)


@lru_cache(maxsize=64)
def _indices(kind: str, grid: Grid, device_str: str) -> Tuple[torch.Tensor, torch.Tensor]:
    length = grid[0] * grid[1] * grid[2]
    base = torch.arange(length)
    if kind == "forward":
        order = base
    elif kind == "reverse":
        order = base.flip(0)
    elif kind == "slice":
        order = slice_order(base.view(1, 1, length), grid).view(length)
    else:
        raise ValueError(f"unknown scan order {kind!r}; expected 'forward', 'reverse' or 'slice'")
    inverse = torch.empty_like(order)
    inverse[order] = base
    return order.to(device_str), inverse.to(device_str)


def scan_order_indices(kind: str, grid: Sequence[int], device="cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(order, inverse)`` int64 index tensors of length L = D*H*W for ``kind`` in forward / reverse /
    slice: ``x[..., order]`` is the scan order and ``y[..., inverse]`` undoes it. Cached per grid/device;
    do not modify the returned tensors."""
    g = grid_tuple(grid)
    return _indices(kind, g, str(torch.device(device)))


def legacy_grid(length: int, nslices: int) -> Grid:
    """The grid the published model implied with ``nslices``: (nslices, L // nslices, 1). Equal to the
    true (D, H, W) ordering whenever nslices is the feature map's depth."""
    if nslices is None or int(nslices) <= 0:
        raise ValueError(f"nslices must be a positive integer; got {nslices!r}")
    if length % int(nslices):
        raise ValueError(f"sequence length L = {length} is not divisible by nslices = {nslices}; "
                         "pass grid=(D, H, W) of the feature map instead")
    return (int(nslices), length // int(nslices), 1)
