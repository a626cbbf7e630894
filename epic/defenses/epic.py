"""EPIC (Effective Poison IdentifiCation): the defense this library is about.

:class:`EPIC` is a :class:`~epic.defenses.base.ScheduledDefense` whose rounds embed every kept
example by its last-layer loss gradient (:mod:`epic.gradients`), pick per-class medoids by
greedy facility location (:mod:`epic.selection`) and drop the medoids no other example joins;
each round leaves an :class:`EpicRound` record. :func:`find_poisons` runs the same selection on
predictions the caller already has.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from epic.defenses.base import DropRound, ScheduledDefense, paper_schedule
from epic.gradients import Examples, LogitsFn, gradient_embeddings
from epic.protocol import RunFacts
from epic.selection import (
    Method,
    PerClass,
    Similarity,
    as_cluster_size,
    as_fraction,
    find_isolated,
    isolated_medoids,
    select_medoids,
)

__all__ = ["EPIC", "EpicRound", "EpicSettings", "find_poisons", "paper_warmup"]


Cluster = Literal["kept", "all"]


@dataclass(frozen=True, kw_only=True)
class EpicSettings:
    """What an EPIC round does, apart from when rounds run: the one place where its options
    are named, defaulted and checked. :class:`EPIC` holds one (:attr:`EPIC.settings`);
    :func:`find_poisons`, :func:`epic.scan.scan` and the command line (one function,
    ``epic.cli.common.epic_settings``) build one.

    Attributes:
        fraction: share of each class selected as medoids (EPIC-0.1, -0.2, -0.3 in the paper).
        max_cluster_size: medoids of clusters this small or smaller are dropped.
        per_class, similarity, method: passed to :func:`epic.select_medoids`.
        cluster: ``"kept"`` (default): each round clusters the examples still kept;
            ``"all"``: every example, dropped ones included, as the authors' code does
            (docs/defenses.md, "EPIC and the authors' code"); one round alone is the same.

    Raises:
        ValueError: a setting out of its range or not one of its choices, named.
    """

    fraction: float = 0.1
    max_cluster_size: int = 1
    per_class: PerClass = "proportional"
    similarity: Similarity = "exp"
    method: Method = "lazy"
    cluster: Cluster = "kept"

    def __post_init__(self) -> None:
        object.__setattr__(self, "fraction", as_fraction(self.fraction))
        object.__setattr__(self, "max_cluster_size", as_cluster_size(self.max_cluster_size))
        for name, kind in (("per_class", PerClass), ("similarity", Similarity),
                           ("method", Method), ("cluster", Cluster)):
            if getattr(self, name) not in get_args(kind):
                raise ValueError(f"{name} must be one of {get_args(kind)}, got "
                                 f"{getattr(self, name)!r}")


def find_poisons(labels: np.ndarray | Tensor, pred_probs: np.ndarray | Tensor,
                 fraction: float = 0.1, **options: Any) -> np.ndarray | Tensor:
    """EPIC on predictions you already have: a bool mask, True = suspected effective poison.

    EPIC's embedding of an example is its last-layer loss gradient, ``pred_probs - onehot``;
    per class, ``fraction`` of the examples are picked as medoids of those embeddings by
    greedy facility location, and the medoids no other example joins are flagged. Use the
    predicted probabilities of a model in the middle of training (after a warmup), computed
    without augmentation. Numpy in, numpy out; torch in, torch out (on the input's device).

    Args:
        labels: ``(N,)`` integer labels in ``0..C-1``.
        pred_probs: ``(N, C)`` predicted class probabilities (rows sum to 1).
        fraction, options: the fields of :class:`EpicSettings` (``max_cluster_size``,
            ``similarity``, ``per_class``, ``method``).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> y = np.arange(90) % 3
        >>> logits = rng.normal(size=(90, 3)) + 3 * np.eye(3)[y]
        >>> logits[7] = [0, 0, 6]  # an example of class 1 that the model calls class 2
        >>> probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        >>> find_poisons(y, probs, 0.1).nonzero()[0]
        array([ 7, 86])
    """
    settings = EpicSettings(fraction=fraction, **options)  # checked before any work
    as_numpy = isinstance(pred_probs, np.ndarray)
    probs = torch.as_tensor(pred_probs).float()
    if probs.dim() != 2:
        raise ValueError(f"pred_probs must be (N, C), got shape {tuple(probs.shape)}")
    y = torch.as_tensor(labels, device=probs.device)
    if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"labels must be (N,) integers, got {y.dtype} {tuple(y.shape)}")
    if len(y) != probs.shape[0]:
        raise ValueError(f"pred_probs has {probs.shape[0]} rows and labels {len(y)}: one row "
                         f"of probabilities per label")
    y = y.long()
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= probs.shape[1]):
        raise ValueError(f"labels must lie in 0..{probs.shape[1] - 1}")
    if not torch.allclose(probs.sum(1), torch.ones(len(probs), device=probs.device), atol=1e-3):
        raise ValueError("pred_probs rows must sum to 1 (pass probabilities, not logits)")
    grads = probs - F.one_hot(y, probs.shape[1]).float()
    mask = find_isolated(grads, y, settings.fraction, settings.max_cluster_size,
                         per_class=settings.per_class, similarity=settings.similarity,
                         method=settings.method)
    return mask.cpu().numpy() if as_numpy else mask


def paper_warmup(fraction: float) -> int:
    """The paper's warmup for EPIC-``fraction``: K = 10 / 20 / 30 for 0.1 / 0.2 / 0.3."""
    return max(1, round(100 * fraction))


@dataclass(frozen=True)
class EpicRound(DropRound):
    """An EPIC round; ``cluster_size_of`` ``(N,)`` int64 gives, for every dataset example, the
    size of the gradient cluster it fell in this round (0 for examples dropped in earlier
    rounds). Per example, unlike :attr:`epic.selection.Medoids.cluster_sizes` (per medoid)."""

    cluster_size_of: Tensor

    def histogram(self, among: Tensor | None = None) -> dict[int, int]:
        """``{cluster size: number of examples in clusters of that size}``.

        ``among`` (bool mask ``(N,)`` or index tensor) restricts the count, e.g. to poisons.
        """
        sizes = self.cluster_size_of if among is None else self.cluster_size_of[among]
        values, counts = torch.unique(sizes[sizes > 0], return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts, strict=True)}

    def summary(self) -> dict[str, Any]:
        return super().summary() | {"cluster_size_histogram": self.histogram()}

    def poison_summary(self, poisons: Tensor) -> dict[str, Any]:
        """Poisons dropped, and the cluster sizes the poisons fell in."""
        return super().poison_summary(poisons) | {
            "poison_cluster_size_histogram": self.histogram(poisons)}

    @classmethod
    def from_state(cls, fields: dict[str, Any]) -> EpicRound:
        """As :meth:`DropRound.from_state`; also reads checkpoints that stored
        ``cluster_size_of`` under its former name ``cluster_sizes``."""
        if "cluster_sizes" in fields:
            fields = {("cluster_size_of" if k == "cluster_sizes" else k): v
                      for k, v in fields.items()}
        return cls(**fields)


