"""What a training run is: its hyperparameters (:class:`TrainConfig`), scenario and result;
and the pieces of the pipeline around the loop: setting a pretrained model up for its scenario,
and measuring accuracy. What the trainer needs of a defense is :class:`epic.protocol.Defense`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from epic.data import ImageData
from epic.gradients import logit_embeddings
from epic.models import Classifier, Scenario
from epic.protocol import RunFacts

__all__ = ["HeadRng", "RoundEmbeddings", "Scenario", "Schedule", "TrainConfig", "TrainResult",
           "config_record", "default_milestones", "evaluate", "prepare_model"]

# Where an EPIC round gets its gradients (see TrainConfig).
RoundEmbeddings = Literal["eval", "train-pass"]
# How the learning rate moves (see TrainConfig).
Schedule = Literal["step", "onecycle"]
# where a new last layer is drawn from (TrainConfig.head_rng)
HeadRng = Literal["seed", "global"]


def default_milestones(epochs: int) -> tuple[int, ...]:
    """Learning-rate drops (/10): the paper's 100 and 150 for 200 epochs, else 25/40 and 35/40."""
    if epochs == 200:
        return (100, 150)
    return tuple(sorted({m for m in (round(epochs * 25 / 40), round(epochs * 35 / 40))
                         if 0 < m < epochs}))


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a run (defaults: the paper's CIFAR-10 pipeline).

    ``lr=None`` means 0.1, or 1e-4 when fine-tuning; ``milestones=None`` means
    :func:`default_milestones`. Defenses, DP-SGD among them, are not settings of the run but
    the ``defense`` of :func:`epic.train` (see :mod:`epic.defenses`).

    ``round_embeddings`` is how an EPIC round gets its gradients: ``"eval"`` (the paper's) by
    an eval-mode pass over the kept, un-augmented examples before the round;
    ``"train-pass"`` from the logits the training pass of the epoch before computed anyway
    (augmented inputs, train-mode batch norm, weights moving during the epoch), so a round
    costs only its selection. A round with no such epoch before it (the first epoch of a run
    or of a resumed run) takes the eval pass. Only EPIC in one process can take the training
    pass's gradients: ``"train-pass"`` with another defense, or under ``torch.distributed``,
    is an error before training starts.

    ``eval_every``: test accuracy (and attack success) after every this many epochs and after
    the last; evaluating a full test set costs about a fifth of a CPU epoch
    (``benchmarks/epoch_profile.py``).

    ``channels_last``: feed training batches to the model in channels-last memory format on
    the CPU, where convolutional training steps run 1.1-1.4x faster
    (``benchmarks/epoch_profile.py``); the weights then round differently, so a run is
    reproducible only against runs with the same setting. Eval-mode passes (test accuracy,
    defense rounds) use that format on the CPU regardless: it changes no weights.

    ``schedule``: ``"step"`` divides the learning rate by ``1 / gamma`` at each milestone
    (the paper's); ``"onecycle"`` ramps it up from ``lr / 25`` to ``lr`` over the first 30% of
    the steps and anneals it (cosine) to nearly zero by the last step, batch by batch
    (``torch.optim.lr_scheduler.OneCycleLR``, momentum held); milestones are then unused.
    ``label_smoothing`` is the cross-entropy's. ``crop_padding``: the random crop's reflect
    padding in pixels (None: the data set's; 2 is a 2-pixel translation). ``test_flips``:
    test accuracy from the mean of the logits of each test image and its mirror image (not in
    transfer learning, whose test features are computed once).

    ``head_rng``: where transfer learning and fine-tuning draw the new last layer from:
    ``"seed"``, the run's generator seeded by ``seed`` (the head's draw comes first, then the
    shuffles and augmentations), so that ``seed`` covers all of a run's randomness; ``"global"``,
    torch's global RNG as the caller left it, as runs stored before this setting existed drew
    it (``epic`` built the model from ``torch.manual_seed(seed)`` just before); kept so that
    those rerun.

    ``min_batch``: an epoch's last batch with fewer examples is left out of that epoch (its
    examples train in other epochs, in other batches). Batch norm learns nothing sound from
    one example, and a step on one can derail training at a high learning rate: a defense
    that leaves a multiple of ``batch_size`` plus one examples would otherwise make such a
    batch every epoch. Runs stored before this setting existed trained on it (``1``).
    """

    epochs: int = 40
    scenario: Scenario = "scratch"
    lr: float | None = None
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    batch_size: int = 128
    milestones: tuple[int, ...] | None = None
    gamma: float = 0.1
    augment: bool = True
    seed: int = 0
    round_embeddings: RoundEmbeddings = "eval"
    eval_every: int = 1
    channels_last: bool = False
    schedule: Schedule = "step"
    label_smoothing: float = 0.0
    crop_padding: int | None = None
    test_flips: bool = False
    head_rng: HeadRng = "seed"
    min_batch: int = 2

    @property
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-4 if self.scenario == "finetune" else 0.1

    @property
    def resolved_milestones(self) -> tuple[int, ...]:
        return self.milestones if self.milestones is not None else default_milestones(self.epochs)

    def run_facts(self, num_examples: int, *, poison_eps: float | None = None) -> RunFacts:
        """What a defense built by name for a run of this configuration on ``num_examples``
        examples learns of it (:func:`epic.defenses.build_defense`)."""
        return RunFacts(num_examples=num_examples, epochs=self.epochs,
                        milestones=self.resolved_milestones, scenario=self.scenario,
                        seed=self.seed, poison_eps=poison_eps)


# Settings that TrainConfig had once, with the value that meant "off": the batch-level gradient
# clipping and noise, now the "clip-noise" defense (epic.defenses.ClipNoise).
RETIRED_SETTINGS: dict[str, Any] = {"grad_clip": None, "grad_noise": 0.0}


def config_record(saved: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a :class:`TrainConfig` as a record of a run stored them
    (:func:`dataclasses.asdict`), read today: settings added since take their defaults, and a
    retired setting that was off is left out. A retired setting that was on stays, so the
    record differs from every configuration of today (it ran something else)."""
    fields = dataclasses.asdict(TrainConfig()) | dict(saved)
    return {k: v for k, v in fields.items()
            if not (k in RETIRED_SETTINGS and v == RETIRED_SETTINGS[k])}


@dataclass
class TrainResult:
    """What :func:`train` returns: per-epoch metrics and the final summary."""

    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    model: nn.Module = field(repr=False)


def prepare_model(model: Classifier, scenario: Scenario,
                  generator: torch.Generator | None = None) -> list[nn.Parameter]:
    """Set a pretrained model up for ``scenario``; returns the parameters to optimize.

    ``transfer`` freezes the feature extractor (and its batch-norm statistics) and
    re-initializes the last layer; ``finetune`` re-initializes the last layer and trains all;
    ``scratch`` leaves the model as it is. The new last layer is drawn from ``generator``
    (without one, from torch's global RNG).
    """
    if scenario == "scratch":
        return list(model.parameters())
    model.reset_classifier(generator)
    if scenario == "finetune":
        return list(model.parameters())
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier."))
    return list(model.classifier.parameters())


def evaluate(model: nn.Module, data: ImageData, *, batch_size: int | None = None,
             flips: bool = False) -> float:
    """Accuracy of ``model`` on ``data`` (an eval-mode pass as
    :func:`epic.gradients.logit_embeddings` makes it; training mode restored); with
    ``flips``, of the mean logits of each image and its mirror image."""
    logits, labels = logit_embeddings(model, data, batch_size=batch_size)
    if not len(labels):
        return 0.0
    if flips:
        mirrored = replace(data, images=data.images.flip(3))
        logits = (logits + logit_embeddings(model, mirrored, batch_size=batch_size)[0]) / 2
    return int((logits.argmax(1) == labels).sum()) / len(labels)
