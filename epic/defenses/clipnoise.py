"""Batch-level gradient clipping and noise: the mini-batch gradient, not each example's, is
clipped and noised. A cheap relative of DP-SGD (:mod:`epic.defenses.dpsgd`) with no privacy
guarantee; the poisoning toolbox of Geiping et al. runs its "private" training this way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from epic.protocol import Defense, RunFacts

__all__ = ["ClipNoise"]


class ClipNoise(Defense):
    """Clip every mini-batch gradient to norm ``clip`` and add Gaussian noise of std
    ``clip * noise`` to it (:meth:`after_backward`).

    The averaged gradient of the batch is clipped as one vector, so a single example's
    gradient is bounded only through the batch's; no privacy is claimed or accounted. For
    per-example clipping with privacy accounting use :class:`~epic.defenses.DPSGD`.

    Args:
        clip: norm bound of the mini-batch gradient (of all trained parameters together).
        noise: noise std relative to ``clip`` (0: clipping only).
        seed: seed of the noise.

    Example:
        >>> defense = ClipNoise(clip=1.0, noise=0.01)
        >>> # epic.training.train(model, train_data, test_data, defense=defense)
    """

    SETTINGS = ("clip", "noise", "seed")

    def __init__(self, *, clip: float = 1.0, noise: float = 0.01, seed: int = 0) -> None:
        if not clip > 0 or noise < 0:
            raise ValueError(f"need clip > 0 and noise >= 0, got {clip}, {noise}")
        self.clip = clip
        self.noise = noise
        self.seed = seed
        self._generator: torch.Generator | None = None

    @classmethod
    def for_run(cls, run: RunFacts, *, clip: float = 1.0, noise: float = 0.01) -> ClipNoise:
        """Clip 1 and noise 0.01 by default (the toolbox's); the noise drawn from the run's
        seed + 1, apart from the stream that orders the batches."""
        return cls(clip=clip, noise=noise, seed=run.seed + 1)

    def setup(self, model: nn.Module, trained: nn.Module, optimizer: torch.optim.Optimizer, *,
              num_examples: int, batch_size: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        device = next(trained.parameters()).device
        self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return trained, optimizer

    @torch.no_grad()
    def after_backward(self, params: Sequence[nn.Parameter]) -> None:
        nn.utils.clip_grad_norm_(params, self.clip)
        if self.noise <= 0:
            return
        for p in params:
            if p.grad is not None:
                p.grad.add_(torch.randn(p.grad.shape, generator=self._generator,
                                        device=p.grad.device, dtype=p.grad.dtype),
                            alpha=self.clip * self.noise)

    def state_dict(self) -> dict[str, Any]:
        return {} if self._generator is None else {"generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._generator is not None and "generator" in state:
            self._generator.set_state(state["generator"].cpu())
