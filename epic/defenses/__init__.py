"""The defenses: EPIC and the baselines the paper compares it with, one file each.

Every defense is a :class:`Defense` (:mod:`epic.protocol`): the trainer calls its hooks.
``base.py`` holds :class:`ScheduledDefense`, what every defense that drops examples on a
schedule shares (``due``, ``update``, ``keep_mask``, ``history`` of :class:`DropRound`
records); ``epic.py`` EPIC (:class:`EPIC`, :class:`EpicRound`, :func:`find_poisons`); each
baseline its own file, the math in plain tensor functions beside its class (``filtering.py``
is the shape the feature-space filters share): the drop rules, Adversarial Poisoning (a hook
on every batch), DP-SGD through Opacus (:class:`DPSGD`: a wrapped module and optimizer) and
the batch-level clip-and-noise (:class:`ClipNoise`: a hook on the gradients).
``registry.py`` builds any of them by name with the paper's settings, for the CLI and the
benchmark; docs/defenses.md shows how to add one.
"""
from epic.defenses.adversarial import AdversarialPoisoning
from epic.defenses.base import DropRound, ScheduledDefense, paper_schedule
from epic.defenses.clipnoise import ClipNoise
from epic.defenses.clustering import ActivationClustering, activation_clusters
from epic.defenses.dpsgd import DPSGD, group_norms
from epic.defenses.epic import EPIC, EpicRound, EpicSettings, find_poisons, paper_warmup
from epic.defenses.groups import (
    ForeignGroups,
    GroupRound,
    cohesive_groups,
    unlikeness,
)
from epic.defenses.knn import DeepKNN, deep_knn_outliers
from epic.defenses.registry import (
    DEFENSES,
    build_defense,
    defense_options,
    options_for,
    parse_spec,
    register_defense,
    scheduled,
)
from epic.defenses.scores import (
    HighestLoss,
    LowestConfidence,
    RandomDrop,
    RetrainWithout,
    high_loss,
    low_confidence,
)
from epic.defenses.spectral import (
    SpectralSignatures,
    spectral_signature_outliers,
    spectral_signature_scores,
)
from epic.protocol import Defense, RunFacts

__all__ = [
    "DEFENSES",
    "DPSGD",
    "EPIC",
    "AdversarialPoisoning",
    "ClipNoise",
    "Defense",
    "DropRound",
    "EpicRound",
    "EpicSettings",
    "RunFacts",
    "ScheduledDefense",
    "build_defense",
    "defense_options",
    "group_norms",
    "options_for",
    "paper_schedule",
    "parse_spec",
    "register_defense",
    "scheduled",
    "ActivationClustering",
    "DeepKNN",
    "ForeignGroups",
    "GroupRound",
    "HighestLoss",
    "LowestConfidence",
    "RandomDrop",
    "RetrainWithout",
    "SpectralSignatures",
    "activation_clusters",
    "cohesive_groups",
    "deep_knn_outliers",
    "find_poisons",
    "unlikeness",
    "high_loss",
    "low_confidence",
    "paper_warmup",
    "spectral_signature_outliers",
    "spectral_signature_scores",
]
