from __future__ import annotations

import pytest
import torch

from epic.defenses import (
    ActivationClustering,
    AdversarialPoisoning,
    ClipNoise,
    DeepKNN,
    ForeignGroups,
    HighestLoss,
    LowestConfidence,
    RandomDrop,
    SpectralSignatures,
    activation_clusters,
    deep_knn_outliers,
    high_loss,
    low_confidence,
    spectral_signature_outliers,
)
from epic.training import TrainConfig, train

from .conftest import seeded_convnet


def _two_blobs(n: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    feats = torch.randn(n, 8, generator=g) * 0.3 + labels[:, None] * 4.0
    return feats, labels


def test_deep_knn_flags_a_point_sitting_in_the_other_class() -> None:
    feats, labels = _two_blobs()
    feats[0] = feats[1]  # example 0 (label 0) now sits among the label-1 examples
    drop = deep_knn_outliers(feats, labels, k=9, block=16)
    assert drop.tolist() == [True] + [False] * 99


def test_spectral_signatures_find_a_shifted_subpopulation() -> None:
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(200, 16, generator=g)
    labels = torch.zeros(200, dtype=torch.long)
    feats[:10] += 6 * torch.nn.functional.normalize(torch.ones(16), dim=0)
    drop = spectral_signature_outliers(feats, labels, per_class=15)
    assert drop[:10].all() and int(drop.sum()) == 15


def test_activation_clustering_splits_off_the_small_cluster_only() -> None:
    g = torch.Generator().manual_seed(2)
    clean = torch.randn(180, 12, generator=g)
    poison = torch.randn(20, 12, generator=g) + 8
    feats = torch.cat([clean, poison, torch.randn(200, 12, generator=g)])
    labels = torch.cat([torch.zeros(200), torch.ones(200)]).long()
    drop = activation_clusters(feats, labels, components=5)
    assert drop[180:200].all() and not drop[:180].any()
    assert not drop[200:].any()  # a unimodal class splits roughly in half: nothing dropped


def test_activation_clustering_names_the_classes_its_analysis_left_unconverged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    import warnings

    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(200, 32, generator=g), torch.arange(200) % 2  # no structure
    with warnings.catch_warnings(record=True) as shown, caplog.at_level("INFO"):
        warnings.simplefilter("always")
        activation_clusters(feats, labels)
    assert not [w for w in shown if "converge" in str(w.message)]
    [line] = [r.getMessage() for r in caplog.records if "did not converge" in r.getMessage()]
    assert "class(es) [0, 1]" in line


def test_confidence_and_loss_rules_match_their_definitions() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [-1.0, 3.0]])
    zeros, ones = torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long)
    # softmax of class 0: 0.88, 0.5 and 0.018 (class 1: the rest); the losses: -log of those
    assert low_confidence(logits, zeros, 0.5).tolist() == [False, False, True]  # 0.5 is not < 0.5
    assert low_confidence(logits, ones, 0.5).tolist() == [True, False, False]
    assert low_confidence(logits, zeros, 0.9).tolist() == [True, True, True]
    assert high_loss(logits, zeros, 1.0).tolist() == [False, False, True]  # 0.13, 0.69, 4.0
    assert high_loss(logits, ones, 1.0).tolist() == [True, False, False]  # 2.1, 0.69, 0.018
    assert high_loss(logits, zeros, 0.1).tolist() == [True, True, True]


