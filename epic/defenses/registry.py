"""Defenses by name, with the paper's schedules: what the CLI and the benchmark build from."""

from __future__ import annotations

import torch

from epic.defenses.adversarial import AdversarialPoisoning
from epic.defenses.base import ScheduledDefense
from epic.defenses.clustering import ActivationClustering
from epic.defenses.epic import EPIC, paper_warmup
from epic.defenses.knn import DeepKNN
from epic.defenses.scores import HighestLoss, LowestConfidence, RandomDrop
from epic.defenses.spectral import SpectralSignatures
from epic.models import Scenario
from epic.selection import PerClass, Similarity

DEFENSES = ("none", "epic", "deep-knn", "spectral-signatures", "activation-clustering",
            "lowest-confidence", "highest-loss", "random", "dp-sgd", "adversarial-poisoning")

# DP-SGD's default gradient shaping: clip norm, and noise std relative to it.
DP_SGD_CLIP = 1.0
DP_SGD_NOISE = 0.01


def build_defense(
    name: str,
    *,
    num_examples: int,
    epochs: int,
    milestones: tuple[int, ...],
    scenario: Scenario = "scratch",
    fraction: float = 0.1,
    warmup: int | None = None,
    every: int | None = None,
    until: int | None = None,
    max_cluster_size: int = 1,
    similarity: Similarity = "exp",
    per_class: PerClass = "proportional",
    budget: float = 0.01,
    threshold: float | None = None,
    drop_fraction: float = 0.01,
    seed: int = 0,
) -> ScheduledDefense | None:
    """The defense ``name`` (one of :data:`DEFENSES`) on the paper's schedule.

    Defaults: warmup ``100 * fraction`` epochs (10 / 20 / 30 for EPIC-0.1 / 0.2 / 0.3), a round
    every ``epochs / 20`` epochs (2 of 40, 10 of 200; every epoch in transfer learning) until the
    last learning-rate milestone. Deep k-NN, Spectral Signatures and Activation Clustering filter
    once, at the warmup epoch. ``none``, ``dp-sgd`` (a change to the optimizer step: see
    ``DP_SGD_CLIP``, ``DP_SGD_NOISE`` and :class:`epic.TrainConfig`) and
    ``adversarial-poisoning`` (a change to every batch: see :func:`build_batch_transform`)
    return None.
    """
    if name not in DEFENSES:
        raise ValueError(f"unknown defense {name!r}; choose from {', '.join(DEFENSES)}")
    if name in ("none", "dp-sgd", "adversarial-poisoning"):
        return None
    warmup = warmup if warmup is not None else paper_warmup(fraction)
    if every is None:
        every = 1 if scenario == "transfer" else max(1, epochs // 20)
    end = until if until is not None else (milestones[-1] if milestones else None)
    once = until if until is not None else warmup + 1
    n = num_examples
    if name == "epic":
        return EPIC(fraction, max_cluster_size=max_cluster_size, similarity=similarity,
                    per_class=per_class, warmup=warmup, every=every, until=end, num_examples=n)
    if name == "deep-knn":
        return DeepKNN(budget=budget, warmup=warmup, every=every, until=once, num_examples=n)
    if name == "spectral-signatures":
        return SpectralSignatures(budget=budget, warmup=warmup, every=every, until=once,
                                  num_examples=n)
    if name == "activation-clustering":
        return ActivationClustering(seed=seed, warmup=warmup, every=every, until=once,
                                    num_examples=n)
    if name == "lowest-confidence":
        return LowestConfidence(threshold=threshold if threshold is not None else 0.5,
                                warmup=warmup, every=every, until=end, num_examples=n)
    if name == "highest-loss":
        return HighestLoss(threshold=threshold if threshold is not None else 1.0,
                           warmup=warmup, every=every, until=end, num_examples=n)
    return RandomDrop(fraction=drop_fraction, generator=torch.Generator().manual_seed(seed),
                      warmup=warmup, every=every, until=end, num_examples=n)


def build_batch_transform(name: str, *, share: float = 0.5, eps: float = 16 / 255,
                          seed: int = 0) -> AdversarialPoisoning | None:
    """The per-batch change a defense makes (Adversarial Poisoning), or None for the others."""
    if name != "adversarial-poisoning":
        return None
    return AdversarialPoisoning(share=share, eps=eps,
                                generator=torch.Generator().manual_seed(seed))
