"""Shared by the tests that compare two runs of a small SegMamba (activation checkpointing, channels-last)."""
from __future__ import annotations

from typing import Sequence

import torch

from model_segmamba import SegMamba


def small_segmamba() -> SegMamba:
    """SegMamba(4 -> 3) with narrow stages (8, 16, 32, 64), the same initial weights on every call."""
    torch.manual_seed(0)
    return SegMamba(4, 3, feat_size=(8, 16, 32, 64), hidden_size=64)


def relative_distance(tensors: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """‖tensors − reference‖ / ‖reference‖ over all the tensors together, as one float64 vector (conv biases in
    front of instance norms have gradients that are zero up to rounding, so per-tensor ratios would be
    meaningless)."""
    assert len(tensors) == len(reference)
    delta = torch.cat([(t.double() - r.double()).flatten() for t, r in zip(tensors, reference)])
    return (delta.norm() / torch.cat([r.double().flatten() for r in reference]).norm()).item()