def test_random_drop_is_seeded_and_sized(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train_data, _ = tiny_data
    runs = []
    for _ in range(2):
        d = RandomDrop(drop_fraction=0.1, warmup=0, generator=torch.Generator().manual_seed(4))
        runs.append(d.update(torch.nn.Linear(1, 1), train_data, 0).dropped)
    assert torch.equal(runs[0], runs[1]) and len(runs[0]) == 6


def test_filter_baselines_run_once_by_default() -> None:
    for d in (DeepKNN(), SpectralSignatures(), ActivationClustering()):
        assert [e for e in range(40) if d.due(e)] == [10]


@pytest.mark.parametrize("make", [
    lambda n: DeepKNN(k=5, warmup=1, until=2, num_examples=n),
    lambda n: SpectralSignatures(budget=0.05, warmup=1, until=2, num_examples=n),
    lambda n: ActivationClustering(components=3, warmup=1, until=2, num_examples=n),
    # thresholds that some examples still miss after one epoch (at 0.5 and 1.0, none does)
    lambda n: LowestConfidence(threshold=0.8, warmup=1, every=1, num_examples=n),
    lambda n: HighestLoss(threshold=0.2, warmup=1, every=1, num_examples=n),
    lambda n: ForeignGroups(threshold=1.0, warmup=1, every=1, num_examples=n),
])
def test_every_baseline_plugs_into_the_trainer(make, tiny_data) -> None:  # type: ignore[no-untyped-def]
    train_data, test_data = tiny_data
    model = seeded_convnet(train_data)
    defense = make(len(train_data))
    result = train(model, train_data, test_data, TrainConfig(epochs=3, batch_size=16),
                   defense=defense)
    # the filters run once, before epoch 1; the logit rules before every epoch from 1 on
    assert [r.epoch for r in defense.history] == ([1] if defense.until == 2 else [1, 2])
    dropped = 0
    for epoch, m in enumerate(result.metrics):  # each epoch trains on what is left by then
        dropped += sum(len(r.dropped) for r in defense.history if r.epoch == epoch)
        assert m["trained_on"] == len(train_data) - dropped, epoch
    assert result.summary["examples_dropped"] == dropped == int((~defense.keep_mask).sum())


def test_clip_noise_bounds_the_batch_step_and_its_noise_is_seeded(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train_data, test_data = tiny_data

    def run(defense):  # type: ignore[no-untyped-def]
        model = seeded_convnet(train_data)
        before = [p.detach().clone() for p in model.parameters()]
        result = train(model, train_data, test_data,
                       TrainConfig(epochs=1, batch_size=60, lr=1.0, momentum=0.0, nesterov=False,
                                   weight_decay=0.0, augment=False), defense=defense)
        step = torch.cat([(p.detach() - b).flatten()
                          for p, b in zip(model.parameters(), before, strict=True)])
        return result, step

    plain, unclipped = run(None)
    clipped = run(ClipNoise(clip=1e-3, noise=0.0))[1]
    # one batch, lr 1: the step is the clipped batch gradient, in the unclipped one's direction
    assert unclipped.norm() > 1e-2 and clipped.norm() == pytest.approx(1e-3, rel=1e-3)
    assert torch.nn.functional.cosine_similarity(clipped, unclipped, dim=0) > 0.999
    noisy = run(ClipNoise(clip=1e-3, noise=0.5, seed=1))[1]
    assert torch.equal(noisy, run(ClipNoise(clip=1e-3, noise=0.5, seed=1))[1])
    assert not torch.equal(noisy, run(ClipNoise(clip=1e-3, noise=0.5, seed=2))[1])
    assert (noisy - clipped).std() == pytest.approx(0.5e-3, rel=0.1)
    with pytest.raises(ValueError, match="clip"):
        ClipNoise(clip=0.0)


def test_adversarial_poisoning_perturbs_only_its_share_within_eps(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train_data, _ = tiny_data
    model = seeded_convnet(train_data).train()
    x = train_data.images[:16].float() / 255
    y = train_data.labels[:16]
    ap = AdversarialPoisoning(share=0.25, eps=8 / 255, steps=3, targets=2)
    px, py = ap(model, x, y)
    assert torch.equal(py, y) and model.training
    assert torch.equal(px[4:], x[4:])
    change = (px[:4] - x[:4]).abs()
    assert change.max() <= 8 / 255 + 1e-6 and change.max() > 0
    with pytest.raises(ValueError, match="share"):
        AdversarialPoisoning(share=1.0)


def test_adversarial_poisoning_plugs_into_training(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train_data, test_data = tiny_data
    model = seeded_convnet(train_data)
    calls = []

    class Counting(AdversarialPoisoning):
        def on_batch(self, m, x, y):  # type: ignore[no-untyped-def]
            calls.append(len(x))
            return super().on_batch(m, x, y)

    result = train(model, train_data, test_data, TrainConfig(epochs=1, batch_size=16),
                   defense=Counting(share=0.5, steps=1))
    assert sum(calls) == len(train_data) and result.metrics[0]["trained_on"] == len(train_data)
