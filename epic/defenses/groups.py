"""Foreign groups: drop cohesive groups of examples that lie nearer another class than their own.

EPIC drops examples whose gradient nobody else shares; poisons that share a trigger and a source
class share their gradients too, so EPIC keeps them (docs/results.md, "What each defense
finds"). This detector looks for what such poisons have in common instead. In the model's
penultimate feature space, an example's *foreignness* is how much nearer the bulk of another
class lies than the bulk of its own label's class::

    foreignness(i) = log( median_{j: y_j = y_i} |f_i - f_j|
                          / min_{c != y_i} median_{j: y_j = c} |f_i - f_j| )

with features scaled to unit length. The median, not the nearest neighbours, measures the
distance to a class, so a group of poisons (up to half of its class) cannot vouch for its own
members, as they do for each other in Deep k-NN. Scores are averaged over the rounds an example
was seen in (a model in training changes its mind from epoch to epoch), and an example is a
*candidate* when its average lies more than ``threshold`` median absolute deviations above the
median of all examples (from the second round on, by default: one round's scores alone are
noisy). A candidate is dropped only when it belongs to a group: at least
``share`` of its ``neighbours`` nearest examples of its own class are candidates too. A hard
clean example that looks like another class is usually alone in that; poisons crafted from one
source class, or stamped with one trigger, are not. The flagged examples form groups (connected
by those neighbour links), each ranked by the mean foreignness of its members so that a person
can review the worst first (:attr:`GroupRound.groups`).

What is new against the baselines: Activation Clustering also looks for groups, but splits
every class in two and flags the smaller half whether or not it is unusual; Spectral
Signatures flags a fixed share of every class; Deep k-NN votes with the nearest neighbours,
which for a group of poisons are other poisons. Here a group is flagged only where it is both
unlike its class and cohesive, and the test runs on EPIC's schedule, round after round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from epic.defenses.base import DropRound, ScheduledDefense, paper_schedule
from epic.gradients import Examples, feature_embeddings
from epic.protocol import RunFacts

__all__ = ["ForeignGroups", "GroupRound", "cohesive_candidates", "feature_groups",
           "foreignness"]


def _class_rows(labels: Tensor, reference: int | None, generator: torch.Generator | None
                ) -> dict[int, Tensor]:
    """Per class present in ``labels``, the row positions of its members (at most
    ``reference`` of them, drawn without replacement by ``generator``)."""
    rows = {}
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().squeeze(1)
        if reference is not None and len(members) > reference:
            draw = torch.randperm(len(members), generator=generator)[:reference]
            members = members[draw.to(members.device)].sort().values
        rows[int(c)] = members
    return rows


def foreignness(features: Tensor, labels: Tensor, *, reference: int | None = 1000,
                generator: torch.Generator | None = None, block: int = 1024) -> Tensor:
    """``(N,)`` log ratio of each example's median distance to its own class over its median
    distance to the nearest other class (see the module docs), in unit-length feature space.

    Args:
        features: ``(N, F)`` penultimate features.
        labels: ``(N,)`` integer labels.
        reference: measure each class's median distance against at most this many of its
            members, drawn by ``generator`` (None = all); a sample of 1,000 estimates a
            median closely and bounds the cost at ``N x 1000`` distances per class.
        block: rows of distances computed at a time.

    Returns:
        0 where an example's class is the only class; positive where another class's bulk
        is nearer than its own.

    Example:
        >>> f = torch.tensor([[1.0, 0.1], [1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 1.0],
        ...                   [0.0, 0.9]])
        >>> (foreignness(f, torch.tensor([0, 0, 0, 1, 1, 0])) > 0).tolist()
        [False, False, False, False, False, True]
    """
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels must be ({features.shape[0]},), got {tuple(labels.shape)}")
    unit = F.normalize(features.float(), dim=1)
    rows = _class_rows(labels, reference, generator)
    classes = sorted(rows)
    out = torch.zeros(len(unit), device=unit.device)
    if len(classes) < 2:
        return out
    own_column = torch.searchsorted(torch.tensor(classes, device=labels.device), labels)
    for start in range(0, len(unit), block):
        dist = torch.cdist(unit[start:start + block], unit)
        count = len(dist)
        dist[torch.arange(count), torch.arange(start, start + count)] = float("nan")  # self
        medians = torch.stack([dist[:, rows[c]].nanmedian(1).values for c in classes], 1)
        own = own_column[start:start + block, None]
        mine = medians.gather(1, own).squeeze(1)
        nearest_other = medians.scatter(1, own, float("inf")).min(1).values
        out[start:start + block] = (mine.clamp_min(1e-12) / nearest_other.clamp_min(1e-12)).log()
    return out


def cohesive_candidates(features: Tensor, labels: Tensor, candidates: Tensor, *,
                        neighbours: int = 5, share: float = 0.6) -> tuple[Tensor, Tensor]:
    """Which candidates belong to a group of candidates, and their neighbour links.

    A candidate is kept when at least ``share`` of its ``neighbours`` nearest examples of its
    own class (unit-length features, Euclidean distance) are candidates too.

    Returns:
        ``(flagged, links)``: bool ``(N,)``, and ``(N, neighbours)`` int64 row positions of
        each example's nearest class-mates (-1 where its class has fewer members).
    """
    unit = F.normalize(features.float(), dim=1)
    flagged = torch.zeros_like(candidates)
    links = torch.full((len(unit), neighbours), -1, dtype=torch.long, device=unit.device)
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().squeeze(1)
        k = min(neighbours, len(members) - 1)
        if k < 1:
            continue
        dist = torch.cdist(unit[members], unit[members])
        dist.fill_diagonal_(float("inf"))
        nearest = members[dist.topk(k, largest=False).indices]
        links[members, :k] = nearest
        backed = candidates[nearest].float().mean(1) >= share
        flagged[members] = candidates[members] & backed
    return flagged, links


def feature_groups(flagged: Tensor, links: Tensor) -> Tensor:
    """``(N,)`` int64 group id of every flagged row (-1 elsewhere): flagged rows connected by
    ``links`` (either direction) share a group; ids are 0, 1, ... in order of first row."""
    n = len(flagged)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    rows = flagged.nonzero().squeeze(1).tolist()
    for i in rows:
        for j in links[i].tolist():
            if j >= 0 and bool(flagged[j]):
                parent[root(i)] = root(j)
    ids = torch.full((n,), -1, dtype=torch.long)
    numbering: dict[int, int] = {}
    for i in rows:
        ids[i] = numbering.setdefault(root(i), len(numbering))
    return ids.to(flagged.device)


@dataclass(frozen=True)
class GroupRound(DropRound):
    """A :class:`ForeignGroups` round; ``groups`` lists the flagged groups, worst first: per
    group its ``label``, the ``nearest`` other class (by its members' majority), its ``size``,
    mean ``foreignness`` and ``members`` (dataset indices)."""

    groups: list[dict[str, Any]]

    def summary(self) -> dict[str, Any]:
        return super().summary() | {"groups": self.groups}

    def poison_summary(self, poisons: Tensor) -> dict[str, Any]:
        """Poisons dropped, and per group (worst first) how many of its members are poisons."""
        marked = set(poisons.tolist())
        return super().poison_summary(poisons) | {
            "group_poisons": [sum(m in marked for m in g["members"]) for g in self.groups]}


class ForeignGroups(ScheduledDefense):
    """Drop cohesive groups of examples that lie nearer another class than their own (see the
    module docs), on EPIC's schedule.

    Args:
        threshold: a candidate's average foreignness lies this many median absolute
            deviations above the median of the examples a round sees.
        neighbours, share: a candidate is dropped when ``share`` of its ``neighbours``
            nearest class-mates are candidates.
        min_rounds: an example is dropped only once this many rounds have scored it (the
            first round only scores, by default).
        reference: class members each median distance is measured against (see
            :func:`foreignness`).
        seed: draws those members.
        warmup, every, until, num_examples, batch_size: the schedule
            (:class:`~epic.defenses.base.ScheduledDefense`).
    """

    SETTINGS = (*ScheduledDefense.SCHEDULE, "threshold", "neighbours", "share", "min_rounds",
                "reference", "seed")
    record_type = GroupRound

    def __init__(self, *, threshold: float = 3.0, neighbours: int = 5, share: float = 0.6,
                 min_rounds: int = 2, reference: int | None = 1000, seed: int = 0, warmup: int = 10,
                 every: int = 2, until: int | None = None, num_examples: int | None = None,
                 batch_size: int | None = None) -> None:
        if neighbours < 1 or not 0 < share <= 1:
            raise ValueError(f"need neighbours >= 1 and 0 < share <= 1, got {neighbours}, "
                             f"{share}")
        super().__init__(warmup=warmup, every=every, until=until, num_examples=num_examples,
                         batch_size=batch_size)
        self.threshold = threshold
        self.neighbours = neighbours
        self.share = share
        self.min_rounds = min_rounds
        self.reference = reference
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        # running sums of every example's foreignness and of the rounds that saw it
        self.score_sum: Tensor | None = None
        self.rounds_seen: Tensor | None = None

    @classmethod
    def for_run(cls, run: RunFacts, *, threshold: float | None = None,
                neighbours: int | None = None, share: float | None = None,
                min_rounds: int | None = None, warmup: int | None = None, every: int | None = None,
                until: int | None = None) -> ForeignGroups:
        """On EPIC-0.1's schedule (:func:`paper_schedule`), seeded by the run."""
        given: dict[str, Any] = {k: v for k, v in (
            ("threshold", threshold), ("neighbours", neighbours), ("share", share),
            ("min_rounds", min_rounds)) if v is not None}
        return cls(seed=run.seed, **given,
                   **paper_schedule(run, warmup=warmup, every=every, until=until))

    def embed(self, model: nn.Module, data: Examples, keep: Tensor,
              features: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return feature_embeddings(model, data, keep=keep, batch_size=self.batch_size,
                                  features=features)

    def drop_rows(self, embeddings: Tensor, labels: Tensor, keep: Tensor
                  ) -> tuple[Tensor, dict[str, Any]]:
        where = keep.nonzero().squeeze(1)
        if self.score_sum is None or self.rounds_seen is None:
            self.score_sum = torch.zeros(len(keep))
            self.rounds_seen = torch.zeros(len(keep))
        score = foreignness(embeddings, labels, reference=self.reference,
                            generator=self.generator)
        self.score_sum[where] += score.cpu()
        self.rounds_seen[where] += 1
        average = (self.score_sum[where] / self.rounds_seen[where]).to(embeddings.device)
        centre = average.median()
        spread = (average - centre).abs().median().clamp_min(1e-12)
        candidates = (average - centre) / spread > self.threshold
        candidates &= self.rounds_seen[where].to(candidates.device) >= self.min_rounds
        flagged, links = cohesive_candidates(embeddings, labels, candidates,
                                             neighbours=self.neighbours, share=self.share)
        return flagged, {"groups": self._describe(feature_groups(flagged, links), average,
                                                  embeddings, labels, where)}

    @staticmethod
    def _describe(ids: Tensor, average: Tensor, embeddings: Tensor, labels: Tensor,
                  where: Tensor) -> list[dict[str, Any]]:
        """The groups of ``ids`` as records, worst (highest mean foreignness) first."""
        unit = F.normalize(embeddings.float(), dim=1)
        classes = labels.unique()
        centroids = torch.stack([unit[labels == c].mean(0) for c in classes])
        groups = []
        for g in range(int(ids.max()) + 1 if len(ids) else 0):
            rows = (ids == g).nonzero().squeeze(1)
            label = int(labels[rows[0]])
            distance = torch.cdist(unit[rows], centroids)
            distance[:, classes == label] = float("inf")
            nearest = int(classes[distance.argmin(1)].mode().values)
            groups.append({"label": label, "nearest": nearest, "size": len(rows),
                           "foreignness": round(float(average[rows].mean()), 4),
                           "members": where[rows.cpu()].tolist()})
        return sorted(groups, key=lambda g: -g["foreignness"])

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"score_sum": self.score_sum,
                                       "rounds_seen": self.rounds_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.score_sum = state.get("score_sum")
        self.rounds_seen = state.get("rounds_seen")
