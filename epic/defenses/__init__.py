"""The defenses: EPIC and the baselines the paper compares it with, one file each.

``base.py`` holds :class:`ScheduledDefense`, what every defense that drops examples on a
schedule shares (``due``, ``update``, ``keep_mask``, ``history`` of :class:`DropRound`
records); ``epic.py`` EPIC (:class:`EPIC`, :class:`EpicRound`, :func:`find_poisons`); each
baseline its own file, the math in plain tensor functions beside its class (``filtering.py``
is the shape the feature-space filters share); ``registry.py`` builds any of them by name
with the paper's schedule, for the CLI and the benchmark. The trainer and the benchmark treat
every :class:`ScheduledDefense` alike. DP-SGD is a change to the optimizer step instead
(``TrainConfig.grad_clip`` / ``grad_noise``), and Adversarial Poisoning a change to every batch
(``train(..., batch_transform=AdversarialPoisoning(...))``).
"""

from epic.defenses.adversarial import AdversarialPoisoning
from epic.defenses.base import DropRound, ScheduledDefense
from epic.defenses.clustering import ActivationClustering, activation_clusters
from epic.defenses.epic import EPIC, EpicRound, find_poisons, paper_warmup
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
    "EPIC",
    "AdversarialPoisoning",
    "DropRound",
    "EpicRound",
    "ScheduledDefense",
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
    "find_poisons",
    "high_loss",
    "low_confidence",
    "paper_warmup",
    "spectral_signature_outliers",
    "spectral_signature_scores",
]
