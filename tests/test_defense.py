from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from epic.data import ImageData
from epic.defenses import EPIC, EpicSettings, find_poisons, paper_warmup
from epic.gradients import feature_embeddings, gradient_embeddings, logit_embeddings
from epic.models import build_model
from epic.selection import find_isolated
from epic.training.records import describe

from .conftest import seeded_convnet


def test_gradient_embedding_is_softmax_minus_onehot(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train, _ = tiny_data
    model = seeded_convnet(train).train()
    grads, labels = gradient_embeddings(model, train, batch_size=16)
    assert model.training  # mode restored
    model.eval()
    x = train.images.float() / 255
    x.requires_grad_(False)
    logits = model(x).detach().requires_grad_(True)
    nn.functional.cross_entropy(logits, train.labels, reduction="sum").backward()
    assert torch.allclose(grads, logits.grad, atol=1e-6)
    assert torch.equal(labels, train.labels)
    assert torch.allclose(grads.sum(1), torch.zeros(len(train)), atol=1e-6)


def test_gradient_embedding_of_kept_examples_only(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train, _ = tiny_data
    model = build_model("convnet", num_classes=3, in_channels=3, mean=train.mean, std=train.std)
    keep = torch.arange(len(train)) % 4 != 0
    grads, labels = gradient_embeddings(model, train, keep=keep)
    full, _ = gradient_embeddings(model, train)
    assert torch.allclose(grads, full[keep], atol=1e-6)
    assert torch.equal(labels, train.labels[keep])


def test_embeddings_from_precomputed_features_match_the_forward_pass(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train, _ = tiny_data
    model = seeded_convnet(train)
    model.train()
    feats, _ = feature_embeddings(model, train)
    keep = torch.arange(len(train)) % 3 != 0
    for embed in (gradient_embeddings, logit_embeddings, feature_embeddings):
        direct, labels = embed(model, train, keep=keep)
        cached, cached_labels = embed(model, train, keep=keep, features=feats)
        torch.testing.assert_close(cached, direct)
        assert torch.equal(cached_labels, labels)
    assert model.training
    # the features must cover the data, row for row
    with pytest.raises(ValueError, match="features cover 59 examples, data has 60"):
        gradient_embeddings(model, train, features=feats[:-1])


def test_schedule_follows_warmup_every_until() -> None:
    d = EPIC(0.1, warmup=10, every=2, until=25)
    assert [e for e in range(40) if d.due(e)] == [10, 12, 14, 16, 18, 20, 22, 24]
    assert paper_warmup(0.1) == 10 and paper_warmup(0.2) == 20 and paper_warmup(0.3) == 30


class _Fixed(nn.Module):
    """Logits straight from the pixels: the gradient embeddings are ours to plant."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :3] * 20


def _planted_data() -> tuple[ImageData, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = 300
    labels = torch.arange(n) % 3
    pix = torch.zeros(n, 1, 2, 2)
    pix.view(n, 4)[torch.arange(n), labels] = 0.5 + 0.02 * torch.randn(n, generator=g)
    planted = torch.tensor([0, 1, 2, 3, 4, 5])
    # Planted examples get logits of a wrong class: their gradients sit far from their class.
    pix.view(n, 4)[planted] = 0
    # Two per class, pulled towards the two other classes: no two share a direction.
    wrong = (labels[planted] + torch.tensor([1, 1, 1, 2, 2, 2])) % 3
    pix.view(n, 4)[planted, wrong] = 0.9
    images = (pix * 255).round().to(torch.uint8)
    return ImageData.from_arrays(images, labels, ("a", "b", "c")), planted


def test_epic_drops_planted_isolated_examples_and_keeps_them_dropped() -> None:
    data, planted = _planted_data()
    d = EPIC(0.1, warmup=0, every=1, num_examples=len(data))
    assert d.keep_mask is not None and d.keep_mask.all()
    model = _Fixed()
    first = d.update(model, data, epoch=0)
    assert set(planted.tolist()) <= set(first.dropped.tolist())
    assert len(first.dropped) <= len(planted) + 6
    assert first.histogram(planted) == {1: len(planted)}
    assert sum(first.histogram().values()) == len(data)
    second = d.update(model, data, epoch=1)
    assert not set(second.dropped.tolist()) & set(first.dropped.tolist())
    assert (second.cluster_size_of[first.dropped] == 0).all()
    assert not d.keep_mask[first.dropped].any()
    assert d.dropped.tolist() == sorted(first.dropped.tolist() + second.dropped.tolist())


def test_state_dict_round_trip() -> None:
    data, _ = _planted_data()
    d = EPIC(0.1, warmup=0, every=1)
    d.update(_Fixed(), data, epoch=0)
    e = EPIC(0.1, warmup=0, every=1)
    e.load_state_dict(d.state_dict())
    assert torch.equal(e.keep_mask, d.keep_mask)  # type: ignore[arg-type]
    assert e.history[0].summary() == d.history[0].summary()


def test_a_checkpoint_with_the_former_field_name_still_loads() -> None:
    """Checkpoints written before ``EpicRound.cluster_sizes`` became ``cluster_size_of``."""
    data, planted = _planted_data()
    d = EPIC(0.1, warmup=0, every=1)
    d.update(_Fixed(), data, epoch=0)
    state = d.state_dict()
    state["history"] = [{("cluster_sizes" if k == "cluster_size_of" else k): v
                         for k, v in r.items()} for r in state["history"]]
    e = EPIC(0.1, warmup=0, every=1)
    e.load_state_dict(state)
    assert torch.equal(e.history[0].cluster_size_of, d.history[0].cluster_size_of)  # type: ignore[attr-defined]
    assert e.history[0].histogram(planted) == {1: len(planted)}  # type: ignore[attr-defined]


def test_find_poisons_flags_isolated_gradients_numpy_in_numpy_out() -> None:
    from epic.defenses import find_poisons

    g = torch.Generator().manual_seed(0)
    y = torch.arange(120) % 3
    logits = torch.randn(120, 3, generator=g) + 3 * torch.eye(3)[y]
    logits[[10, 50]] = torch.tensor([[0.0, 0.0, 8.0], [8.0, 0.0, 0.0]])  # far from their class
    probs = torch.softmax(logits, 1)
    flagged = find_poisons(y.numpy(), probs.numpy(), 0.1)
    assert isinstance(flagged, np.ndarray) and flagged.dtype == bool and flagged.shape == (120,)
    assert flagged[[10, 50]].all() and flagged.sum() < 12
    # torch in gives torch out, the same flags; and they are what an EPIC round drops
    from_torch = find_poisons(y, probs, 0.1)
    assert isinstance(from_torch, torch.Tensor)
    assert torch.equal(from_torch, torch.from_numpy(flagged))
    round_ = EPIC(0.1, warmup=0, every=1).update_from_embeddings(probs - torch.eye(3)[y], y, 0)
    assert round_.dropped.tolist() == np.flatnonzero(flagged).tolist()
    with pytest.raises(ValueError, match="sum to 1"):
        find_poisons(y, logits, 0.1)
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.2"):
        find_poisons(y + 1, probs, 0.1)
    with pytest.raises(ValueError, match="integers"):
        find_poisons(y.float(), probs, 0.1)


def test_update_from_embeddings_drops_what_update_drops(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train, _ = tiny_data
    model = seeded_convnet(train)
    by_model = EPIC(fraction=0.3, warmup=0, every=1, num_examples=len(train))
    by_loop = EPIC(fraction=0.3, warmup=0, every=1, num_examples=len(train))
    for epoch in range(2):
        expected = by_model.update(model, train, epoch)
        grads, labels = gradient_embeddings(model, train)  # the whole set, as a loop has it
        got = by_loop.update_from_embeddings(grads, labels, epoch)
        assert torch.equal(got.dropped, expected.dropped)
        assert torch.equal(got.cluster_size_of, expected.cluster_size_of)  # type: ignore[attr-defined]
    assert by_model.keep_mask is not None and by_loop.keep_mask is not None
    assert torch.equal(by_model.keep_mask, by_loop.keep_mask)
    with pytest.raises(ValueError, match="need embeddings"):
        by_loop.update_from_embeddings(grads, labels[:-1], 2)


def test_a_round_records_its_embedding_time_apart(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train, _ = tiny_data
    model = seeded_convnet(train)
    defense = EPIC(0.5, warmup=0, every=1)
    r = defense.update(model, train, 0)
    assert 0 < r.embed_seconds < r.seconds
    assert r.summary()["embed_seconds"] == round(r.embed_seconds, 4)
    grads, labels = gradient_embeddings(model, train)
    assert defense.update_from_embeddings(grads, labels, 1).embed_seconds == 0.0
    resumed = EPIC(0.5, warmup=0, every=1)
    resumed.load_state_dict(defense.state_dict())
    assert resumed.history[0].embed_seconds == r.embed_seconds


def test_cluster_all_clusters_the_dropped_too_and_drops_only_kept_ones() -> None:
    """``cluster="all"`` (the authors' code): every round clusters every example, those
    dropped before included, and newly drops the isolated medoids among the kept."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    x = torch.randn(200, 4, generator=g) * 0.05 + y[:, None].float()
    far = torch.tensor([3, 8, 50, 51])
    x[far] += torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0], [0, 0, 0, 4.0]])
    kept_only = EPIC(0.1, warmup=0, every=1)
    everything = EPIC(0.1, warmup=0, every=1, cluster="all")
    for d in (kept_only, everything):
        first = d.update_from_embeddings(x, y, epoch=0)
        assert set(far.tolist()) <= set(first.dropped.tolist())
    assert torch.equal(kept_only.keep_mask, everything.keep_mask)  # the same first round
    before = everything.keep_mask.clone()
    x2 = x + 0.01 * torch.randn(x.shape, generator=g)
    second = everything.update_from_embeddings(x2, y, epoch=1)
    assert bool((second.cluster_size_of[~before] > 0).all())  # the dropped were clustered
    want = find_isolated(x2, y, 0.1) & before  # isolated among all, newly dropped if kept
    assert second.dropped.tolist() == want.nonzero().squeeze(1).tolist()
    assert not bool(everything.keep_mask[~before].any())
    assert bool((kept_only.update_from_embeddings(x2, y, epoch=1).cluster_size_of[~before]
                 == 0).all())
    with pytest.raises(ValueError, match="cluster must be one of"):
        EPIC(0.1, cluster="some")  # type: ignore[arg-type]


def test_epics_settings_are_one_checked_object_everywhere() -> None:
    with pytest.raises(ValueError, match="fraction must be"):
        EpicSettings(fraction=0)
    with pytest.raises(ValueError, match="method must be one of"):
        EpicSettings(method="fastest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_cluster_size must be >= 1"):
        EPIC(0.1, max_cluster_size=0)
    settings = EpicSettings(fraction=0.2, similarity="cosine", cluster="all")
    defense = EPIC.from_settings(settings, warmup=3, every=1)
    assert defense.settings == settings and (defense.fraction, defense.warmup) == (0.2, 3)
    assert EPIC(0.2, similarity="cosine", cluster="all").settings == settings
    # what a run records: the settings and the schedule, not the running state
    assert describe(defense) == {"name": "EPIC", "warmup": 3, "every": 1, "until": None,
                                 "batch_size": None} | dataclasses.asdict(settings)
    # find_poisons takes every setting (per_class and method too), checked before any work
    y = np.arange(60) % 3
    probs = np.full((60, 3), 0.1)
    probs[np.arange(60), y] = 0.8
    assert find_poisons(y, probs, 0.1, per_class="equal", method="naive").shape == (60,)
    with pytest.raises(ValueError, match="per_class must be one of"):
        find_poisons(y, probs, 0.1, per_class="most")
