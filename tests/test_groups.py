"""The foreign-groups detector: cohesive groups of examples unlike their class."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import TensorDataset

from epic.defenses import (
    EPIC,
    ForeignGroups,
    RunFacts,
    build_defense,
    cohesive_groups,
    deep_knn_outliers,
    unlikeness,
)
from epic.defenses.groups import GroupRound, connected, learning, neighbour_links, robust_z
from epic.models import Classifier


def _classes_with_a_planted_group(group: int = 30, seed: int = 0
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three classes of 100 in separate blobs; the first ``group`` examples of class 0 sit
    tightly together inside class 1's blob (poisons of one source, relabelled), and one
    class-2 example lies alone inside class 1 (a hard clean example). Returns features,
    labels and the indices of the group."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(3, 16) * 6
    labels = torch.arange(300) // 100
    feats = centres[labels] + torch.randn(300, 16, generator=g)
    feats[:group] = centres[1] + 0.4 * torch.randn(group, 16, generator=g)
    feats[250] = centres[1] + torch.randn(16, generator=g)
    return feats, labels, torch.arange(group)


def _model_and_data(feats: torch.Tensor, labels: torch.Tensor,
                    learned: torch.Tensor | None = None) -> tuple[Classifier, TensorDataset]:
    """A model whose features are its inputs, ``feats`` and one more feature, 1 for the
    ``learned`` rows and 0 elsewhere, and whose head reads the blobs of
    :func:`_classes_with_a_planted_group` and that feature as class 0: it takes the planted
    group for class 1 unless it has learned them; and those inputs with ``labels``."""
    model = Classifier(nn.Identity(), 17, 3, mean=[0.0] * 17, std=[1.0] * 17)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.eye(3, 17))
        model.classifier.weight[0, 16] = 10.0
        model.classifier.bias.zero_()
    extra = torch.zeros(len(feats), 1)
    if learned is not None:
        extra[learned] = 1.0
    return model, TensorDataset(torch.cat([feats, extra], 1)[:, :, None, None], labels)


def _round(defense: ForeignGroups, feats: torch.Tensor, labels: torch.Tensor,
           learned: torch.Tensor | None = None, epoch: int = 0) -> GroupRound:
    """One round of ``defense`` (:func:`_model_and_data`); its record."""
    defense.update(*_model_and_data(feats, labels, learned), epoch)
    record = defense.history[-1]
    assert isinstance(record, GroupRound)
    return record


def test_unlikeness_sees_a_group_that_vouches_for_itself() -> None:
    feats, labels, group = _classes_with_a_planted_group()
    foreign, outlying = unlikeness(feats, labels, block=64)
    assert (foreign[group] > 0).all() and foreign[250] > 0
    assert (foreign[100:250] < 0).all() and (foreign[30:100] < 0).all()
    assert outlying[group].min() > outlying[30:100].max()  # far from class 0's bulk too
    # Deep k-NN with a small k lets the group's members vote for each other
    assert not deep_knn_outliers(feats, labels, k=5)[group].any()


def test_a_group_in_a_mode_of_its_own_is_outlying_not_foreign_and_dropped() -> None:
    """A trigger the model has learned as the target class puts the poisons in a mode of
    their own, near no other class: only the second score sees them."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(300) // 100
    feats = torch.eye(3, 16)[labels] * 6 + 0.5 * torch.randn(300, 16, generator=g)
    feats[:20] = torch.eye(16)[0] * 6 + torch.eye(16)[5] * 6 + 0.3 * torch.randn(
        20, 16, generator=g)
    foreign, outlying = unlikeness(feats, labels)
    assert (foreign[:20] < 0).all()
    assert robust_z(outlying)[:20].min() > 2.5 > robust_z(outlying)[20:100].median()
    defense = ForeignGroups(warmup=0, every=1, num_examples=300)
    for epoch in range(2):
        record = _round(defense, feats, labels, epoch=epoch)
    assert record.dropped.tolist() == list(range(20))
    assert record.groups[0]["learned"] == 1.0  # the head reads them as their label


def test_unlikeness_on_a_sample_of_each_class_agrees_in_sign() -> None:
    feats, labels, _ = _classes_with_a_planted_group()
    full, _ = unlikeness(feats, labels, reference=None)
    sampled, _ = unlikeness(feats, labels, reference=40,
                            generator=torch.Generator().manual_seed(1))
    assert torch.equal(full > 0, sampled > 0)


def test_a_lone_candidate_is_spared_and_a_group_of_candidates_is_cohesive() -> None:
    feats, labels, group = _classes_with_a_planted_group()
    foreign, _ = unlikeness(feats, labels)
    links = neighbour_links(feats, labels, 10)
    ids, cohesion = cohesive_groups(foreign > 0, links)
    assert set(ids[group].tolist()) == {0} and (ids[30:] == -1).all()  # 250 is alone
    assert cohesion.tolist() == [1.0]  # every member's 10 nearest class-mates are members
    # a candidate set that cuts through a class: the pieces' neighbours lie outside them
    ids, cohesion = cohesive_groups(feats[:, 3] > 0.5, links)
    assert (cohesion < 0.75).all()


