"""Simple drop rules the paper compares against (Sec. 3.3, Fig. 2): lowest confidence, highest
loss, and random examples, applied during training on a schedule; and training without what
another defense's trial dropped (filter, then retrain)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from epic.defenses.base import ScheduledDefense, paper_schedule, positions
from epic.gradients import Examples, logit_embeddings
from epic.protocol import RunFacts


def low_confidence(logits: Tensor, labels: Tensor, threshold: float) -> Tensor:
    """Bool mask ``(N,)``, True = softmax probability of the example's own label < threshold."""
    return torch.softmax(logits, 1).gather(1, labels[:, None]).squeeze(1) < threshold


def high_loss(logits: Tensor, labels: Tensor, threshold: float) -> Tensor:
    """Bool mask ``(N,)``, True = cross-entropy loss of the example > threshold."""
    return F.cross_entropy(logits, labels, reduction="none") > threshold


class _LogitRule(ScheduledDefense):
    default_threshold: float  # when built by name
    SETTINGS = (*ScheduledDefense.SCHEDULE, "threshold")

    def __init__(self, *, threshold: float, warmup: int = 10, every: int = 2,
                 until: int | None = None, num_examples: int | None = None,
                 batch_size: int | None = None) -> None:
        super().__init__(warmup=warmup, every=every, until=until, num_examples=num_examples,
                         batch_size=batch_size)
        self.threshold = threshold

    @classmethod
    def for_run(cls, run: RunFacts, *, threshold: float | None = None,
                warmup: int | None = None, every: int | None = None,
                until: int | None = None) -> _LogitRule:
        """The rule on EPIC's schedule (:func:`paper_schedule`)."""
        return cls(threshold=cls.default_threshold if threshold is None else threshold,
                   **paper_schedule(run, warmup=warmup, every=every, until=until))

    @staticmethod
    def rule(logits: Tensor, labels: Tensor, threshold: float) -> Tensor:
        raise NotImplementedError

    def embed(self, model: nn.Module, data: Examples, keep: Tensor,
              features: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return logit_embeddings(model, data, keep=keep, batch_size=self.batch_size,
                                features=features)

    def drop_rows(self, embeddings: Tensor, labels: Tensor, keep: Tensor
                  ) -> tuple[Tensor, dict[str, Any]]:
        return self.rule(embeddings, labels, self.threshold), {}


class LowestConfidence(_LogitRule):
    """Drop examples whose confidence in their own label is below ``threshold`` (paper: .25, .5)."""

    rule = staticmethod(low_confidence)
    default_threshold = 0.5


class HighestLoss(_LogitRule):
    """Drop examples whose loss exceeds ``threshold`` (paper: 1, 2)."""

    rule = staticmethod(high_loss)
    default_threshold = 1.0


class _Blind(ScheduledDefense):
    """A drop rule that looks at no example: its rows are empty."""

    def embed(self, model: nn.Module, data: Examples, keep: Tensor,
              features: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Nothing to embed: zero-width rows, one per kept example."""
        m = int(keep.sum())
        return torch.empty(m, 0), torch.zeros(m, dtype=torch.long)


class RandomDrop(_Blind):
    """Drop random kept examples each round (a control): a ``drop_fraction`` of them, or, replaying
    another defense's rounds, ``counts[epoch]`` of them before each epoch of ``counts`` and no
    round at other epochs: as many examples, at the same times, drawn blindly."""

    SETTINGS = (*ScheduledDefense.SCHEDULE, "drop_fraction", "counts")

    def __init__(self, *, drop_fraction: float = 0.01, warmup: int = 10, every: int = 2,
                 until: int | None = None, num_examples: int | None = None,
                 generator: torch.Generator | None = None,
                 counts: Mapping[int, int] | None = None) -> None:
        if counts is not None:
            if not counts or any(not isinstance(e, int) or not isinstance(c, int) or e < 0
                                 or c < 0 for e, c in counts.items()):
                raise ValueError(f"counts must map epochs >= 0 to counts >= 0, got {counts!r}")
            warmup, every, until = min(counts), 1, max(counts) + 1
        super().__init__(warmup=warmup, every=every, until=until, num_examples=num_examples)
        if not 0 <= drop_fraction <= 1:
            raise ValueError(f"drop_fraction must be in [0, 1], got {drop_fraction}")
        self.drop_fraction = drop_fraction
        self.counts = None if counts is None else dict(sorted(counts.items()))
        self.generator = generator

    @classmethod
    def for_run(cls, run: RunFacts, *, drop_fraction: float = 0.01, warmup: int | None = None,
                every: int | None = None, until: int | None = None,
                replay_of: str | None = None, counts: Mapping[int, int] | None = None
                ) -> RandomDrop:
        """``drop_fraction`` of the kept examples a round on EPIC's schedule
        (:func:`paper_schedule`), drawn from the run's seed; or, for the spec
        ``random-as-<defense>`` (``replay_of``), the drop ``counts`` per epoch of that
        defense's trial on the same data, which the caller reads from its record
        (``epic bench run`` does, from its store)."""
        generator = torch.Generator().manual_seed(run.seed)
        if replay_of is not None and counts is None:
            raise ValueError(f"random-as-{replay_of} replays the drops of a {replay_of} trial: "
                             f"run it with `epic bench run` into the store that holds that "
                             f"trial")
        if counts is not None:
            return cls(counts=counts, num_examples=run.num_examples, generator=generator)
        return cls(drop_fraction=drop_fraction, generator=generator,
                   **paper_schedule(run, warmup=warmup, every=every, until=until))

    @staticmethod
    def replay_options(rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The options of ``random-as-<defense>`` from that defense's trial's rounds: as many
        drops before each of their epochs."""
        return {"counts": {int(r["epoch"]): len(r["dropped"]) for r in rounds}}

    def due(self, epoch: int) -> bool:
        if self.counts is not None:
            return epoch in self.counts
        return super().due(epoch)

    def drop_rows(self, embeddings: Tensor, labels: Tensor, keep: Tensor
                  ) -> tuple[Tensor, dict[str, Any]]:
        if self.counts is None:
            m = round(self.drop_fraction * len(embeddings))
        else:  # this round is the next of counts': the history holds the earlier ones
            m = min(list(self.counts.values())[len(self.history)], len(embeddings))
        return torch.randperm(len(embeddings), generator=self.generator)[:m], {}


class RetrainWithout(_Blind):
    """Train without the examples ``drop`` (dataset indices), from the first epoch on.

    As ``retrain-after-<defense>`` (``replay_of``): without everything that defense's trial
    on the same data dropped, which the caller reads from its record (``epic bench run`` does,
    from its store). A detector's drops then reach a fresh model, as Tran et al. and Chen et
    al. use their detectors (filter, then retrain): a backdoor the defended model learned
    before the detector's first round is not carried over, at the cost of a second training.
    """

    SETTINGS = (*ScheduledDefense.SCHEDULE, "replay_of")

    def __init__(self, *, drop: Sequence[int], replay_of: str | None = None,
                 num_examples: int | None = None) -> None:
        super().__init__(warmup=0, every=1, until=1, num_examples=num_examples)
        self.drop = torch.tensor(sorted(set(drop)), dtype=torch.long)
        if len(self.drop) and (self.drop[0] < 0 or num_examples is not None
                               and self.drop[-1] >= num_examples):
            raise ValueError(f"drop holds indices outside the {num_examples} examples")
        self.replay_of = replay_of

    @classmethod
    def for_run(cls, run: RunFacts, *, replay_of: str | None = None,
                drop: Sequence[int] | None = None) -> RetrainWithout:
        """Without ``drop``; for the spec ``retrain-after-<defense>`` (``replay_of``), the
        indices that defense's trial dropped, which the caller reads from its record."""
        if drop is None:
            raise ValueError(f"retrain-after-{replay_of} trains without what a {replay_of} "
                             f"trial dropped: run it with `epic bench run` into the store that "
                             f"holds that trial" if replay_of is not None else
                             "retrain needs the indices to drop (drop=)")
        return cls(drop=drop, replay_of=replay_of, num_examples=run.num_examples)

    @staticmethod
    def replay_options(rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The options of ``retrain-after-<defense>`` from that defense's trial's rounds:
        everything they dropped."""
        return {"drop": sorted({int(i) for r in rounds for i in r["dropped"]})}

    def drop_rows(self, embeddings: Tensor, labels: Tensor, keep: Tensor
                  ) -> tuple[Tensor, dict[str, Any]]:
        return torch.isin(positions(keep), self.drop), {}
