from __future__ import annotations

import argparse
import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

from epic.data import ImageData
from epic.defenses import EPIC, Defense, RandomDrop
from epic.gradients import feature_embeddings
from epic.poisons import PoisonSet
from epic.training import (
    TrainConfig,
    config_record,
    default_milestones,
    evaluate,
    prepare_model,
    train,
)

from .conftest import check_epic_round, seeded_convnet


class _OnBatch(Defense):
    """A defense that only calls ``fn(model, x, y)`` on every training batch."""

    def __init__(self, fn) -> None:  # type: ignore[no-untyped-def]
        self.fn = fn

    def on_batch(self, model, x, y):  # type: ignore[no-untyped-def]
        return self.fn(model, x, y)


def test_milestones_match_the_paper() -> None:
    assert default_milestones(40) == (25, 35)
    assert default_milestones(200) == (100, 150)


def test_training_learns_the_tiny_task(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train_data, test_data = tiny_data
    result = train(seeded_convnet(train_data), train_data, test_data,
                   TrainConfig(epochs=6, lr=0.05, batch_size=16))
    assert result.summary["test_acc"] >= 0.9
    assert result.metrics[0]["train_loss"] > result.metrics[-1]["train_loss"]


class _Crash(RuntimeError):
    pass


def test_resume_after_a_crash_gives_the_uninterrupted_result(tiny_data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    train_data, test_data = tiny_data
    cfg = TrainConfig(epochs=5, lr=0.05, batch_size=16, milestones=(3,), seed=3)

    def defense():  # type: ignore[no-untyped-def]
        return EPIC(0.3, warmup=1, every=1, num_examples=len(train_data))

    full = train(seeded_convnet(train_data), train_data, test_data, cfg, defense=defense(),
                 out=tmp_path / "full")

    def crash(epoch, _):  # type: ignore[no-untyped-def]
        if epoch == 2:
            raise _Crash

    with pytest.raises(_Crash):
        train(seeded_convnet(train_data), train_data, test_data, cfg, defense=defense(),
              out=tmp_path / "cut", on_epoch_end=crash)
    resumed_defense = defense()
    resumed = train(seeded_convnet(train_data, seed=99), train_data, test_data, cfg,
                    defense=resumed_defense, out=tmp_path / "cut", resume=True)
    strip = [{k: v for k, v in m.items() if k not in ("seconds", "defense_seconds")}
             for m in full.metrics]
    assert [{k: v for k, v in m.items() if k not in ("seconds", "defense_seconds")}
            for m in resumed.metrics] == strip
    assert resumed.summary["examples_dropped"] == full.summary["examples_dropped"]
    assert len(resumed_defense.history) == 4
    saved = json.loads((tmp_path / "cut" / "defense.json").read_text())
    assert [r["epoch"] for r in saved] == [1, 2, 3, 4]


def test_one_cycle_schedule_moves_every_batch_and_resumes_exactly(tiny_data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    train_data, test_data = tiny_data
    cfg = TrainConfig(epochs=4, lr=0.1, batch_size=16, schedule="onecycle", seed=1,
                      label_smoothing=0.2, crop_padding=2)
    full = train(seeded_convnet(train_data), train_data, test_data, cfg, out=tmp_path / "full")
    lrs = [m["lr"] for m in full.metrics]  # the rate each epoch starts at
    assert lrs[0] == pytest.approx(0.1 / 25)  # warming up from lr / 25 ...
    assert lrs[1] > lrs[0] and lrs[2] > lrs[3]  # ... to lr at 30% of the 16 steps, then down

    def crash(epoch, _):  # type: ignore[no-untyped-def]
        if epoch == 1:
            raise _Crash

    with pytest.raises(_Crash):
        train(seeded_convnet(train_data), train_data, test_data, cfg, out=tmp_path / "cut",
              on_epoch_end=crash)
    resumed = train(seeded_convnet(train_data, seed=5), train_data, test_data, cfg,
                    out=tmp_path / "cut", resume=True)
    strip = [{k: v for k, v in m.items() if k != "seconds"} for m in full.metrics]
    assert [{k: v for k, v in m.items() if k != "seconds"} for m in resumed.metrics] == strip
    stored = json.loads((tmp_path / "full" / "config.json").read_text())["config"]
    assert (stored["schedule"], stored["label_smoothing"], stored["crop_padding"]) == (
        "onecycle", 0.2, 2)


def test_label_smoothing_is_the_training_loss(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train_data, test_data = tiny_data
    x = train_data.images.float() / 255
    for smoothing in (0.0, 0.5):
        # one batch of every example: the epoch's loss is the loss of the initial weights
        cfg = TrainConfig(epochs=1, batch_size=60, label_smoothing=smoothing, augment=False)
        with torch.no_grad():
            expected = float(torch.nn.functional.cross_entropy(
                seeded_convnet(train_data).train()(x), train_data.labels,
                label_smoothing=smoothing))
        result = train(seeded_convnet(train_data), train_data, test_data, cfg)
        assert result.metrics[0]["train_loss"] == pytest.approx(expected, rel=1e-5)


def _linear(weight: list[list[float]]) -> nn.Module:
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
    return nn.Sequential(nn.Flatten(), layer)


def test_test_flips_average_each_image_with_its_mirror() -> None:
    # one 1 x 2 image per example; the model's logits are (left, 2 x right)
    pixels = torch.tensor([[[200, 10]], [[10, 200]], [[90, 100]], [[100, 95]]],
                          dtype=torch.uint8)[:, None]
    data = ImageData.from_arrays(pixels, torch.tensor([0, 1, 0, 1]), ("left", "right"))
    model = _linear([[1.0, 0.0], [0.0, 2.0]])
    # plain: 200 vs 20, 10 vs 400, 90 vs 200, 100 vs 190: classes 0, 1, 1, 1
    assert evaluate(model, data) == 0.75
    # with the mirror image, (l + r) / 2 against l + r: class 1 for all
    assert evaluate(model, data, flips=True) == 0.5
    assert evaluate(_linear([[1.0, 0.0], [0.0, 1.0]]), data, flips=True) == 0.5  # ties: 0


def test_precomputed_features_give_the_same_transfer_run(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train_data, test_data = tiny_data
    config = TrainConfig(epochs=2, scenario="transfer", batch_size=16, augment=False)
    given, computed = seeded_convnet(train_data), seeded_convnet(train_data)
    features = feature_embeddings(given, train_data)[0]
    torch.manual_seed(0)
    train(given, train_data, test_data, config, features=features)
    torch.manual_seed(0)
    train(computed, train_data, test_data, config)
    for name, value in given.classifier.state_dict().items():
        assert torch.equal(value, computed.classifier.state_dict()[name])
    with pytest.raises(ValueError, match="without augmentation"):
        train(given, train_data, test_data, dataclasses.replace(config, augment=True),
              features=features)
    with pytest.raises(ValueError, match="one row per training example"):
        train(given, train_data, test_data, config, features=features[1:])


def test_transfer_trains_only_the_new_last_layer(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train_data, test_data = tiny_data
    model = seeded_convnet(train_data)
    body = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classif")}
    heads: list[torch.Tensor] = []
    result = train(model, train_data, test_data, TrainConfig(epochs=2, scenario="transfer",
                                                             batch_size=16),
                   on_epoch_end=lambda epoch, _: heads.append(model.classifier.weight.clone()))
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in body.items())  # BN statistics included
    assert not torch.equal(heads[0], heads[1])  # while the new head learns
    # the per-epoch accuracy, read off the test features computed once, is the model's
    assert result.metrics[-1]["test_acc"] == evaluate(model, test_data)


def test_transfer_without_augmentation_matches_per_batch_features(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train_data, test_data = tiny_data
    config = TrainConfig(epochs=3, scenario="transfer", batch_size=16, augment=False)
    cached = seeded_convnet(train_data)
    per_batch = seeded_convnet(train_data)
    per_batch.load_state_dict(cached.state_dict())
    train(cached, train_data, test_data, config)
    # A defense that sees every batch forces the features to be recomputed for every batch.
    train(per_batch, train_data, test_data, config, defense=_OnBatch(lambda m, x, y: (x, y)))
    for name, value in cached.classifier.state_dict().items():
        torch.testing.assert_close(value, per_batch.classifier.state_dict()[name])


def test_the_seed_covers_the_new_last_layer(tiny_data) -> None:  # type: ignore[no-untyped-def]
    """The new head of transfer learning comes from the run's seed, whatever the state of
    torch's global RNG; ``head_rng="global"`` (how rows stored before it drew theirs) takes it
    from the global RNG."""
    train_data, test_data = tiny_data
    pretrained = seeded_convnet(train_data)

    def head(global_seed: int, **settings) -> torch.Tensor:  # type: ignore[no-untyped-def]
        torch.manual_seed(global_seed)
        config = TrainConfig(epochs=0, scenario="transfer", **settings)
        model = train(copy.deepcopy(pretrained), train_data, test_data, config).model
        return model.classifier.weight.detach().clone()

    assert torch.equal(head(0, seed=3), head(1, seed=3))
    assert not torch.equal(head(0, seed=3), head(0, seed=4))
    assert not torch.equal(head(0, head_rng="global"), head(1, head_rng="global"))
    assert torch.equal(head(5, head_rng="global"), head(5, head_rng="global"))


def test_building_a_model_leaves_the_global_rng_alone(tiny_data) -> None:  # type: ignore[no-untyped-def]
    from epic.cli.common import make_model

    args = argparse.Namespace(seed=7, model="convnet", pretrained=None, scenario="scratch",
                              arch_flag="--model")
    train_data, _ = tiny_data
    state = torch.random.get_rng_state()
    first = make_model(args, train_data, torch.device("cpu"))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first.classifier.weight,
                       make_model(args, train_data, torch.device("cpu")).classifier.weight)
    # where rows stored before TrainConfig.head_rng drew their head: seeded, past the model
    make_model(args, train_data, torch.device("cpu"), head_rng="global")
    after = torch.rand(3)
    seeded_convnet(train_data, 7)  # torch.manual_seed(7), then the model
    assert torch.equal(after, torch.rand(3))


def test_finetune_uses_small_lr_and_new_head(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train_data, _ = tiny_data
    model = seeded_convnet(train_data)
    head = model.classifier.weight.clone()
    params = prepare_model(model, "finetune")
    assert len(params) == len(list(model.parameters()))
    assert not torch.equal(head, model.classifier.weight)
    assert TrainConfig(scenario="finetune").resolved_lr == 1e-4


def test_poisons_are_applied_and_their_success_measured(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train_data, test_data = tiny_data
    idx = torch.arange(0, 60, 3)[:5]
    shifted = (train_data.images[idx].short() + 8).clamp(0, 255).to(torch.uint8)
    poisons = PoisonSet(idx, shifted, test_data.images[:2], target_class=0,
                        adversarial_class=1, eps=8 / 255)
    model = seeded_convnet(train_data)
    seen: list[torch.Tensor] = []

    def record(m, x, y):  # type: ignore[no-untyped-def]
        seen.append((x * 255).round().to(torch.uint8))
        return x, y

    result = train(model, train_data, test_data,
                   TrainConfig(epochs=2, batch_size=16, augment=False), poisons=poisons,
                   defense=_OnBatch(record))
    # the first epoch trained on every training image once, the poisons in their bases' place
    first_epoch = {tuple(x.flatten().tolist()) for x in torch.cat(seen)[:len(train_data)]}
    expected_set = train_data.images.clone()
    expected_set[idx] = shifted
    assert first_epoch == {tuple(x.flatten().tolist()) for x in expected_set}
    assert not first_epoch & {tuple(x.flatten().tolist()) for x in train_data.images[idx]}
    expected = float((model.eval()(test_data.images[:2].float() / 255).argmax(1) == 1)
                     .float().mean())
    assert result.summary["attack_success"] == pytest.approx(expected)
    assert result.summary["poisons"] == 5 and result.summary["poisons_dropped"] == 0


class _SwapsInTraining(nn.Module):
    """Logits: the two channels of a 1 x 1 image as they are, swapped in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(x.flatten(1))
        return logits.flip(1) if self.training else logits


def test_evaluate_is_the_share_of_correct_predictions_in_eval_mode() -> None:
    pixels = torch.tensor([[200, 10], [150, 40], [90, 30], [5, 250], [60, 61], [0, 9],
                           [100, 20], [20, 100]], dtype=torch.uint8)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0])  # the brighter channel, but the last two
    data = ImageData.from_arrays(pixels[:, :, None, None], labels, ("a", "b"))
    model = _SwapsInTraining().train()
    assert evaluate(model, data) == 0.75  # 6 of 8; 2 of 8 if it were left in training mode
    assert evaluate(model, data, batch_size=3) == 0.75  # batches of 3, 3 and 2
    assert model.training


def test_defense_records_say_how_poisons_fared(tiny_data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    train_data, test_data = tiny_data
    idx = torch.tensor([0, 4, 8])
    poisons = PoisonSet(idx, train_data.images[idx], test_data.images[:1], target_class=0,
                        adversarial_class=1, eps=8 / 255)
    defense = EPIC(0.5, warmup=1, every=1, num_examples=len(train_data))
    train(seeded_convnet(train_data), train_data, test_data, TrainConfig(epochs=3, batch_size=16),
          defense=defense, poisons=poisons, out=tmp_path)
    records = json.loads((tmp_path / "defense.json").read_text())
    assert [r["epoch"] for r in records] == [1, 2]
    for rec, rnd in zip(records, defense.history, strict=True):
        assert rec["poisons_dropped"] == len(set(rnd.dropped.tolist()) & {0, 4, 8})
        hist = {int(k): v for k, v in rec["poison_cluster_size_histogram"].items()}
        expected: dict[int, int] = {}
        for i in idx.tolist():  # poisons dropped in an earlier round are in no cluster (0)
            size = int(rnd.cluster_size_of[i])
            if size > 0:
                expected[size] = expected.get(size, 0) + 1
        assert hist == expected


def test_resume_refuses_a_checkpoint_of_other_settings(tiny_data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    train_data, test_data = tiny_data
    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=16, seed=3)
    train(seeded_convnet(train_data), train_data, test_data, cfg, out=tmp_path,
          defense=EPIC(0.3, warmup=1, every=1, num_examples=len(train_data)))
    with pytest.raises(ValueError, match=r"config.epochs: 2 there, 4 here"):
        train(seeded_convnet(train_data), train_data, test_data,
              TrainConfig(epochs=4, lr=0.05, batch_size=16, seed=3), out=tmp_path, resume=True,
              defense=EPIC(0.3, warmup=1, every=1, num_examples=len(train_data)))
    with pytest.raises(ValueError, match=r"defense.fraction: 0.3 there, 0.2 here"):
        train(seeded_convnet(train_data), train_data, test_data, cfg, out=tmp_path, resume=True,
              defense=EPIC(0.2, warmup=1, every=1, num_examples=len(train_data)))
    with pytest.raises(ValueError, match=r"defense: \{'name': 'EPIC'.* there, None here"):
        train(seeded_convnet(train_data), train_data, test_data, cfg, out=tmp_path, resume=True)


def test_resume_rewrites_the_rounds_a_crash_kept_from_disk(tiny_data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    train_data, test_data = tiny_data

    def run(epochs: int, resume: bool) -> None:
        train(seeded_convnet(train_data), train_data, test_data,
              TrainConfig(epochs=epochs, lr=0.05, batch_size=16, milestones=(9,), seed=3),
              out=tmp_path, resume=resume,
              defense=EPIC(0.3, warmup=1, every=1, num_examples=len(train_data)))

    run(2, False)
    (tmp_path / "defense.json").unlink()  # killed between the checkpoint and this write
    run(2, True)  # nothing left to train, yet the rounds are written back
    assert [r["epoch"] for r in json.loads((tmp_path / "defense.json").read_text())] == [1]


def test_rounds_from_the_training_pass_match_the_eval_pass_when_nothing_moves(tiny_data) -> None:  # type: ignore[no-untyped-def]
    """A frozen body on un-augmented images at lr 0: the training pass's logits are the eval
    pass's, so the rounds must drop exactly the same examples."""
    train_data, test_data = tiny_data
    histories = {}
    for mode in ("eval", "train-pass"):
        defense = EPIC(0.5, warmup=1, every=1, num_examples=len(train_data))
        cfg = TrainConfig(epochs=4, scenario="transfer", lr=0.0, batch_size=16, augment=False,
                          round_embeddings=mode)  # type: ignore[arg-type]
        train(seeded_convnet(train_data), train_data, test_data, cfg, defense=defense)
        histories[mode] = [r.dropped.tolist() for r in defense.history]
    assert len(histories["eval"]) == 3 and any(histories["eval"])
    assert histories["train-pass"] == histories["eval"]


def test_rounds_from_the_training_pass_skip_the_eval_pass(tiny_data, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    train_data, test_data = tiny_data
    passes = []
    original = EPIC.embed
    monkeypatch.setattr(EPIC, "embed", lambda self, *a, **k: passes.append(1) or original(
        self, *a, **k))
    defense = EPIC(0.5, warmup=1, every=1, num_examples=len(train_data))
    cfg = TrainConfig(epochs=4, lr=0.05, batch_size=16, round_embeddings="train-pass")
    train(seeded_convnet(train_data), train_data, test_data, cfg, defense=defense)
    assert [r.epoch for r in defense.history] == [1, 2, 3] and passes == []
    kept = torch.ones(len(train_data), dtype=torch.bool)
    for r in defense.history:
        check_epic_round(r, train_data.labels, kept, fraction=0.5)
        kept[r.dropped] = False
    assert torch.equal(defense.keep_mask, kept) and not kept.all()


def test_rounds_from_the_training_pass_are_refused_where_they_cannot_be(tiny_data) -> None:  # type: ignore[no-untyped-def]
    """A defense without the training-pass hook would silently take eval-pass rounds while
    its row says "train-pass": refused before any training."""
    train_data, test_data = tiny_data
    cfg = TrainConfig(epochs=3, lr=0.05, batch_size=16, round_embeddings="train-pass")
    model = seeded_convnet(train_data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="use round_embeddings='eval' for RandomDrop"):
        train(model, train_data, test_data, cfg,
              defense=RandomDrop(drop_fraction=0.1, warmup=1, every=1))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    train(seeded_convnet(train_data), train_data, test_data, cfg)  # no defense: nothing to do
    # the hook is the protocol's: a defense says it takes the gradients, or it refuses them
    assert EPIC.TAKES_TRAINING_GRADIENTS and not RandomDrop.TAKES_TRAINING_GRADIENTS
    with pytest.raises(NotImplementedError, match="RandomDrop cannot take"):
        RandomDrop(drop_fraction=0.1).update_from_embeddings(torch.zeros(4, 3),
                                                       torch.zeros(4, dtype=torch.long), 0)


def test_evaluating_every_few_epochs_and_after_the_last(tiny_data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    train_data, test_data = tiny_data
    cfg = TrainConfig(epochs=5, lr=0.05, batch_size=16, seed=3, eval_every=2)
    result = train(seeded_convnet(train_data), train_data, test_data, cfg, out=tmp_path)
    assert [m["epoch"] for m in result.metrics if "test_acc" in m] == [1, 3, 4]
    assert result.summary["test_acc"] == result.metrics[-1]["test_acc"]
    every = train(seeded_convnet(train_data), train_data, test_data,
                  TrainConfig(epochs=5, lr=0.05, batch_size=16, seed=3))
    assert result.metrics[3]["test_acc"] == every.metrics[3]["test_acc"]  # same training
    # a checkpoint from before the setting existed resumes as if it had its default
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    identity = json.loads(state["identity"])
    del identity["config"]["eval_every"]
    state["identity"] = json.dumps(identity)
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="config.eval_every: 1 there, 2 here"):
        train(seeded_convnet(train_data), train_data, test_data, cfg, out=tmp_path, resume=True)
    train(seeded_convnet(train_data), train_data, test_data,
          TrainConfig(epochs=5, lr=0.05, batch_size=16, seed=3), out=tmp_path, resume=True)


def test_channels_last_training_batches_are_channels_last_and_recorded(tiny_data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    train_data, test_data = tiny_data
    layouts: dict[bool, set[tuple[bool, bool]]] = {}
    for channels_last in (False, True):
        model = seeded_convnet(train_data)
        seen = layouts.setdefault(channels_last, set())
        model.register_forward_pre_hook(lambda m, args, seen=seen: seen.add(
            (m.training, args[0].is_contiguous(memory_format=torch.channels_last)
             and not args[0].is_contiguous())))
        out = tmp_path / str(channels_last)
        result = train(model, train_data, test_data,
                       TrainConfig(epochs=2, lr=0.05, batch_size=16, channels_last=channels_last),
                       out=out)
        assert result.summary["test_acc"] >= 0.6
        config = json.loads((out / "config.json").read_text())["config"]
        assert config["channels_last"] is channels_last
    # eval passes (test accuracy) are channels-last on the CPU either way; training batches
    # only with the setting
    assert layouts == {False: {(True, False), (False, True)}, True: {(True, True), (False, True)}}
    # a run stored before the setting existed trained without it
    assert config_record({"epochs": 2})["channels_last"] is False


def test_a_last_batch_of_one_example_is_left_out_of_its_epoch(
        tiny_data: tuple[ImageData, ImageData]) -> None:
    """Batch norm learns nothing sound from one example: a defense that leaves a multiple of
    the batch size plus one would make such a batch every epoch. Runs stored before
    ``min_batch`` trained on it, and rerun so."""
    from epic.data.imagedata import batch_indices

    assert [len(b) for b in batch_indices(9, batch_size=4, min_batch=2)] == [4, 4]
    assert [len(b) for b in batch_indices(9, batch_size=4)] == [4, 4, 1]
    assert [len(b) for b in batch_indices(1, batch_size=4, min_batch=2)] == [1]  # the only one
    train_data, test_data = tiny_data
    for min_batch, seen in ((2, 58), (1, 59)):
        config = TrainConfig(epochs=1, batch_size=29, min_batch=min_batch)
        keep = RandomDrop(counts={0: 1}, num_examples=60)  # 59 kept: 29 + 29 + 1
        result = train(seeded_convnet(train_data), train_data, test_data, config, defense=keep)
        assert result.metrics[0]["trained_on"] == seen
