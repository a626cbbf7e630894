"""Spectral Signatures (Tran et al., NeurIPS 2018): drop the top outliers along each class's
top singular direction of the centred features."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from epic.defenses.base import paper_schedule
from epic.defenses.filtering import FeatureFilter
from epic.protocol import RunFacts


def spectral_signature_scores(features: Tensor, labels: Tensor) -> Tensor:
    """Outlier score ``(N,)``: squared projection of each centred feature on its class's top
    right singular vector (Tran et al. 2018)."""
    scores = torch.zeros(features.shape[0], device=features.device)
    for c in labels.unique():
        rows = (labels == c).nonzero().squeeze(1)
        centred = features[rows] - features[rows].mean(0, keepdim=True)
        if len(rows) < 2:
            continue
        top = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        scores[rows] = (centred @ top) ** 2
    return scores


def spectral_signature_outliers(features: Tensor, labels: Tensor, per_class: int) -> Tensor:
    """Bool mask ``(N,)``, True = among the ``per_class`` highest scores of its class (at most
    half of the class)."""
    scores = spectral_signature_scores(features, labels)
    drop = torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
    for c in labels.unique():
        rows = (labels == c).nonzero().squeeze(1)
        m = min(per_class, len(rows) // 2)
        if m > 0:
            drop[rows[scores[rows].topk(m).indices]] = True
    return drop


class SpectralSignatures(FeatureFilter):
    """Spectral-signature filtering in the model's feature space, on a schedule.

    The defender does not know which class holds the poisons, so every class loses
    ``overestimation * budget * N`` examples (Tran et al. remove 1.5 times the expected
    poisons), capped at half the class.
    """

    SETTINGS = (*FeatureFilter.SCHEDULE, "budget", "overestimation")

    def __init__(self, *, budget: float = 0.01, overestimation: float = 1.5,
                 **schedule: Any) -> None:
        super().__init__(**schedule)
        self.budget = budget
        self.overestimation = overestimation

    @classmethod
    def for_run(cls, run: RunFacts, *, budget: float = 0.01, warmup: int | None = None,
                every: int | None = None, until: int | None = None) -> SpectralSignatures:
        """One filtering round at ``warmup`` (default 10), expecting ``budget`` poisons."""
        return cls(budget=budget, **paper_schedule(run, warmup=warmup, every=every,
                                                   until=until, once=True))

    def outliers(self, features: Tensor, labels: Tensor, n: int) -> Tensor:
        per_class = math.ceil(self.overestimation * self.budget * n)
        return spectral_signature_outliers(features, labels, per_class)
