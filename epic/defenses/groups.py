"""Foreign groups: drop cohesive groups of examples unlike their class.

EPIC drops examples whose gradient no other example of their class shares; poisons that share a
trigger or a source class share their gradients too, so EPIC keeps them (docs/results.md, "What
each defense finds"). This detector looks for what such poisons have in common instead, in the
model's penultimate features scaled to unit length:

1. :func:`unlikeness`: per example, its *foreignness* (the log ratio of its median distance to
   its own class over that to the nearest other class: relabelled poisons of a source class lie
   nearer that class's bulk) and its *outlyingness* (the log ratio of its median distance to its
   own class over the median of that among its class: a learned trigger makes a mode of its
   own). Medians, not nearest neighbours: a group of poisons, up to half its class, cannot
   vouch for its own members, as they do for each other in Deep k-NN.
2. :class:`ForeignGroups` averages both over the rounds that saw an example and takes the
   larger of their :func:`robust_z`; above ``threshold`` (once ``min_rounds`` rounds scored it)
   the example is a candidate.
3. :func:`cohesive_groups`: candidates backed by their nearest class-mates
   (:func:`neighbour_links`) form groups; a group whose members' nearest class-mates lie
   mostly inside it (``cohesion``) is dropped. A hard clean example that looks like another
   class, or the ragged edge of a class, rarely forms such a group.
4. Unless it is large, loose and unlearned (:func:`learning`): a group holding more than
   ``unlearned`` of its class's kept examples is dropped only once the model predicts their
   label for most of its members, or when it is ``tight`` (nearly every member's neighbours
   inside it). Poisons work by being learned; a large part of a class the model does not fit
   yet is more likely a mode of the class that a weakly fitted model has still to learn, and
   dropping it takes that mode from the class (docs/defenses.md). A shared trigger makes a
   near-clique before the model has learned it, which no mode of a class has been seen to
   be. A smaller group is dropped learned or not: poisons early in training are not learned
   yet, and dropping them then is what stops them.

With ``isolated`` (an EPIC fraction), each round also drops what EPIC would: the medoids of
the last-layer gradients whose cluster holds only themselves, among the same kept examples, so
that the isolated poisons EPIC finds (Gradient Matching's) and the cohesive ones it misses
(a shared trigger or source) are both dropped; the spec ``groups-epic-<fraction>``.

Every round records the groups it found (:attr:`GroupRound.groups`) and the isolated examples
it dropped (:attr:`GroupRound.isolated`), each with its score, for a person to review the
worst first. Activation Clustering also looks for groups, but splits every class in
two and drops the smaller half whenever it is small enough, unusual or not; Spectral Signatures
drops a fixed share of every class. Here a group is dropped only where it is both unlike its
class and cohesive, on EPIC's schedule (docs/defenses.md, "Foreign groups").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from epic.defenses.base import DropRound, ScheduledDefense, paper_schedule
from epic.defenses.epic import EPIC, paper_warmup
from epic.gradients import Examples, feature_embeddings, logit_gradients
from epic.protocol import RunFacts
from epic.selection import class_rows

# A group holding more than ``unlearned`` of its class is learned when the model predicts their
# label for more than this share of its members. Measured: clean groups of 17-36% of a class
# in a from-scratch convnet at half its final accuracy held 3-38% learned (a quarter let one
# through as the model began to fit it); the 3% patch backdoor's poisons, when first dropped,
# 59%; transfer poisons 90%.
LEARNED = 0.5

__all__ = ["ForeignGroups", "GroupRound", "cohesive_groups", "connected", "learning",
           "neighbour_links", "robust_z", "unlikeness"]


def _sample(members: Tensor, reference: int | None, generator: torch.Generator | None
            ) -> Tensor:
    """At most ``reference`` of ``members``, drawn without replacement by ``generator``, in
    ascending order."""
    if reference is None or len(members) <= reference:
        return members
    draw = torch.randperm(len(members), generator=generator)[:reference]
    return members[draw.to(members.device)].sort().values


def unlikeness(features: Tensor, labels: Tensor, *, reference: int | None = 1000,
               generator: torch.Generator | None = None, block: int = 1024
               ) -> tuple[Tensor, Tensor]:
    """How unlike its class each example is, two ways, from median distances in unit-length
    feature space (see the module docs).

    Args:
        features: ``(N, F)`` penultimate features.
        labels: ``(N,)`` integer labels.
        reference: measure each class's median distance against at most this many of its
            members, drawn by ``generator`` (None = all); a sample of 1,000 estimates a
            median closely and bounds the cost at ``N x 1000`` distances per class.
        block: rows of distances computed at a time.

    Returns:
        ``(foreignness, outlyingness)``, each ``(N,)``: the log ratio of an example's median
        distance to its own class over that to the nearest other class (positive where
        another class's bulk is nearer; 0 where there is one class), and the log ratio of
        its median distance to its own class over the median of that among its class.

    Example:
        >>> f = torch.tensor([[1.0, 0.1], [1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 1.0],
        ...                   [0.0, 0.9]])
        >>> foreign, outlying = unlikeness(f, torch.tensor([0, 0, 0, 1, 1, 0]))
        >>> (foreign > 0).tolist()
        [False, False, False, False, False, True]
        >>> int(outlying.argmax())
        5
    """
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels must be ({features.shape[0]},), got {tuple(labels.shape)}")
    unit = F.normalize(features.float(), dim=1)
    rows = [_sample(members, reference, generator) for members in class_rows(labels)]
    classes = labels.unique()  # ascending, as class_rows
    own_column = torch.searchsorted(classes, labels)[:, None]
    reference_rows = torch.cat(rows)
    bounds = torch.tensor([len(r) for r in rows]).cumsum(0).tolist()
    medians = torch.empty(len(unit), len(classes), device=unit.device)
    for start in range(0, len(unit), block):
        block_rows = torch.arange(start, min(start + block, len(unit)), device=unit.device)
        dist = torch.cdist(unit[block_rows], unit[reference_rows])
        dist[block_rows[:, None] == reference_rows[None]] = float("nan")  # not to itself
        medians[block_rows] = torch.stack([part.nanmedian(1).values for part in
                                           dist.tensor_split(bounds[:-1], dim=1)], 1)
    own = medians.gather(1, own_column).squeeze(1).nan_to_num(0.0).clamp_min(1e-12)
    outlying = torch.zeros_like(own)
    for c in range(len(classes)):
        members = own_column.squeeze(1) == c
        outlying[members] = (own[members] / own[members].median()).log()
    if len(classes) < 2:
        return torch.zeros_like(own), outlying
    nearest_other = medians.scatter(1, own_column, float("inf")).min(1).values
    return (own / nearest_other.clamp_min(1e-12)).log(), outlying


def robust_z(values: Tensor) -> Tensor:
    """``(values - median) / median absolute deviation``, the deviation floored at 1e-12."""
    centre = values.median()
    return (values - centre) / (values - centre).abs().median().clamp_min(1e-12)


def neighbour_links(features: Tensor, labels: Tensor, neighbours: int) -> Tensor:
    """``(N, neighbours)`` int64 row positions of each example's nearest examples of its own
    class in unit-length feature space, nearest first (-1 where its class has fewer)."""
    unit = F.normalize(features.float(), dim=1)
    links = torch.full((len(unit), neighbours), -1, dtype=torch.long, device=unit.device)
    for members in class_rows(labels):
        k = min(neighbours, len(members) - 1)
        if k < 1:
            continue
        dist = torch.cdist(unit[members], unit[members])
        dist.fill_diagonal_(float("inf"))
        links[members, :k] = members[dist.topk(k, largest=False).indices]
    return links


def _share_in(mask: Tensor, links: Tensor) -> Tensor:
    """Per row, the share of its valid ``links`` that point at rows where ``mask`` holds."""
    valid = links >= 0
    hits = mask[links.clamp_min(0)] & valid
    return hits.sum(1) / valid.sum(1).clamp_min(1)


def connected(flagged: Tensor, links: Tensor) -> Tensor:
    """``(N,)`` int64 group id of every flagged row (-1 elsewhere): flagged rows connected by
    ``links`` (either direction) share a group; ids are 0, 1, ... in order of first row."""
    device, flagged, links = flagged.device, flagged.cpu(), links.cpu()  # a loop of Python
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
    return ids.to(device)


def cohesive_groups(candidates: Tensor, links: Tensor, *, share: float = 0.6
                    ) -> tuple[Tensor, Tensor]:
    """Groups of candidates and how cohesive each is.

    A candidate stays when at least ``share`` of its nearest half of ``links`` are candidates
    (a lone one does not); those left form groups, connected through that nearest half; a
    group's cohesion is the mean share of its members' ``links`` inside the group.

    Args:
        candidates: ``(N,)`` bool.
        links: ``(N, K)`` from :func:`neighbour_links`.

    Returns:
        ``(ids, cohesion)``: ``(N,)`` int64 group of every row (-1: in none) and ``(G,)``
        the cohesion of each group.
    """
    near = links[:, :max(1, links.shape[1] // 2)]
    backed = candidates & (_share_in(candidates, near) >= share)
    ids = connected(backed, near)
    valid = links >= 0
    inside = (ids[links.clamp_min(0)] == ids[:, None]) & valid  # a link within its group
    member = ids >= 0
    count = int(ids.max()) + 1 if member.any() else 0
    shares = (inside.sum(1) / valid.sum(1).clamp_min(1))[member]
    cohesion = (torch.bincount(ids[member], weights=shares, minlength=count)
                / torch.bincount(ids[member], minlength=count).clamp_min(1))
    return ids, cohesion.float()


def learning(ids: Tensor, labels: Tensor, learned: Tensor) -> tuple[Tensor, Tensor]:
    """Per group of ``ids`` (:func:`cohesive_groups`): the share of its members ``learned``
    (``(N,)`` bool: the model predicts their label), and its size as a share of its class
    (all of ``labels``; a group lies within one class)."""
    member = ids >= 0
    count = int(ids.max()) + 1 if member.any() else 0
    size = torch.bincount(ids[member], minlength=count)
    share = torch.bincount(ids[member], weights=learned[member].float(), minlength=count)
    label = torch.zeros_like(size).scatter_(0, ids[member], labels[member])
    return share / size.clamp_min(1), size / torch.bincount(labels)[label]


class _NearestClass:
    """The other class nearest a set of rows: their majority's, by distance to the class
    centroids in unit-length feature space."""

    def __init__(self, features: Tensor, labels: Tensor) -> None:
        self.unit = F.normalize(features.float(), dim=1)
        self.labels = labels
        self.classes = labels.unique()
        self.centroids = torch.stack([self.unit[labels == c].mean(0) for c in self.classes])

    def __call__(self, rows: Tensor) -> int:
        distance = torch.cdist(self.unit[rows], self.centroids)
        distance[:, self.classes == self.labels[rows[0]]] = float("inf")
        return int(self.classes[distance.argmin(1)].mode().values)


@dataclass(frozen=True)
class GroupRound(DropRound):
    """A :class:`ForeignGroups` round; ``groups`` lists the groups of candidates it found,
    most cohesive first, each with its ``label``, the ``nearest`` other class (by its
    members' majority), ``size``, ``cohesion``, mean ``score`` (robust z), ``learned`` (the
    share of its members the model predicts as their label), whether it was ``dropped``
    (cohesion at least the defense's ``cohesion``, and if it is large, learned or ``tight``) and its
    ``members`` (dataset indices). ``isolated`` lists the examples dropped as EPIC drops them
    (with ``isolated`` set), the highest score first, each with its ``index``, ``label``,
    ``nearest`` class and ``score`` (this round's, however many rounds scored it)."""

    groups: list[dict[str, Any]]
    isolated: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return super().summary() | {"groups": self.groups, "isolated": self.isolated}

    def poison_summary(self, poisons: Tensor) -> dict[str, Any]:
        """Poisons dropped, per group (in :attr:`groups`' order) how many of its members
        are poisons, and how many of the isolated examples are."""
        marked = set(poisons.tolist())
        return super().poison_summary(poisons) | {
            "group_poisons": [sum(m in marked for m in g["members"]) for g in self.groups],
            "isolated_poisons": sum(e["index"] in marked for e in self.isolated)}


class ForeignGroups(ScheduledDefense):
    """Drop cohesive groups of examples unlike their class (see the module docs), on EPIC's
    schedule. The model must be a :class:`~epic.models.Classifier`: its ``features`` give the
    embeddings, its ``classifier`` the logits that tell whether a group is learned.

    Args:
        threshold: an example is a candidate when its score (the larger of the robust z of
            its average foreignness and of its average outlyingness, :func:`unlikeness`)
            exceeds this.
        neighbours: nearest class-mates each example is linked to (:func:`neighbour_links`).
        share: a candidate stays when this share of its nearest half of them are candidates.
        cohesion: a group is dropped when its members' neighbours lie inside it at least this
            often on average (:func:`cohesive_groups`).
        unlearned: a group holding more than this share of its class's kept examples is
            dropped only when the model predicts their label for more than :data:`LEARNED` of
            its members, or when it is ``tight`` (1: at any size, learned or not).
        tight: a group at least this cohesive is dropped however large and unlearned (None:
            only once learned). Measured (docs/defenses.md): 746 large clean groups in the
            benchmark stores' rounds were at most 0.86 cohesive; a 3% patch backdoor's group
            before the model learned it, 0.94 and 0.97.
        min_rounds: an example is a candidate only once this many rounds have scored it (the
            first round only scores, by default).
        reference: class members each median distance is measured against (see
            :func:`unlikeness`).
        seed: draws those members.
        isolated: also drop EPIC-``isolated``'s isolated medoids of the last-layer gradients
            (None: groups only).
        warmup, every, until, num_examples, batch_size: the schedule
            (:class:`~epic.defenses.base.ScheduledDefense`).
    """

    SETTINGS = (*ScheduledDefense.SCHEDULE, "threshold", "neighbours", "share", "cohesion",
                "unlearned", "tight", "min_rounds", "reference", "seed", "isolated")
    record_type = GroupRound

    def __init__(self, *, threshold: float = 2.5, neighbours: int = 10, share: float = 0.6,
                 cohesion: float = 0.75, unlearned: float = 0.125, tight: float | None = 0.9,
                 min_rounds: int = 2,
                 reference: int | None = 1000, seed: int = 0, isolated: float | None = None,
                 warmup: int = 10, every: int = 2, until: int | None = None,
                 num_examples: int | None = None, batch_size: int | None = None) -> None:
        shares = (share, cohesion, unlearned, 1.0 if tight is None else tight)
        if neighbours < 2 or not all(0 < v <= 1 for v in shares):
            raise ValueError(f"need neighbours >= 2 and share, cohesion, unlearned and tight in "
                             f"(0, 1], got {neighbours}, {share}, {cohesion}, {unlearned}, "
                             f"{tight}")
        super().__init__(warmup=warmup, every=every, until=until, num_examples=num_examples,
                         batch_size=batch_size)
        self.threshold = threshold
        self.neighbours = neighbours
        self.share = share
        self.cohesion = cohesion
        self.unlearned = unlearned
        self.tight = tight
        self.min_rounds = min_rounds
        self.reference = reference
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.isolated = isolated
        # EPIC's selection, for its drop_rows only (this defense keeps the schedule and mask)
        self._epic = None if isolated is None else EPIC(isolated, warmup=warmup, every=every)
        self._classes = 0  # with isolated: the logit-gradient columns of the embeddings
        # per example: running sums of its two unlikeness scores, and the rounds that saw it
        self.score_sum: Tensor | None = None
        self.rounds_seen: Tensor | None = None

    @classmethod
    def for_run(cls, run: RunFacts, *, threshold: float | None = None,
                cohesion: float | None = None, unlearned: float | None = None,
                tight: float | None = None, min_rounds: int | None = None,
                isolated: float | None = None,
                warmup: int | None = None, every: int | None = None,
                until: int | None = None) -> ForeignGroups:
        """On EPIC's schedule (:func:`paper_schedule`: EPIC-``isolated``'s, or EPIC-0.1's),
        seeded by the run."""
        given: dict[str, Any] = {k: v for k, v in (
            ("threshold", threshold), ("cohesion", cohesion), ("unlearned", unlearned),
            ("tight", tight), ("min_rounds", min_rounds)) if v is not None}
        if warmup is None and isolated is not None:
            warmup = paper_warmup(isolated)
        return cls(seed=run.seed, isolated=isolated, **given,
                   **paper_schedule(run, warmup=warmup, every=every, until=until))

    def embed(self, model: nn.Module, data: Examples, keep: Tensor,
              features: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The kept examples' features; with ``isolated``, their last-layer gradients
        (:func:`~epic.gradients.logit_gradients` of the model's ``classifier``) after them;
        last, one column: 1 where the model predicts the example's label, else 0."""
        feats, labels = feature_embeddings(model, data, keep=keep, batch_size=self.batch_size,
                                           features=features)
        head: nn.Module = getattr(model, "classifier")  # noqa: B009
        device = next(head.parameters()).device
        with torch.no_grad():
            logits = head(feats.to(device)).float()
        parts = [feats.float()]
        if self._epic is not None:
            gradients = logit_gradients(logits, labels.to(device))
            self._classes = gradients.shape[1]
            parts.append(gradients.to(feats.device))
        learned = logits.argmax(1) == labels.to(device)
        return torch.cat([*parts, learned.float()[:, None].to(feats.device)], 1), labels

    def scores(self, embeddings: Tensor, labels: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        """Add this round's unlikeness of the kept rows to the running sums; their score
        (see ``threshold``), and whether at least ``min_rounds`` rounds saw each."""
        where = keep.nonzero().squeeze(1)
        if self.score_sum is None or self.rounds_seen is None:
            self.score_sum = torch.zeros(len(keep), 2)
            self.rounds_seen = torch.zeros(len(keep))
        foreign, outlying = unlikeness(embeddings, labels, reference=self.reference,
                                       generator=self.generator)
        self.score_sum[where] += torch.stack([foreign, outlying], 1).cpu()
        self.rounds_seen[where] += 1
        seen = self.rounds_seen[where, None]
        average = (self.score_sum[where] / seen).to(embeddings.device)
        score = torch.maximum(robust_z(average[:, 0]), robust_z(average[:, 1]))
        return score, (seen.squeeze(1) >= self.min_rounds).to(score.device)

    def drop_rows(self, embeddings: Tensor, labels: Tensor, keep: Tensor
                  ) -> tuple[Tensor, dict[str, Any]]:
        features, learned = embeddings[:, :-1], embeddings[:, -1] > 0.5
        isolated = torch.empty(0, dtype=torch.long, device=embeddings.device)
        if self._epic is not None:
            features, gradients = features.tensor_split([-self._classes], dim=1)
            isolated = self._epic.drop_rows(gradients, labels, keep)[0]
        score, scored = self.scores(features, labels, keep)
        links = neighbour_links(features, labels, self.neighbours)
        ids, cohesion = cohesive_groups((score > self.threshold) & scored, links,
                                        share=self.share)
        learned_share, class_share = learning(ids, labels, learned)
        tight = cohesion >= (math.inf if self.tight is None else self.tight)
        dropped = (cohesion >= self.cohesion) & ((class_share <= self.unlearned)
                                                 | (learned_share > LEARNED) | tight)
        drop = torch.isin(ids, dropped.nonzero().squeeze(1))
        drop[isolated] = True
        where = keep.nonzero().squeeze(1)
        nearest = _NearestClass(features, labels)
        groups = []
        for g, value in enumerate(cohesion.tolist()):
            rows = (ids == g).nonzero().squeeze(1)
            if len(rows) >= 2:
                groups.append({"label": int(labels[rows[0]]), "nearest": nearest(rows),
                               "size": len(rows), "cohesion": round(value, 4),
                               "score": round(float(score[rows].mean()), 4),
                               "learned": round(float(learned_share[g]), 4),
                               "dropped": bool(dropped[g]),
                               "members": where[rows.cpu()].tolist()})
        singles = [{"index": int(where[i]), "label": int(labels[i]),
                    "nearest": nearest(torch.tensor([i])), "score": round(float(score[i]), 4)}
                   for i in isolated.tolist()]
        return drop, {"groups": sorted(groups, key=lambda g: (-g["cohesion"], -g["size"])),
                      "isolated": sorted(singles, key=lambda e: -e["score"])}

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"score_sum": self.score_sum,
                                       "rounds_seen": self.rounds_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.score_sum = state.get("score_sum")
        self.rounds_seen = state.get("rounds_seen")