def test_connected_joins_rows_linked_either_way() -> None:
    flagged = torch.tensor([True, True, False, True, True])
    links = torch.tensor([[1], [-1], [0], [-1], [3]])  # 0-1 linked, 4-3 linked, 2 not flagged
    assert connected(flagged, links).tolist() == [0, 0, -1, 1, 1]


def test_the_defense_scores_first_drops_later_and_resumes_to_the_same_drops() -> None:
    feats, labels, group = _classes_with_a_planted_group()
    defense = ForeignGroups(warmup=0, every=1, num_examples=300)
    first = _round(defense, feats, labels, learned=group)
    assert len(first.dropped) == 0  # one round's scores alone drop nothing (min_rounds=2)
    resumed = ForeignGroups(warmup=0, every=1, num_examples=300)
    resumed.load_state_dict(copy.deepcopy(defense.state_dict()))  # as saved and loaded
    second = _round(defense, feats, labels, learned=group, epoch=1)
    again = _round(resumed, feats, labels, learned=group, epoch=1)
    assert torch.equal(second.dropped, again.dropped)
    assert second.dropped.tolist() == group.tolist()
    found = second.groups[0]  # the most cohesive first
    assert (found["label"], found["nearest"], found["size"], found["learned"],
            found["dropped"]) == (0, 1, len(group), 1.0, True)
    assert found["members"] == group.tolist() and found["cohesion"] == 1.0
    assert all(not g["dropped"] for g in second.groups[1:])


def test_a_large_loose_group_the_model_has_not_learned_is_spared_a_small_one_is_not() -> None:
    """A group of more than ``unlearned`` of its class is dropped only once the model
    predicts its label for most of its members, or if it is ``tight``; a smaller one is
    dropped learned or not. The planted group is 0.9 cohesive: loose where the bar for tight
    is off, tight where it is 0.85."""
    for size, learned, tight, dropped in ((30, False, 0.85, True), (30, False, None, False),
                                          (30, True, None, True), (10, False, None, True)):
        feats, labels, group = _classes_with_a_planted_group(size)
        defense = ForeignGroups(tight=tight, warmup=0, every=1, num_examples=300)
        for epoch in range(2):
            record = _round(defense, feats, labels, group if learned else None, epoch)
        found = record.groups[0]
        assert (found["members"], found["learned"]) == (group.tolist(), float(learned))
        assert found["cohesion"] >= 0.85 and found["dropped"] == dropped
        assert record.dropped.tolist() == (group.tolist() if dropped else [])
    # at any size when unlearned=1
    defense = ForeignGroups(unlearned=1.0, warmup=0, every=1, num_examples=300)
    for epoch in range(2):
        record = _round(defense, feats, labels, epoch=epoch)
    assert record.dropped.tolist() == group.tolist()


def test_learning_is_per_group_within_its_class() -> None:
    ids = torch.tensor([0, 0, -1, 1, 1, 1, -1, -1])
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    learned = torch.tensor([True, False, True, True, True, True, False, False])
    share, of_class = learning(ids, labels, learned)
    assert share.tolist() == [0.5, 1.0]
    assert torch.allclose(of_class, torch.tensor([2 / 3, 3 / 5]))


def test_built_by_name_on_epic_0_1s_schedule() -> None:
    defense = build_defense("foreign-groups", RunFacts(num_examples=10, epochs=40,
                                                       milestones=(25, 35)), cohesion=0.9,
                            unlearned=0.2, tight=0.95)
    assert isinstance(defense, ForeignGroups)
    assert (defense.cohesion, defense.unlearned, defense.tight) == (0.9, 0.2, 0.95)
    assert defense.recorded_settings()["unlearned"] == 0.2
    assert defense.recorded_settings()["tight"] == 0.95
    assert [e for e in range(40) if defense.due(e)] == list(range(10, 35, 2))


def test_with_isolated_it_also_drops_what_epic_drops_and_ranks_both() -> None:
    """groups-epic: the cohesive (learned) group as before, and exactly EPIC's isolated
    medoids of the same examples' last-layer gradients, each listed with its score for
    review."""
    feats, labels, group = _classes_with_a_planted_group()
    model, data = _model_and_data(feats, labels, learned=group)
    defense = build_defense("groups-epic-0.1", RunFacts(num_examples=300, epochs=4),
                            warmup=0, every=1)
    assert isinstance(defense, ForeignGroups) and defense.isolated == 0.1
    defense.update(model, data, 0)
    first = defense.history[-1]
    epic = EPIC(0.1, warmup=0, every=1, num_examples=300)
    epic.update(model, data, 0)
    # the first round scores only: what it drops is what EPIC drops
    assert torch.equal(first.dropped, epic.dropped)
    assert 250 in first.dropped.tolist()  # alone in its class's gradients
    assert sorted(e["index"] for e in first.isolated) == first.dropped.tolist()
    scores = [e["score"] for e in first.isolated]
    assert scores == sorted(scores, reverse=True)
    loner = next(e for e in first.isolated if e["index"] == 250)
    assert (loner["label"], loner["nearest"]) == (2, 1)
    defense.update(model, data, 1)
    second = defense.history[-1]
    assert set(group.tolist()) <= set(second.dropped.tolist())
    assert second.poison_summary(group)["poisons_dropped"] == len(group)
    assert second.poison_summary(torch.tensor([250]))["isolated_poisons"] == 0  # gone already
