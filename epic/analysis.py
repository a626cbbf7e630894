"""Which poisons make an attack work: the paper's "effective poisons" (Sec. 3.2, Fig. 1).

A subset of poisons is effective if training on it alone (the other bases left clean) makes the
attack succeed, while training on all the others does not. Finding the smallest such subset is
combinatorial; :func:`effective_poisons` orders the poisons (by default: nearest to the target
in last-layer gradient space first, the quantity of Fig. 1a) and bisects on the length of the
prefix that still succeeds, so it costs about ``log2(P) + 2`` training runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from epic.data import ImageData
from epic.gradients import gradient_embeddings
from epic.models import eval_mode
from epic.poisons import PoisonSet

__all__ = ["EffectivePoisons", "effective_poisons", "gradient_distance_to_target"]

log = logging.getLogger(__name__)


@torch.no_grad()
def gradient_distance_to_target(model: nn.Module, poisons: PoisonSet, train: ImageData, *,
                                targets: Tensor | None = None) -> Tensor:
    """Distance ``(P,)`` from each poison's last-layer gradient to the adversarial target's.

    Poisons are embedded as ``softmax(z) - onehot(y)`` with their own labels; the target as
    ``softmax(z_t) - onehot(adversarial_class)`` averaged over ``targets`` (uint8
    ``(T, C, H, W)``; default: the set's target images), as in Fig. 1a. For a backdoor, pass
    patched source images, e.g. ``poisons.evaluation_images(test)``.
    """
    targets = poisons.target_images if targets is None else targets
    if len(targets) == 0:
        raise ValueError("no target images to measure distances to")
    poisoned = poisons.apply(train).subset(poisons.indices)
    grads, _ = gradient_embeddings(model, poisoned)
    device = grads.device
    with eval_mode(model):
        logits = model(targets.to(device).float().div(255)).float()
    adv = torch.full((len(logits),), poisons.adversarial_class, device=device)
    target_grad = (torch.softmax(logits, 1) - F.one_hot(adv, logits.shape[1])).mean(0)
    return (grads - target_grad).norm(dim=1).cpu()


@dataclass
class EffectivePoisons:
    """Result of :func:`effective_poisons`.

    Attributes:
        effective: positions (in the poison set) of the effective poisons.
        order: the order the search used, most suspect first.
        succeeds_alone: whether the effective subset alone makes the attack succeed.
        fails_without: whether all the other poisons together fail.
        trials: every training run: ``{"poisons": count, "which": "prefix"|"rest",
            "success": bool}``.
    """

    effective: Tensor
    order: Tensor
    succeeds_alone: bool
    fails_without: bool
    trials: list[dict[str, object]] = field(default_factory=list)


def effective_poisons(poisons: PoisonSet, attack_succeeds: Callable[[PoisonSet], bool], *,
                      order: Tensor | None = None) -> EffectivePoisons:
    """Find a small subset of ``poisons`` responsible for the attack's success.

    Args:
        poisons: the full poison set.
        attack_succeeds: trains a victim on the training set with only the given poisons in
            place and says whether the attack worked (e.g. ``success(...) > 0.5``).
        order: positions, most suspect first (default: the set's order); e.g.
            ``gradient_distance_to_target(...).argsort()``.

    Returns:
        The shortest prefix of ``order`` that succeeds alone (bisection assumes that adding
        poisons never breaks a working attack), and whether the rest then fails.

    Example:
        >>> p = ...  # doctest: +SKIP
        >>> found = effective_poisons(p, lambda s: bool(set(s.indices.tolist()) >= {7, 9}))
    """
    n = len(poisons)
    order = torch.arange(n) if order is None else order.long().cpu()
    if sorted(order.tolist()) != list(range(n)):
        raise ValueError(f"order must be a permutation of range({n})")
    trials: list[dict[str, object]] = []

    def run(rows: Tensor, which: str) -> bool:
        ok = bool(attack_succeeds(poisons.select(rows)))
        trials.append({"poisons": len(rows), "which": which, "success": ok})
        log.info("%d poisons (%s): attack %s", len(rows), which, "succeeds" if ok else "fails")
        return ok

    if not run(order, "prefix"):
        return EffectivePoisons(order[:0], order, False, True, trials)
    lo, hi = 0, n  # prefix of length hi succeeds; length lo is not known to succeed
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if run(order[:mid], "prefix"):
            hi = mid
        else:
            lo = mid
    fails_without = hi == n or not run(order[hi:], "rest")
    return EffectivePoisons(order[:hi], order, True, fails_without, trials)
