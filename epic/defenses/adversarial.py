"""Adversarial Poisoning (Geiping et al., 2021a, "What doesn't kill you makes you robust(er)"):
poison part of every mini-batch on the fly so the model learns to ignore poisons."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from epic.alignment import alignment_loss, gradient_norm, parameter_gradient
from epic.models import eval_mode
from epic.protocol import Defense, RunFacts

__all__ = ["AdversarialPoisoning"]


@dataclass(kw_only=True)
class AdversarialPoisoning(Defense):
    """A defense that changes every training batch (:meth:`on_batch`); also callable on a
    batch, ``ap(model, x, y)``.

    In every mini-batch, the first ``share`` of the (shuffled) examples become poisons: a few
    steps of gradient matching (signed steps of size ``step_size`` within ``eps``) align their
    training gradient with that of ``targets`` other examples of the batch relabelled to random
    wrong classes, against the current model. The batch is then trained on with every label
    true, so the model learns not to follow such poisons. AP-0.25 / 0.5 / 0.75 in the EPIC
    paper's tables are ``share`` 0.25 / 0.5 / 0.75. Each batch costs ``steps`` extra
    double-backward passes.

    Attributes:
        share: part of each mini-batch turned into poisons, in (0, 1).
        eps: l-infinity budget of the poisons in [0, 1] pixel units.
        steps: gradient-matching steps per batch.
        step_size: size of each signed step (default: eps / 2).
        targets: batch examples whose relabelled gradient the poisons match.
        generator: randomness for the adversarial labels (CPU).
    """

    SETTINGS = ("share", "eps", "steps", "step_size", "targets")

    share: float = 0.5
    eps: float = 16 / 255
    steps: int = 5
    step_size: float | None = None
    targets: int = 4
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    def __post_init__(self) -> None:
        if not 0 < self.share < 1:
            raise ValueError(f"share must be in (0, 1), got {self.share}")
        if self.steps < 1 or self.targets < 1:
            raise ValueError("steps and targets must be positive")

    @classmethod
    def for_run(cls, run: RunFacts, *, share: float = 0.5,
                eps: float | None = None) -> AdversarialPoisoning:
        """AP-``share`` with the budget ``eps`` of the run's poisons when known (else 16/255),
        its labels drawn from the run's seed."""
        if eps is None:
            eps = run.poison_eps if run.poison_eps is not None else 16 / 255
        return cls(share=share, eps=eps, generator=torch.Generator().manual_seed(run.seed))

    def on_batch(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return self(model, x, y)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"].cpu())

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Return the batch ``(x, y)`` with its first ``share`` replaced by fresh poisons."""
        m = round(self.share * len(x))
        t = min(self.targets, len(x) - m)
        if m == 0 or t == 0:
            return x, y
        num_classes = int(model(x[:1]).shape[1])
        shift = torch.randint(1, num_classes, (t,), generator=self.generator).to(y.device)
        target_x, target_y = x[m:m + t], (y[m:m + t] + shift) % num_classes
        step = self.step_size if self.step_size is not None else self.eps / 2
        with eval_mode(model):
            tgrad = parameter_gradient(model, target_x, target_y, chunk=len(target_x))
            tnorm = gradient_norm(tgrad)
            base = x[:m].detach()
            delta = torch.zeros_like(base, requires_grad=True)
            for _ in range(self.steps):
                loss = alignment_loss(model, (base + delta).clamp(0, 1), y[:m], tgrad, tnorm)
                (grad,) = torch.autograd.grad(loss, delta)
                with torch.no_grad():
                    delta -= step * grad.sign()
                    delta.clamp_(-self.eps, self.eps)
        poisoned = torch.cat([(base + delta.detach()).clamp(0, 1), x[m:]])
        return poisoned, y
