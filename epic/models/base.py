"""The shape every model here shares: normalization, a feature extractor, one linear layer."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["Classifier", "Normalize", "Scenario", "eval_mode"]

# How a run starts from a model's weights: train everything from them (scratch), retrain a
# fresh last layer on the frozen feature extractor (transfer), or train everything from a
# fresh last layer (finetune); see epic.training.prepare_model.
Scenario = Literal["scratch", "transfer", "finetune"]


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode; on exit, also on an error, every submodule gets back the mode
    it had (a transfer-learning model keeps its frozen body in eval mode, say)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` for inputs in ``[0, 1]``, ``(B, C, H, W)``."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """A network split as ``classifier(features(x))``.

    Inputs are images in ``[0, 1]``; normalization is the first step of :meth:`features`, so
    attacks can work in pixel space. ``features(x)`` returns the penultimate representation
    ``(B, F)``; ``classifier`` is the last ``nn.Linear(F, num_classes)``.
    """

    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = body
        self.feature_dim = feature_dim
        self.classifier = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return torch.flatten(self.body(self.normalize(x)), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

    def reset_classifier(self, generator: torch.Generator | None = None) -> None:
        """Re-initialize the last linear layer (transfer learning and fine-tuning) as
        :class:`torch.nn.Linear` initializes one, drawing from ``generator`` (a CPU generator;
        the same weights on every device) or, without one, from torch's global RNG."""
        layer = self.classifier
        if generator is None:
            layer.reset_parameters()
            return
        weight = torch.empty(layer.weight.shape)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        bound = 1 / math.sqrt(layer.in_features)
        bias = torch.empty(layer.bias.shape).uniform_(-bound, bound, generator=generator)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
