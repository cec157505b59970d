"""Learning-rate schedules stepped once per training iteration.

The SegMamba trainers use nnU-Net's polynomial decay ``lr_t = lr0 * (1 - t / T) ** 0.9`` where ``t`` counts
optimiser iterations from 0 and ``T = max_epochs * iterations_per_epoch``.
"""
from __future__ import annotations

from typing import List

import torch
from torch.optim.lr_scheduler import LRScheduler


def poly_lr(initial_lr: float, step: int, total_steps: int, exponent: float = 0.9) -> float:
    """Learning rate of the poly schedule at iteration ``step`` of ``total_steps`` (clamped to 0 at the end)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    progress = min(max(step, 0), total_steps) / total_steps
    return initial_lr * (1.0 - progress) ** exponent


class PolyLRScheduler(LRScheduler):
    """Poly decay per iteration, optionally after a linear warm-up.

    Args:
        optimizer: the optimiser whose parameter groups' ``initial_lr`` is ``lr0``.
        total_steps: ``T``, the number of ``step()`` calls over the whole run.
        exponent: the poly power (0.9 in nnU-Net and SegMamba).
        warmup_steps: linear ramp from ``lr0 / warmup_steps`` to ``lr0`` over the first steps (0 = none);
            the poly decay then runs over the remaining ``T - warmup_steps`` steps.

    ``state_dict()`` holds only plain numbers, so it can be stored in a ``weights_only`` checkpoint.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, exponent: float = 0.9,
                 warmup_steps: int = 0, last_epoch: int = -1) -> None:
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps), got {warmup_steps} of {total_steps}")
        self.total_steps = int(total_steps)
        self.exponent = float(exponent)
        self.warmup_steps = int(warmup_steps)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr: float, step: int) -> float:
        """Learning rate for iteration ``step`` given the group's initial rate."""
        if step < self.warmup_steps:
            return base_lr * (step + 1) / self.warmup_steps
        return poly_lr(base_lr, step - self.warmup_steps, self.total_steps - self.warmup_steps, self.exponent)

    def get_lr(self) -> List[float]:  # called by LRScheduler.step(); last_epoch counts iterations here
        return [self.lr_at(base_lr, self.last_epoch) for base_lr in self.base_lrs]

