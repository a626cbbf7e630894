"""What every defense that drops training examples on a schedule shares.

:class:`ScheduledDefense` holds the warmup / every / until schedule, the cumulative keep-mask
(True = train on the example; dropped examples never come back), a :class:`DropRound` record
per round, and resumable state; a subclass says how to embed the kept examples
(:meth:`~ScheduledDefense.embed`) and which of them to drop
(:meth:`~ScheduledDefense.drop_rows`). EPIC (:mod:`epic.defenses.epic`) and the baselines
beside it in :mod:`epic.defenses` that drop examples are such subclasses.
:func:`paper_schedule` is the schedule they take when built by name.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from epic.distributed import broadcast_from_first, gather_shares, share_of, world
from epic.errors import EpicError
from epic.gradients import Examples, count_examples
from epic.protocol import Defense, RunFacts

__all__ = ["DropRound", "ScheduledDefense", "paper_schedule", "positions"]

log = logging.getLogger(__name__)


def positions(mask: Tensor) -> Tensor:
    """``(K,)`` int64 positions of the True entries of a bool mask ``(N,)``, ascending."""
    return mask.nonzero().squeeze(1)


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

    def poison_summary(self, poisons: Tensor) -> dict[str, Any]:
        """JSON-ready facts of how the round treated the examples ``poisons`` (dataset
        indices): how many of them it dropped."""
        return {"poisons_dropped": int(torch.isin(self.dropped, poisons).sum())}

    @classmethod
    def from_state(cls, fields: dict[str, Any]) -> DropRound:
        """The record whose :func:`dataclasses.asdict` is ``fields`` (as a checkpoint's
        :meth:`ScheduledDefense.state_dict` holds it)."""
        return cls(**fields)


def paper_schedule(run: RunFacts, *, warmup: int | None = None, every: int | None = None,
                   until: int | None = None, once: bool = False) -> dict[str, Any]:
    """The schedule keywords of a :class:`ScheduledDefense` for ``run``, as the paper runs them:
    the first round before epoch ``warmup`` (default 10, EPIC-0.1's), then a round every
    ``epochs / 20`` epochs (2 of 40, 10 of 200; every epoch in transfer learning) until the
    last learning-rate milestone, or, with ``once``, the one round at ``warmup``. ``every``
    and ``until`` override."""
    warmup = 10 if warmup is None else warmup
    if every is None:
        every = 1 if run.scenario == "transfer" else max(1, run.epochs // 20)
    if until is None:
        until = warmup + 1 if once else (run.milestones[-1] if run.milestones else None)
    return {"warmup": warmup, "every": every, "until": until, "num_examples": run.num_examples}


class ScheduledDefense(Defense):
    """Base of defenses that drop examples before some epochs; subclasses implement
    :meth:`embed` and :meth:`drop_rows`.

    Rounds run before epoch ``warmup`` and then every ``every`` epochs, never at or after
    ``until`` (None = no end). ``keep_mask`` is a bool ``(N,)`` over the training set, True =
    train on the example; it is None before the first round unless ``num_examples`` is given.
    """

    SCHEDULE: ClassVar[tuple[str, ...]] = ("warmup", "every", "until", "batch_size")
    SETTINGS: ClassVar[tuple[str, ...] | None] = SCHEDULE

    record_type: type[DropRound] = DropRound

    def __init__(self, *, warmup: int, every: int, until: int | None = None,
                 num_examples: int | None = None, batch_size: int | None = None) -> None:
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

    def check_runs_within(self, epochs: int, *, name: str | None = None) -> None:
        """Refuse a schedule that runs no round in ``epochs`` epochs: a defended run that
        cannot defend is an error, not an undefended run that exits 0.

        Raises:
            ValueError: no round is due in ``range(epochs)``; the message says how to fix it.
        """
        if epochs <= 0 or any(self.due(e) for e in range(epochs)):
            return
        who = name or type(self).__name__
        until = ("" if self.until is None else f", until {self.until} (until defaults to the "
                                                f"last learning-rate milestone)")
        raise EpicError(f"no {who} round runs in {epochs} epochs: warmup {self.warmup}, every "
                        f"{self.every}{until}; train longer, or pass a smaller warmup or a "
                        f"larger until", options=("warmup", "every", "until"))

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
        return positions(~self.keep_mask)

    def embed(self, model: nn.Module, data: Examples, keep: Tensor,
              features: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The embeddings ``(M, D)`` and labels ``(M,)`` of the kept examples, in index order,
        that :meth:`drop_rows` decides on (``features``: see :meth:`update`)."""
        raise NotImplementedError

    def drop_rows(self, embeddings: Tensor, labels: Tensor, keep: Tensor
                  ) -> tuple[Tensor, dict[str, Any]]:
        """Which rows of ``embeddings`` ``(M, D)`` (the kept examples of the keep-mask ``keep``
        ``(N,)``, in index order) to drop, as a bool mask ``(M,)`` (True = drop) or row
        positions, and extra fields for the round record."""
        raise NotImplementedError

    def looks_at(self, keep: Tensor) -> Tensor:
        """The examples a round embeds and decides on, given the keep-mask ``keep``: the kept
        ones (a subclass may look at more; only kept ones are ever newly dropped)."""
        return keep

    def choose(self, embeddings: Tensor, labels: Tensor, keep: Tensor
               ) -> tuple[Tensor, dict[str, Any]]:
        """Dataset indices to drop among ``keep`` (whose kept rows ``embeddings`` holds), and
        extra fields for the round record: :meth:`drop_rows` mapped to the dataset."""
        rows, extra = self.drop_rows(embeddings, labels, keep)
        return positions(keep)[rows.cpu()], extra

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
            seen = self.looks_at(keep)
            if size == 1:
                rows, labels = self.embed(model, data, seen, features)
            else:
                rows, labels = self.embed(model, data, share_of(seen, rank, size), features)
                rows, labels = gather_shares(rows, labels, int(seen.sum()))
            embedded = {"embed_seconds": time.perf_counter() - start}
            if size == 1:
                dropped, extra = self.choose(rows, labels, seen)
            else:
                dropped, extra = broadcast_from_first(
                    self.choose(rows, labels, seen) if rank == 0 else None)
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
        dropped = dropped[self.keep_mask[dropped]]  # what was dropped before stays so
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
        self.history = [self.record_type.from_state(r) for r in state["history"]]
        if state.get("generator") is not None and self.generator is not None:
            self.generator.set_state(state["generator"])


