"""Deep k-NN (Peri et al., ECCV 2020): drop examples whose label disagrees with their neighbours."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from epic.defenses.base import paper_schedule
from epic.defenses.filtering import FeatureFilter
from epic.protocol import RunFacts


def deep_knn_outliers(features: Tensor, labels: Tensor, k: int, *, block: int = 512) -> Tensor:
    """Bool mask ``(N,)``, True = the example's label is not the plurality of its k neighbours.

    Neighbours are the ``k`` nearest other rows of ``features`` ``(N, F)`` in Euclidean
    distance, computed ``block`` rows at a time. A tie for the plurality keeps the example when
    its own label is among the tied labels.

    Example:
        >>> f = torch.tensor([[0.0], [0.1], [0.2], [5.0], [5.1], [0.15]])
        >>> deep_knn_outliers(f, torch.tensor([0, 0, 0, 1, 1, 1]), k=2).tolist()
        [False, False, False, False, False, True]
    """
    n = features.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels must be ({n},), got {tuple(labels.shape)}")
    k = min(k, n - 1)
    if k < 1:
        return torch.zeros(n, dtype=torch.bool, device=features.device)
    num_classes = int(labels.max()) + 1
    drop = torch.empty(n, dtype=torch.bool, device=features.device)
    for start in range(0, n, block):
        rows = features[start:start + block]
        dist = torch.cdist(rows, features)
        dist[torch.arange(len(rows)), torch.arange(start, start + len(rows))] = float("inf")
        neighbours = dist.topk(k, largest=False).indices
        votes = torch.zeros(len(rows), num_classes, device=features.device)
        votes.scatter_add_(1, labels[neighbours], torch.ones_like(neighbours, dtype=votes.dtype))
        own = votes.gather(1, labels[start:start + len(rows), None]).squeeze(1)
        drop[start:start + len(rows)] = own < votes.max(1).values
    return drop


class DeepKNN(FeatureFilter):
    """Deep k-NN filtering in the model's feature space, on a schedule.

    ``k`` defaults to ``overestimation * budget * N`` (the expected number of poisons, doubled),
    the choice Peri et al. motivate and the public poisoning benchmarks use.
    """

    SETTINGS = (*FeatureFilter.SCHEDULE, "k", "budget", "overestimation")

    def __init__(self, *, k: int | None = None, budget: float = 0.01, overestimation: float = 2.0,
                 **schedule: Any) -> None:
        super().__init__(**schedule)
        self.k = k
        self.budget = budget
        self.overestimation = overestimation

    @classmethod
    def for_run(cls, run: RunFacts, *, budget: float = 0.01, warmup: int | None = None,
                every: int | None = None, until: int | None = None) -> DeepKNN:
        """One filtering round at ``warmup`` (default 10), expecting ``budget`` poisons."""
        return cls(budget=budget, **paper_schedule(run, warmup=warmup, every=every,
                                                   until=until, once=True))

    def outliers(self, features: Tensor, labels: Tensor, n: int) -> Tensor:
        k = self.k if self.k is not None else max(1, int(self.overestimation * self.budget * n))
        return deep_knn_outliers(features, labels, k)
