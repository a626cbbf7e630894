"""EPIC: drop the examples that end up isolated in gradient space, every few epochs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from epic.data import ImageData
from epic.gradients import gradient_embeddings
from epic.selection import select_medoids

__all__ = ["EPIC", "EpicRound", "paper_warmup"]

log = logging.getLogger(__name__)


def paper_warmup(fraction: float) -> int:
    """The paper's warmup for EPIC-``fraction``: K = 10 / 20 / 30 for 0.1 / 0.2 / 0.3."""
    return max(1, round(100 * fraction))


@dataclass(frozen=True)
class EpicRound:
    """What one EPIC round did.

    Attributes:
        epoch: the epoch before which the round ran.
        dropped: ``(D,)`` int64 dataset indices dropped in this round.
        remaining: examples kept after the round.
        cluster_sizes: ``(N,)`` int64, for every dataset example the size of the gradient
            cluster it fell in this round; 0 for examples dropped in earlier rounds.
        seconds: wall time of the round (embedding plus selection).
    """

    epoch: int
    dropped: Tensor
    remaining: int
    cluster_sizes: Tensor
    seconds: float

    def histogram(self, among: Tensor | None = None) -> dict[int, int]:
        """``{cluster size: number of examples in clusters of that size}``.

        ``among`` (bool mask ``(N,)`` or index tensor) restricts the count, e.g. to poisons.
        """
        sizes = self.cluster_sizes if among is None else self.cluster_sizes[among]
        values, counts = torch.unique(sizes[sizes > 0], return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts, strict=True)}

    def summary(self) -> dict[str, Any]:
        """A JSON-ready record of the round."""
        return {"epoch": self.epoch, "dropped": self.dropped.tolist(),
                "remaining": self.remaining, "cluster_size_histogram": self.histogram(),
                "seconds": round(self.seconds, 4)}


class EPIC:
    """Effective Poison IdentifiCation (Yang et al., ICML 2022, Alg. 1).

    After ``warmup`` epochs on all data, and then every ``every`` epochs until ``until``, embed
    every remaining example by its last-layer loss gradient, pick ``fraction`` of each class as
    medoids by greedy facility location, assign every example to its nearest medoid, and drop
    the medoids whose cluster holds at most ``max_cluster_size`` examples (only themselves).
    Dropped examples stay dropped.

    Args:
        fraction: share of each class selected as medoids (EPIC-0.1, -0.2, -0.3 in the paper).
        warmup: epochs trained on all data first (paper: 10 / 20 / 30 for 0.1 / 0.2 / 0.3).
        every: epochs between rounds (paper: 2 of 40 epochs, 10 of 200, 1 in transfer learning).
        until: no round at or after this epoch (None = never stop; the trainer uses the last
            learning-rate milestone).
        max_cluster_size: medoids of clusters this small or smaller are dropped.
        per_class, similarity, method: passed to :func:`epic.select_medoids`.
        num_examples: size of the training set, so that :attr:`keep_mask` exists before the
            first round; otherwise it is None until then (None = keep everything).
        generator: randomness for ``method="stochastic"``.

    Example:
        >>> defense = EPIC(fraction=0.1, warmup=10, every=2)
        >>> for epoch in range(epochs):  # doctest: +SKIP
        ...     if defense.due(epoch):
        ...         defense.update(model, train_data, epoch)
        ...     for x, y, _ in iterate_batches(train_data, keep=defense.keep_mask, shuffle=True):
        ...         ...
    """

    def __init__(
        self,
        fraction: float = 0.1,
        *,
        warmup: int = 10,
        every: int = 2,
        until: int | None = None,
        max_cluster_size: int = 1,
        per_class: Literal["proportional", "equal"] = "proportional",
        similarity: Literal["exp", "linear", "cosine"] = "exp",
        method: Literal["lazy", "stochastic", "naive"] = "lazy",
        batch_size: int = 512,
        num_examples: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if warmup < 0 or every < 1:
            raise ValueError(f"need warmup >= 0 and every >= 1, got {warmup}, {every}")
        self.fraction = fraction
        self.warmup = warmup
        self.every = every
        self.until = until
        self.max_cluster_size = max_cluster_size
        self.per_class = per_class
        self.similarity = similarity
        self.method = method
        self.batch_size = batch_size
        self.generator = generator
        self.keep_mask: Tensor | None = (
            None if num_examples is None else torch.ones(num_examples, dtype=torch.bool))
        self.history: list[EpicRound] = []

    def due(self, epoch: int) -> bool:
        """Whether a round runs before training epoch ``epoch`` (0-based)."""
        if epoch < self.warmup or (self.until is not None and epoch >= self.until):
            return False
        return (epoch - self.warmup) % self.every == 0

    @property
    def dropped(self) -> Tensor:
        """``(D,)`` int64 indices of every example dropped so far."""
        if self.keep_mask is None:
            return torch.empty(0, dtype=torch.long)
        return (~self.keep_mask).nonzero().squeeze(1)

    def update(self, model: nn.Module, data: ImageData, epoch: int) -> EpicRound:
        """Run one round on the examples still kept; returns (and records) what it did."""
        start = time.perf_counter()
        n = len(data)
        if self.keep_mask is None:
            self.keep_mask = torch.ones(n, dtype=torch.bool)
        elif self.keep_mask.shape != (n,):
            raise ValueError(f"keep_mask covers {self.keep_mask.numel()} examples, data has {n}")
        kept = self.keep_mask.nonzero().squeeze(1)
        grads, labels = gradient_embeddings(model, data, keep=self.keep_mask,
                                            batch_size=self.batch_size)
        medoids = select_medoids(grads, labels, self.fraction, per_class=self.per_class,
                                 similarity=self.similarity, method=self.method,
                                 generator=self.generator)
        size_at_row = torch.zeros(len(kept), dtype=torch.long, device=grads.device)
        size_at_row[medoids.indices] = medoids.cluster_sizes
        isolated = medoids.indices[medoids.cluster_sizes <= self.max_cluster_size]
        dropped = kept[isolated.cpu()]
        cluster_sizes = torch.zeros(n, dtype=torch.long)
        cluster_sizes[kept] = size_at_row[medoids.assignment].cpu()
        self.keep_mask[dropped] = False
        record = EpicRound(epoch, dropped.sort().values, int(self.keep_mask.sum()),
                           cluster_sizes, time.perf_counter() - start)
        self.history.append(record)
        log.info("EPIC epoch %d: dropped %d, %d remain (%.2fs)", epoch, len(dropped),
                 record.remaining, record.seconds)
        return record

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the keep-mask and the round records."""
        return {
            "keep_mask": self.keep_mask,
            "history": [{"epoch": r.epoch, "dropped": r.dropped, "remaining": r.remaining,
                         "cluster_sizes": r.cluster_sizes, "seconds": r.seconds}
                        for r in self.history],
            "generator": None if self.generator is None else self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.keep_mask = state["keep_mask"]
        self.history = [EpicRound(**r) for r in state["history"]]
        if state.get("generator") is not None and self.generator is not None:
            self.generator.set_state(state["generator"])
