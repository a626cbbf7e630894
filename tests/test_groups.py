"""The foreign-groups detector: groups of examples nearer another class than their own."""

from __future__ import annotations

import torch

from epic.defenses import (
    ForeignGroups,
    RunFacts,
    build_defense,
    cohesive_candidates,
    deep_knn_outliers,
    feature_groups,
    foreignness,
)


def _classes_with_a_planted_group(group: int = 30, seed: int = 0
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three classes of 100 in separate blobs; the first ``group`` examples of class 0 sit
    tightly together inside class 1's blob (poisons of one source, relabelled), plus one
    lone class-2 example inside class 1 (a hard clean example). Returns features, labels and
    the indices of the group."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(3, 16) * 6
    labels = torch.arange(300) // 100
    feats = centres[labels] + torch.randn(300, 16, generator=g)
    feats[:group] = centres[1] + 0.4 * torch.randn(group, 16, generator=g)
    feats[250] = centres[1] + torch.randn(16, generator=g)
    return feats, labels, torch.arange(group)


def test_foreignness_sees_a_group_that_vouches_for_itself() -> None:
    feats, labels, group = _classes_with_a_planted_group()
    score = foreignness(feats, labels, block=64)
    assert (score[group] > 0).all() and score[250] > 0
    assert (score[100:250] < 0).all() and (score[30:100] < 0).all()
    # Deep k-NN with a small k lets the group's members vote for each other
    assert not deep_knn_outliers(feats, labels, k=5)[group].any()


def test_foreignness_on_a_sample_of_each_class_agrees_in_sign() -> None:
    feats, labels, _ = _classes_with_a_planted_group()
    full = foreignness(feats, labels, reference=None)
    sampled = foreignness(feats, labels, reference=40,
                          generator=torch.Generator().manual_seed(1))
    assert torch.equal(full > 0, sampled > 0)


def test_a_lone_candidate_is_spared_and_a_group_of_candidates_flagged() -> None:
    feats, labels, group = _classes_with_a_planted_group()
    candidates = foreignness(feats, labels) > 0
    flagged, links = cohesive_candidates(feats, labels, candidates, neighbours=5)
    assert flagged[group].all() and not flagged[250]  # the lone hard example stays
    assert int(flagged.sum()) == len(group)
    ids = feature_groups(flagged, links)
    assert set(ids[group].tolist()) == {0} and (ids[30:] == -1).all()


def test_feature_groups_joins_rows_linked_either_way() -> None:
    flagged = torch.tensor([True, True, False, True, True])
    links = torch.tensor([[1], [-1], [0], [-1], [3]])  # 0-1 linked, 4-3 linked, 2 not flagged
    assert feature_groups(flagged, links).tolist() == [0, 0, -1, 1, 1]


def test_the_defense_scores_first_drops_later_and_resumes_to_the_same_drops() -> None:
    feats, labels, group = _classes_with_a_planted_group()
    keep = torch.ones(300, dtype=torch.bool)
    defense = ForeignGroups(warmup=0, every=1, threshold=3.0, num_examples=300)
    first, _ = defense.drop_rows(feats, labels, keep)
    assert not first.any()  # one round's scores alone drop nothing (min_rounds=2)
    resumed = ForeignGroups(warmup=0, every=1, threshold=3.0, num_examples=300)
    resumed.load_state_dict(defense.state_dict())
    dropped, extra = defense.drop_rows(feats, labels, keep)
    again, _ = resumed.drop_rows(feats, labels, keep)
    assert torch.equal(dropped, again)
    assert dropped[group].all() and int(dropped.sum()) == len(group)
    (found,) = extra["groups"]
    assert (found["label"], found["nearest"], found["size"]) == (0, 1, len(group))
    assert found["members"] == group.tolist() and found["foreignness"] > 0


def test_built_by_name_on_epic_0_1s_schedule() -> None:
    defense = build_defense("foreign-groups", RunFacts(num_examples=10, epochs=40,
                                                       milestones=(25, 35)), threshold=2.5)
    assert isinstance(defense, ForeignGroups) and defense.threshold == 2.5
    assert [e for e in range(40) if defense.due(e)] == list(range(10, 35, 2))
