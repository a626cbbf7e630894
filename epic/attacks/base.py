"""What every attack shares: choosing base images, the eps-ball, turning crafted floats into a
:class:`~epic.poisons.PoisonSet`, and the crafting metadata.

All attacks work in pixel space: images are floats in ``[0, 1]`` and the models of
:mod:`epic.models` normalize inside. A budget ``eps`` is in the same units (8/255, 16/255), and
poisons are quantized to uint8 at the end without leaving the ball around their bases.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from epic.data import ImageData
from epic.errors import EpicError
from epic.models import eval_mode
from epic.poisons import PoisonSet

__all__ = ["AttackError", "budget_count", "choose_bases", "finalize", "frozen", "model_name",
           "progress_range", "project", "to_float"]

log = logging.getLogger("epic.attacks")


class AttackError(EpicError):
    """An attack was asked for something it cannot do (e.g. a budget larger than the class)."""


def budget_count(budget: float | int, n_train: int) -> int:
    """Number of poisons: ``budget`` as a share of the training set (float < 1) or a count."""
    if isinstance(budget, float) and budget < 1:
        return max(1, round(budget * n_train))
    return int(budget)


def choose_bases(train: ImageData, cls: int, count: int, *, generator: torch.Generator
                 ) -> Tensor:
    """``count`` distinct random training indices of class ``cls`` (int64, sorted)."""
    members = (train.labels.cpu() == cls).nonzero().squeeze(1)
    if count > len(members):
        raise AttackError(f"budget of {count} poisons exceeds the {len(members)} training "
                          f"images of class {cls}")
    pick = members[torch.randperm(len(members), generator=generator)[:count]]
    return pick.sort().values


def to_float(images: Tensor, device: torch.device) -> Tensor:
    """uint8 ``(N, C, H, W)`` to float ``[0, 1]`` on ``device``."""
    return images.to(device).float().div_(255)


def project(x: Tensor, base: Tensor, eps: float) -> Tensor:
    """Clamp ``x`` into the l-infinity ball of radius ``eps`` around ``base`` and into [0, 1]."""
    return torch.min(torch.max(x, base - eps), base + eps).clamp_(0, 1)


def finalize(
    train: ImageData,
    indices: Tensor,
    crafted: Tensor,
    *,
    eps: float,
    target_images: Tensor,
    target_class: int,
    adversarial_class: int,
    attack: str,
    hyperparameters: Any,
    seed: int,
    model: nn.Module,
    started: float,
    labels: Tensor | None = None,
    trigger: Tensor | None = None,
    extra: dict[str, Any] | None = None,
) -> PoisonSet:
    """Quantize ``crafted`` (float ``(P, C, H, W)`` in [0, 1]) to uint8 inside the eps-ball
    of the bases ``train.images[indices]`` and wrap everything in a validated PoisonSet."""
    base = train.images[indices.to(train.images.device)].cpu().short()
    steps = math.floor(eps * 255 + 1e-6)
    q = crafted.detach().cpu().mul(255).round().short()
    q = torch.min(torch.max(q, base - steps), base + steps).clamp(0, 255).to(torch.uint8)
    params = (dataclasses.asdict(hyperparameters) if dataclasses.is_dataclass(hyperparameters)
              and not isinstance(hyperparameters, type) else dict(hyperparameters))
    metadata: dict[str, Any] = {
        "attack": attack, "hyperparameters": params, "seed": seed, "model": model_name(model),
        "seconds": round(time.perf_counter() - started, 3),
        "clean_label": labels is None or bool(torch.equal(labels.cpu(),
                                                          train.labels[indices].cpu())),
    } | (extra or {})
    poisons = PoisonSet(indices=indices.cpu().long(), images=q,
                        target_images=target_images.cpu().to(torch.uint8),
                        target_class=int(target_class), adversarial_class=int(adversarial_class),
                        eps=float(eps), labels=None if labels is None else labels.cpu().long(),
                        trigger=None if trigger is None else trigger.cpu(), metadata=metadata)
    poisons.validate(train)
    log.info("%s: %d poisons crafted in %.1fs", attack, len(poisons), metadata["seconds"])
    return poisons


def model_name(model: nn.Module) -> str:
    """A short description of the crafting model: its class, body and parameter count."""
    body = getattr(model, "body", None)
    n = sum(p.numel() for p in model.parameters())
    arch = type(body if body is not None else model).__name__
    return f"{type(model).__name__}({arch}, {n} parameters)"


@contextmanager
def requiring_grad(model: nn.Module, flag: bool) -> Iterator[nn.Module]:
    """Every parameter's ``requires_grad`` set to ``flag``; each one's own restored on exit."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(flag)
    try:
        yield model
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode with parameters not requiring grad; both restored on exit."""
    with eval_mode(model), requiring_grad(model, False):
        yield model


def progress_range(n: int, *, progress: bool, desc: str) -> Iterator[int]:
    """``range(n)``, with a tqdm bar on stderr when ``progress``."""
    if not progress:
        yield from range(n)
        return
    from tqdm.auto import tqdm

    yield from tqdm(range(n), desc=desc, unit="step", dynamic_ncols=True, leave=False)
