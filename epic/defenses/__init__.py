"""Baseline defenses the paper compares EPIC with, each dropping examples on a schedule.

Every one is a :class:`~epic.defense.ScheduledDefense`: the trainer and the benchmark treat them
exactly like :class:`epic.EPIC` (``due``, ``update``, ``keep_mask``, ``history``). The math
lives in plain tensor functions beside each class. DP-SGD is a change to the optimizer step
instead (``TrainConfig.grad_clip`` / ``grad_noise``), and Adversarial Poisoning a change to every
batch (``train(..., batch_transform=AdversarialPoisoning(...))``).
"""

from epic.defenses.adversarial import AdversarialPoisoning
from epic.defenses.clustering import ActivationClustering, activation_clusters
from epic.defenses.knn import DeepKNN, deep_knn_outliers
from epic.defenses.registry import (
    DEFENSES,
    DP_SGD_CLIP,
    DP_SGD_NOISE,
    build_batch_transform,
    build_defense,
)
from epic.defenses.scores import (
    HighestLoss,
    LowestConfidence,
    RandomDrop,
    high_loss,
    low_confidence,
)
from epic.defenses.spectral import (
    SpectralSignatures,
    spectral_signature_outliers,
    spectral_signature_scores,
)

__all__ = [
    "DEFENSES",
    "DP_SGD_CLIP",
    "DP_SGD_NOISE",
    "AdversarialPoisoning",
    "build_batch_transform",
    "build_defense",
    "ActivationClustering",
    "DeepKNN",
    "HighestLoss",
    "LowestConfidence",
    "RandomDrop",
    "SpectralSignatures",
    "activation_clusters",
    "deep_knn_outliers",
    "high_loss",
    "low_confidence",
    "spectral_signature_outliers",
    "spectral_signature_scores",
]
