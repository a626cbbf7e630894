"""Gradient alignment: the parameter gradient of a batch and how far another batch's gradient
points away from it.

Gradient Matching and Sleeper Agent (:mod:`epic.attacks.gradient`) craft poisons by minimizing
:func:`alignment_loss`; Adversarial Poisoning (:mod:`epic.defenses.adversarial`) does the same
on the fly to train against such poisons. Plain functions of a model and tensors, so neither
side depends on the other.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["alignment_loss", "gradient_norm", "parameter_gradient", "trainable_parameters"]


def gradient_norm(tensors: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """Euclidean norm of a list of gradient tensors taken as one vector."""
    return torch.stack([t.pow(2).sum() for t in tensors]).sum().sqrt()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` that require gradients, in order."""
    return [p for p in model.parameters() if p.requires_grad]


def parameter_gradient(model: nn.Module, x: Tensor, y: Tensor, chunk: int) -> list[Tensor]:
    """Mean cross-entropy gradient of ``(x, y)`` w.r.t. the parameters (detached)."""
    params = trainable_parameters(model)
    total = [torch.zeros_like(p) for p in params]
    for i in range(0, len(x), chunk):
        loss = F.cross_entropy(model(x[i:i + chunk]), y[i:i + chunk], reduction="sum") / len(x)
        for t, g in zip(total, torch.autograd.grad(loss, params), strict=True):
            t += g
    return total


def alignment_loss(model: nn.Module, x: Tensor, y: Tensor, target_grad: list[Tensor],
                   target_norm: Tensor) -> Tensor:
    """``1 - cos(grad L(x, y), target_grad)`` with a graph back to ``x``."""
    params = trainable_parameters(model)
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    dot = torch.stack([(g * t).sum() for g, t in zip(grads, target_grad, strict=True)]).sum()
    norm = gradient_norm(grads)
    return 1 - dot / (norm * target_norm + 1e-12)
