"""Defenses that drop training examples on a schedule; EPIC is the one this library is about.

:class:`ScheduledDefense` holds what every such defense shares: the warmup / every / until
schedule, the cumulative keep-mask (True = train on the example; dropped examples never come
back), a record per round, and resumable state. :class:`EPIC` fills in the selection.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from epic.distributed import broadcast_from_first, gather_shares, share_of, world
from epic.gradients import Examples, LogitsFn, count_examples, gradient_embeddings
from epic.selection import Similarity, find_isolated, isolated_medoids, select_medoids

__all__ = ["EPIC", "DropRound", "EpicRound", "ScheduledDefense", "find_poisons", "paper_warmup"]

log = logging.getLogger(__name__)


def find_poisons(labels: np.ndarray | Tensor, pred_probs: np.ndarray | Tensor,
                 fraction: float = 0.1, *, max_cluster_size: int = 1,
                 similarity: Similarity = "exp") -> np.ndarray | Tensor:
    """EPIC on predictions you already have: a bool mask, True = suspected effective poison.

    EPIC's embedding of an example is its last-layer loss gradient, ``pred_probs - onehot``;
    per class, ``fraction`` of the examples are picked as medoids of those embeddings by
    greedy facility location, and the medoids no other example joins are flagged. Use the
    predicted probabilities of a model in the middle of training (after a warmup), computed
    without augmentation. Numpy in, numpy out; torch in, torch out (on the input's device).

    Args:
        labels: ``(N,)`` integer labels in ``0..C-1``.
        pred_probs: ``(N, C)`` predicted class probabilities (rows sum to 1).
        fraction, max_cluster_size, similarity: as in :class:`EPIC`.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> y = np.arange(90) % 3
        >>> logits = rng.normal(size=(90, 3)) + 3 * np.eye(3)[y]
        >>> logits[7] = [0, 0, 6]  # an example of class 1 that the model calls class 2
        >>> probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        >>> find_poisons(y, probs, 0.1).nonzero()[0]
        array([ 7, 86])
    """
    as_numpy = isinstance(pred_probs, np.ndarray)
    probs = torch.as_tensor(pred_probs).float()
    if probs.dim() != 2:
        raise ValueError(f"pred_probs must be (N, C), got shape {tuple(probs.shape)}")
    y = torch.as_tensor(labels, device=probs.device)
    if y.shape != (probs.shape[0],) or y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"labels must be ({probs.shape[0]},) integers, got {y.dtype} "
                         f"{tuple(y.shape)}")
    y = y.long()
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= probs.shape[1]):
        raise ValueError(f"labels must lie in 0..{probs.shape[1] - 1}")
    if not torch.allclose(probs.sum(1), torch.ones(len(probs), device=probs.device), atol=1e-3):
        raise ValueError("pred_probs rows must sum to 1 (pass probabilities, not logits)")
    grads = probs - F.one_hot(y, probs.shape[1]).float()
    mask = find_isolated(grads, y, fraction, max_cluster_size, similarity=similarity)
    return mask.cpu().numpy() if as_numpy else mask


def paper_warmup(fraction: float) -> int:
    """The paper's warmup for EPIC-``fraction``: K = 10 / 20 / 30 for 0.1 / 0.2 / 0.3."""
    return max(1, round(100 * fraction))


@dataclass(frozen=True)
class DropRound:
    """What one round of a scheduled defense did.

    Attributes:
        epoch: the epoch before which the round ran.
        dropped: ``(D,)`` int64 dataset indices dropped in this round, sorted.
        remaining: examples kept after the round.
        seconds: wall time of the round.
        embed_seconds: the part of it spent embedding the examples (0 when the training loop
            handed the embeddings in); the rest is the selection.
    """

    epoch: int
    dropped: Tensor
    remaining: int
    seconds: float
    embed_seconds: float = field(default=0.0, kw_only=True)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready record of the round."""
        return {"epoch": self.epoch, "dropped": self.dropped.tolist(),
                "remaining": self.remaining, "seconds": round(self.seconds, 4),
                "embed_seconds": round(self.embed_seconds, 4)}


@dataclass(frozen=True)
class EpicRound(DropRound):
    """An EPIC round; ``cluster_sizes`` ``(N,)`` int64 gives, for every dataset example, the size
    of the gradient cluster it fell in this round (0 for examples dropped in earlier rounds)."""

    cluster_sizes: Tensor

    def histogram(self, among: Tensor | None = None) -> dict[int, int]:
        """``{cluster size: number of examples in clusters of that size}``.

        ``among`` (bool mask ``(N,)`` or index tensor) restricts the count, e.g. to poisons.
        """
        sizes = self.cluster_sizes if among is None else self.cluster_sizes[among]
        values, counts = torch.unique(sizes[sizes > 0], return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts, strict=True)}

    def summary(self) -> dict[str, Any]:
        return super().summary() | {"cluster_size_histogram": self.histogram()}


class ScheduledDefense:
    """Base of defenses that drop examples before some epochs; subclasses implement ``select``.

    Rounds run before epoch ``warmup`` and then every ``every`` epochs, never at or after
    ``until`` (None = no end). ``keep_mask`` is a bool ``(N,)`` over the training set, True =
    train on the example; it is None before the first round unless ``num_examples`` is given.
    """

    record_type: type[DropRound] = DropRound

    def __init__(self, *, warmup: int, every: int, until: int | None = None,
                 num_examples: int | None = None, batch_size: int = 512) -> None:
        if warmup < 0 or every < 1:
            raise ValueError(f"need warmup >= 0 and every >= 1, got {warmup}, {every}")
        if until is not None and warmup >= until:
            log.warning("%s will never run: warmup %d >= until %d", type(self).__name__,
                        warmup, until)
        self.warmup = warmup
        self.every = every
        self.until = until
        self.batch_size = batch_size
        self.generator: torch.Generator | None = None
        self.keep_mask: Tensor | None = (
            None if num_examples is None else torch.ones(num_examples, dtype=torch.bool))
        self.history: list[DropRound] = []

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

    def embed(self, model: nn.Module, data: Examples, keep: Tensor,
              features: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The embeddings ``(M, D)`` and labels ``(M,)`` of the kept examples, in index order,
        that :meth:`choose` decides on (``features``: see :meth:`update`)."""
        raise NotImplementedError

    def choose(self, embeddings: Tensor, labels: Tensor, keep: Tensor
               ) -> tuple[Tensor, dict[str, Any]]:
        """Dataset indices to drop among ``keep`` (whose kept rows ``embeddings`` holds), and
        extra fields for the round record."""
        raise NotImplementedError

    def update(self, model: nn.Module, data: Examples, epoch: int, *,
               features: Tensor | None = None) -> DropRound:
        """Run one round on the examples still kept; returns (and records) what it did.

        ``data`` is the training set without augmentation, in any shape
        :func:`epic.gradients.gradient_embeddings` takes. ``features``: ``model.features`` of
        every example of an ImageData ``(N, F)``, when the trainer holds them (a frozen body):
        the round then runs only the last layer. Under ``torch.distributed`` every rank must
        call this together: each embeds its share, rank 0 chooses, all get its choice.
        """
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module  # an eval pass needs no gradient synchronisation
        n = count_examples(data)
        if n is None:
            if self.keep_mask is None:
                raise ValueError(f"{type(self).__name__} cannot tell how many examples an "
                                 f"iterable of batches holds: pass num_examples=")
            n = len(self.keep_mask)
        rank, size = world()

        def choose(keep: Tensor) -> tuple[Tensor, dict[str, Any]]:
            start = time.perf_counter()
            if size == 1:
                rows, labels = self.embed(model, data, keep, features)
            else:
                rows, labels = self.embed(model, data, share_of(keep, rank, size), features)
                rows, labels = gather_shares(rows, labels, int(keep.sum()))
            embedded = {"embed_seconds": time.perf_counter() - start}
            if size == 1:
                dropped, extra = self.choose(rows, labels, keep)
            else:
                dropped, extra = broadcast_from_first(
                    self.choose(rows, labels, keep) if rank == 0 else None)
            return dropped, extra | embedded

        return self._round(epoch, n, choose)

    def _round(self, epoch: int, n: int,
               choose: Callable[[Tensor], tuple[Tensor, dict[str, Any]]]) -> DropRound:
        """Bookkeeping of a round over ``n`` examples: ``choose(keep)`` gives what to drop."""
        start = time.perf_counter()
        if self.keep_mask is None:
            self.keep_mask = torch.ones(n, dtype=torch.bool)
        elif self.keep_mask.shape != (n,):
            raise ValueError(f"keep_mask covers {self.keep_mask.numel()} examples, data has {n}")
        dropped, extra = choose(self.keep_mask)
        self.keep_mask[dropped] = False
        record = self.record_type(epoch=epoch, dropped=dropped.sort().values,
                                  remaining=int(self.keep_mask.sum()),
                                  seconds=time.perf_counter() - start, **extra)
        self.history.append(record)
        log.info("%s epoch %d: dropped %d, %d remain (%.2fs)", type(self).__name__, epoch,
                 len(dropped), record.remaining, record.seconds)
        return record

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: keep-mask, round records, generator state."""
        return {"keep_mask": self.keep_mask,
                "history": [dataclasses.asdict(r) for r in self.history],
                "generator": None if self.generator is None else self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.keep_mask = state["keep_mask"]
        self.history = [self.record_type(**r) for r in state["history"]]
        if state.get("generator") is not None and self.generator is not None:
            self.generator.set_state(state["generator"])


class EPIC(ScheduledDefense):
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
        logits_fn: ``logits_fn(model, x)`` gives the logits when ``model(x)`` does not.

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
        logits_fn: LogitsFn | None = None,
    ) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        super().__init__(warmup=warmup, every=every, until=until, num_examples=num_examples,
                         batch_size=batch_size)
        self.fraction = fraction
        self.max_cluster_size = max_cluster_size
        self.per_class = per_class
        self.similarity = similarity
        self.method = method
        self.generator = generator
        self.logits_fn = logits_fn

    record_type = EpicRound

    def embed(self, model: nn.Module, data: Examples, keep: Tensor,
              features: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return gradient_embeddings(model, data, keep=keep, batch_size=self.batch_size,
                                   features=features, logits_fn=self.logits_fn)

    def update_from_embeddings(self, embeddings: Tensor, labels: Tensor, epoch: int
                               ) -> DropRound:
        """A round on embeddings the training loop computed itself.

        Args:
            embeddings: ``(N, C)`` last-layer gradients ``softmax(z) - onehot(y)`` (or any
                embedding to cluster) of every training example, in dataset order; rows of
                examples already dropped are ignored.
            labels: ``(N,)`` integer labels.
            epoch: the epoch the round runs before (for the record).

        Example:
            >>> defense = EPIC(fraction=0.1, warmup=0, every=1)
            >>> probs = torch.softmax(torch.randn(100, 4), 1)
            >>> y = torch.arange(100) % 4
            >>> r = defense.update_from_embeddings(probs - F.one_hot(y, 4), y, epoch=0)
            >>> defense.keep_mask.shape
            torch.Size([100])
        """
        if embeddings.dim() != 2 or labels.shape != (embeddings.shape[0],):
            raise ValueError(f"need embeddings (N, C) and labels (N,), got "
                             f"{tuple(embeddings.shape)} and {tuple(labels.shape)}")

        def choose(keep: Tensor) -> tuple[Tensor, dict[str, Any]]:
            rows = keep.to(embeddings.device)
            return self.choose(embeddings[rows].float(), labels.to(embeddings.device)[rows],
                               keep)

        return self._round(epoch, embeddings.shape[0], choose)

    def choose(self, embeddings: Tensor, labels: Tensor, keep: Tensor
               ) -> tuple[Tensor, dict[str, Any]]:
        """Dataset indices of the isolated medoids among the kept rows ``embeddings``."""
        grads = embeddings
        kept = keep.nonzero().squeeze(1)
        medoids = select_medoids(grads, labels, self.fraction, per_class=self.per_class,
                                 similarity=self.similarity, method=self.method,
                                 generator=self.generator)
        size_at_row = torch.zeros(len(kept), dtype=torch.long, device=grads.device)
        size_at_row[medoids.indices] = medoids.cluster_sizes
        isolated = isolated_medoids(grads, labels, medoids, self.max_cluster_size)
        cluster_sizes = torch.zeros(len(keep), dtype=torch.long)
        cluster_sizes[kept] = size_at_row[medoids.assignment].cpu()
        return kept[isolated.cpu()], {"cluster_sizes": cluster_sizes}
