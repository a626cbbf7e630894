"""What a training run is: its hyperparameters (:class:`TrainConfig`), scenario, result, and
what the trainer needs of a defense (:class:`Defense`); and the pieces of the pipeline around
the loop: setting a pretrained model up for its scenario, and measuring accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

from epic.data import ImageData, iterate_batches
from epic.models import Classifier, Scenario, eval_mode

__all__ = ["Defense", "RoundEmbeddings", "Scenario", "TrainConfig", "TrainResult",
           "default_milestones", "evaluate", "prepare_model"]

# Where an EPIC round gets its gradients (see TrainConfig).
RoundEmbeddings = Literal["eval", "train-pass"]


class Defense(Protocol):
    """What the trainer needs of a defense that drops training examples during training."""

    keep_mask: Tensor | None

    def due(self, epoch: int) -> bool: ...

    def update(self, model: nn.Module, data: ImageData, epoch: int, *,
               features: Tensor | None = None) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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
    :func:`default_milestones`. ``grad_clip`` and ``grad_noise`` turn on the DP-SGD-style
    gradient shaping the paper compares with (Hong et al. 2020): every mini-batch gradient is
    clipped to norm ``grad_clip`` and gets Gaussian noise of std ``grad_clip * grad_noise``.

    ``round_embeddings`` is how an EPIC round gets its gradients: ``"eval"`` (the paper's) by
    an eval-mode pass over the kept, un-augmented examples before the round;
    ``"train-pass"`` from the logits the training pass of the epoch before computed anyway
    (augmented inputs, train-mode batch norm, weights moving during the epoch), so a round
    costs only its selection. A round with no such epoch before it (the first epoch of a run
    or of a resumed run, or under ``torch.distributed``) takes the eval pass.

    ``eval_every``: test accuracy (and attack success) after every this many epochs and after
    the last; evaluating a full test set can cost as much as a third of an epoch.
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
    grad_clip: float | None = None
    grad_noise: float = 0.0
    round_embeddings: RoundEmbeddings = "eval"
    eval_every: int = 1

    @property
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-4 if self.scenario == "finetune" else 0.1

    @property
    def resolved_milestones(self) -> tuple[int, ...]:
        return self.milestones if self.milestones is not None else default_milestones(self.epochs)


@dataclass
class TrainResult:
    """What :func:`train` returns: per-epoch metrics and the final summary."""

    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    model: nn.Module = field(repr=False)


def prepare_model(model: Classifier, scenario: Scenario) -> list[nn.Parameter]:
    """Set a pretrained model up for ``scenario``; returns the parameters to optimize.

    ``transfer`` freezes the feature extractor (and its batch-norm statistics) and
    re-initializes the last layer; ``finetune`` re-initializes the last layer and trains all;
    ``scratch`` leaves the model as it is.
    """
    if scenario == "scratch":
        return list(model.parameters())
    model.reset_classifier()
    if scenario == "finetune":
        return list(model.parameters())
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier."))
    return list(model.classifier.parameters())


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, *, batch_size: int = 1000) -> float:
    """Accuracy of ``model`` on ``data`` (eval mode; training mode restored)."""
    device = next(model.parameters()).device
    correct = 0
    with eval_mode(model):
        for x, y, _ in iterate_batches(data, batch_size=batch_size, device=device):
            correct += int((model(x).argmax(1) == y).sum())
    return correct / max(len(data), 1)