#: Which examples a round clusters: those still kept, or all (see :class:`EPIC`).


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
        cluster: ``"kept"`` (default): each round clusters the examples still kept;
            ``"all"``: every example, dropped ones included, as the authors' code does
            (docs/defenses.md, "EPIC and the authors' code").

    Example:
        >>> defense = EPIC(fraction=0.1, warmup=10, every=2)
        >>> for epoch in range(epochs):  # doctest: +SKIP
        ...     if defense.due(epoch):
        ...         defense.update(model, train_data, epoch)
        ...     for x, y, _ in iterate_batches(train_data, keep=defense.keep_mask, shuffle=True):
        ...         ...
    """

    SETTINGS = (*ScheduledDefense.SCHEDULE, "fraction", "max_cluster_size", "per_class",
                "similarity", "method", "cluster")
    TAKES_TRAINING_GRADIENTS = True

    def __init__(
        self,
        fraction: float = 0.1,
        *,
        warmup: int = 10,
        every: int = 2,
        until: int | None = None,
        max_cluster_size: int = 1,
        per_class: PerClass = "proportional",
        similarity: Similarity = "exp",
        method: Method = "lazy",
        batch_size: int | None = None,
        num_examples: int | None = None,
        generator: torch.Generator | None = None,
        logits_fn: LogitsFn | None = None,
        cluster: Cluster = "kept",
    ) -> None:
        self.settings = EpicSettings(fraction=fraction, max_cluster_size=max_cluster_size,
                                     per_class=per_class, similarity=similarity, method=method,
                                     cluster=cluster)
        super().__init__(warmup=warmup, every=every, until=until, num_examples=num_examples,
                         batch_size=batch_size)
        self.generator = generator
        self.logits_fn = logits_fn

    @classmethod
    def from_settings(cls, settings: EpicSettings, **schedule: Any) -> EPIC:
        """EPIC with ``settings`` and ``schedule`` (``warmup``, ``every``, ``until``,
        ``num_examples``, ``batch_size``, ``generator``, ``logits_fn``)."""
        return cls(**dataclasses.asdict(settings), **schedule)

    @property
    def fraction(self) -> float:
        return self.settings.fraction

    @property
    def max_cluster_size(self) -> int:
        return self.settings.max_cluster_size

    @property
    def per_class(self) -> PerClass:
        return self.settings.per_class

    @property
    def similarity(self) -> Similarity:
        return self.settings.similarity

    @property
    def method(self) -> Method:
        return self.settings.method

    @property
    def cluster(self) -> Cluster:
        return self.settings.cluster

    record_type = EpicRound

    def looks_at(self, keep: Tensor) -> Tensor:
        """The kept examples, or with ``cluster="all"`` every example, dropped ones included
        (they shape the clusters; only kept ones are dropped)."""
        return torch.ones_like(keep) if self.cluster == "all" else keep

    @classmethod
    def for_run(cls, run: RunFacts, *, fraction: float = 0.1, warmup: int | None = None,
                every: int | None = None, until: int | None = None, max_cluster_size: int = 1,
                similarity: Similarity = "exp", per_class: PerClass = "proportional",
                method: Method = "lazy", cluster: Cluster = "kept") -> EPIC:
        """EPIC-``fraction`` on the paper's schedule (:func:`paper_schedule`), warming up for
        :func:`paper_warmup` epochs unless ``warmup`` says otherwise."""
        settings = EpicSettings(fraction=fraction, max_cluster_size=max_cluster_size,
                                similarity=similarity, per_class=per_class, method=method,
                                cluster=cluster)
        return cls.from_settings(settings, **paper_schedule(
            run, warmup=paper_warmup(settings.fraction) if warmup is None else warmup,
            every=every, until=until))

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
            seen = self.looks_at(keep)
            rows = seen.to(embeddings.device)
            return self.choose(embeddings[rows].float(), labels.to(embeddings.device)[rows],
                               seen)

        return self._round(epoch, embeddings.shape[0], choose)

    def drop_rows(self, embeddings: Tensor, labels: Tensor, keep: Tensor
                  ) -> tuple[Tensor, dict[str, Any]]:
        """Rows of the isolated medoids among the kept rows ``embeddings``, and the cluster
        size of every example (``cluster_size_of`` of the :class:`EpicRound`)."""
        medoids = select_medoids(embeddings, labels, self.fraction, per_class=self.per_class,
                                 similarity=self.similarity, method=self.method,
                                 generator=self.generator)
        size_at_row = torch.zeros(len(embeddings), dtype=torch.long, device=embeddings.device)
        size_at_row[medoids.indices] = medoids.cluster_sizes
        isolated = isolated_medoids(embeddings, labels, medoids, self.max_cluster_size)
        cluster_size_of = torch.zeros(len(keep), dtype=torch.long)
        cluster_size_of[keep] = size_at_row[medoids.assignment].cpu()
        return isolated, {"cluster_size_of": cluster_size_of}
