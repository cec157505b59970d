"""Hard-negative mining: choose which anchors enter the classification loss of one image.

Up to ``batch_size_per_image * positive_fraction`` positives are kept (a random subset if there are more); the
remaining slots go to negatives drawn at random from the ``pool_size_factor ×`` highest-scoring negatives
(the hardest ones), or at random from all negatives when no scores are given.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


class HardNegativeSampler:
    """Args:
        batch_size_per_image: anchors sampled per image.
        positive_fraction: maximum fraction of positives among them.
        pool_size_factor: hard negatives are drawn from the top ``factor × needed`` negatives by score.
    """

    def __init__(self, batch_size_per_image: int = 256, positive_fraction: float = 0.25,
                 pool_size_factor: int = 10) -> None:
        if batch_size_per_image < 1:
            raise ValueError(f"batch_size_per_image must be >= 1, got {batch_size_per_image}")
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.pool_size_factor = max(1, int(pool_size_factor))

    @staticmethod
    def _random_subset(indices: torch.Tensor, count: int, generator: Optional[torch.Generator]) -> torch.Tensor:
        perm = torch.randperm(indices.numel(), generator=generator, device="cpu")[:count]
        return indices[perm.to(indices.device)]

    def __call__(self, labels: torch.Tensor, scores: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Args:
            labels: ``(N,)`` 1 for positive anchors, 0 for negatives, -1 to ignore.
            scores: optional ``(N,)`` predicted foreground scores (higher = harder negative).
        Returns:
            bool masks ``(N,)`` of sampled positives and sampled negatives.
        """
        positives = torch.nonzero(labels == 1).flatten()
        negatives = torch.nonzero(labels == 0).flatten()
        max_positives = int(self.batch_size_per_image * self.positive_fraction)
        if positives.numel() > max_positives:
            positives = self._random_subset(positives, max_positives, generator)
        num_negatives = min(self.batch_size_per_image - positives.numel(), negatives.numel())
        if num_negatives < negatives.numel():
            if scores is not None:
                pool_size = min(negatives.numel(), self.pool_size_factor * num_negatives)
                pool = negatives[scores[negatives].detach().topk(pool_size).indices]
                negatives = self._random_subset(pool, num_negatives, generator)
            else:
                negatives = self._random_subset(negatives, num_negatives, generator)
        pos_mask = torch.zeros_like(labels, dtype=torch.bool)
        neg_mask = torch.zeros_like(labels, dtype=torch.bool)
        pos_mask[positives] = True
        neg_mask[negatives] = True
        return pos_mask, neg_mask
