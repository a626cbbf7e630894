"""EPIC on the data shapes users have: map-style Datasets, DataLoaders, iterables of batches,
and models that are not this library's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from epic.data import ImageData
from epic.defenses import EPIC, LowestConfidence, RandomDrop, ScheduledDefense, SpectralSignatures
from epic.gradients import count_examples, gradient_embeddings

from .conftest import check_epic_round, seeded_convnet


def as_tensors(data: ImageData) -> TensorDataset:
    return TensorDataset(data.images.float() / 255, data.labels)


class Stream(IterableDataset[tuple[Tensor, Tensor]]):
    """Examples one at a time, as a streamed shard would give them."""

    def __init__(self, data: ImageData) -> None:
        self.data = data

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(len(self.data)):
            yield self.data.images[i].float() / 255, self.data.labels[i]


@pytest.fixture
def reference(tiny_data):  # type: ignore[no-untyped-def]
    train, _ = tiny_data
    model = seeded_convnet(train)
    grads, labels = gradient_embeddings(model, train)
    return train, model, grads, labels


def test_every_shape_of_data_gives_the_same_embeddings(reference) -> None:  # type: ignore[no-untyped-def]
    train, model, grads, labels = reference
    tensors = as_tensors(train)
    shuffled = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))
    shapes = {
        "Dataset": tensors,
        # a shuffling loader: its dataset is read in order, its sampler ignored
        "DataLoader": DataLoader(tensors, batch_size=7, shuffle=True),
        "IterableDataset loader": DataLoader(Stream(train), batch_size=8),
        "(x, y) batches": [(tensors.tensors[0][i:i + 16], train.labels[i:i + 16])
                           for i in range(0, len(train), 16)],
        "(x, y, index) batches, shuffled": [
            (tensors.tensors[0][idx], train.labels[idx], idx) for idx in shuffled.split(13)],
    }
    for name, data in shapes.items():
        got, got_labels = gradient_embeddings(model, data, batch_size=9)
        torch.testing.assert_close(got, grads, msg=name)
        assert torch.equal(got_labels, labels), name
    keep = torch.arange(len(train)) % 5 != 0
    for name, data in shapes.items():
        got, got_labels = gradient_embeddings(model, data, keep=keep)
        torch.testing.assert_close(got, grads[keep], msg=name)
        assert torch.equal(got_labels, labels[keep]), name


def test_counting_examples() -> None:
    data = TensorDataset(torch.zeros(10, 1), torch.zeros(10, dtype=torch.long))
    assert count_examples(data) == 10
    assert count_examples(DataLoader(data, batch_size=4)) == 10  # not 3 batches
    assert count_examples(iter([])) is None


def test_epic_rounds_agree_on_a_dataloader_and_on_image_data(reference) -> None:  # type: ignore[no-untyped-def]
    train, model, _, _ = reference
    on_images = EPIC(0.5, warmup=0, every=1)
    on_loader = EPIC(0.5, warmup=0, every=1)
    first = on_images.update(model, train, 0)
    second = on_loader.update(model, DataLoader(as_tensors(train), batch_size=64), 0)
    check_epic_round(first, train.labels, torch.ones(len(train), dtype=torch.bool), 0.5)
    assert torch.equal(first.dropped, second.dropped) and len(first.dropped) > 0
    # a second round skips the dropped examples in both
    assert torch.equal(on_images.update(model, train, 1).dropped,
                       on_loader.update(model, DataLoader(as_tensors(train)), 1).dropped)


def test_baselines_take_a_dataset_too(reference) -> None:  # type: ignore[no-untyped-def]
    train, model, _, _ = reference
    def make() -> list[ScheduledDefense]:
        return [SpectralSignatures(warmup=0), LowestConfidence(threshold=0.34, warmup=0),
                RandomDrop(drop_fraction=0.1, warmup=0, generator=torch.Generator().manual_seed(0))]

    # confidence in its own label of each example, one at a time (an untrained model: ~1/3)
    confidence = []
    with torch.no_grad():
        model.eval()
        for i in range(len(train)):
            probs = torch.softmax(model(train.images[i:i + 1].float() / 255), 1)[0]
            confidence.append(float(probs[train.labels[i]]))
    unsure = [i for i, c in enumerate(confidence) if c < 0.34]
    assert 0 < len(unsure) < len(train)
    spectral, lowest, random = (a.update(model, train, 0).dropped for a in make())
    # 1.5 x the 1% budget of 60 examples, rounded up: one per class of 20
    assert torch.bincount(train.labels[spectral]).tolist() == [1, 1, 1]
    assert lowest.tolist() == unsure
    assert len(random) == 6 and len(set(random.tolist())) == 6  # 10% of 60
    for a, expected in zip(make(), (spectral, lowest, random), strict=True):
        assert torch.equal(a.update(model, as_tensors(train), 0).dropped, expected)


def test_an_iterable_needs_the_size_of_the_training_set(reference) -> None:  # type: ignore[no-untyped-def]
    train, model, _, _ = reference
    stream = DataLoader(Stream(train), batch_size=8)
    with pytest.raises(ValueError, match="pass num_examples="):
        EPIC(0.5, warmup=0, every=1).update(model, stream, 0)
    defense = EPIC(0.5, warmup=0, every=1, num_examples=len(train))
    streamed = defense.update(model, stream, 0)
    check_epic_round(streamed, train.labels, torch.ones(len(train), dtype=torch.bool), 0.5)
    assert torch.equal(streamed.dropped, EPIC(0.5, warmup=0, every=1).update(
        model, train, 0).dropped) and len(streamed.dropped) > 0


def test_missing_or_repeated_examples_are_an_error(reference) -> None:  # type: ignore[no-untyped-def]
    train, model, _, _ = reference
    tensors = as_tensors(train)
    keep = torch.ones(len(train), dtype=torch.bool)
    short = DataLoader(Stream(train), batch_size=8, drop_last=True)  # 56 of 60
    with pytest.raises(ValueError, match="yielded 56 of the 60 examples"):
        gradient_embeddings(model, short, keep=keep)
    twice = [(tensors.tensors[0][:8], train.labels[:8], torch.arange(8))] * 2
    with pytest.raises(ValueError, match="some examples twice"):
        gradient_embeddings(model, twice)
    with pytest.raises(ValueError, match="index outside the 60 examples"):
        gradient_embeddings(model, [(tensors.tensors[0][:2], train.labels[:2],
                                     torch.tensor([0, 60]))], keep=keep)
    with pytest.raises(TypeError, match=r"batch 0 must be \(x, y\) or \(x, y, index\)"):
        gradient_embeddings(model, [tensors.tensors[0][:4]])
    with pytest.raises(TypeError, match="labels must be a 1-d integer batch"):
        gradient_embeddings(model, [(tensors.tensors[0][:4], torch.zeros(4))])
    with pytest.raises(TypeError, match="cannot embed a int"):
        gradient_embeddings(model, 5)  # type: ignore[arg-type]


class DictModel(nn.Module):
    """A model that returns a dict, as many detection / multi-head models do."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"logits": self.body(x), "aux": x.mean()}


def test_a_dict_model_with_logits_fn(reference) -> None:  # type: ignore[no-untyped-def]
    train, model, grads, _ = reference
    wrapped = DictModel(model)
    got, _ = gradient_embeddings(wrapped, as_tensors(train), logits_fn=lambda m, x: m(x)["logits"])
    torch.testing.assert_close(got, grads)
    defense = EPIC(0.5, warmup=0, every=1, logits_fn=lambda m, x: m(x)["logits"])
    assert torch.equal(defense.update(wrapped, as_tensors(train), 0).dropped,
                       EPIC(0.5, warmup=0, every=1).update(model, train, 0).dropped)


class Broken(Dataset[tuple[Tensor, Tensor]]):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        raise OSError(f"cannot read example {i}")


def test_model_mode_is_restored_when_the_pass_fails(reference) -> None:  # type: ignore[no-untyped-def]
    _, model, _, _ = reference
    model.train()
    with pytest.raises(OSError, match="cannot read example 0"):
        gradient_embeddings(model, Broken())
    assert model.training


def test_embeddings_can_be_collected_elsewhere(reference) -> None:  # type: ignore[no-untyped-def]
    train, model, grads, _ = reference
    got, labels = gradient_embeddings(model, as_tensors(train), store="meta")
    assert got.device.type == "meta" and labels.device.type == "meta"
    assert got.shape == grads.shape


def test_autocast_runs_the_model_in_bfloat16_and_keeps_float32(reference) -> None:  # type: ignore[no-untyped-def]
    train, model, grads, labels = reference
    seen: list[torch.dtype] = []
    hook = model.classifier.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    try:
        got, got_labels = gradient_embeddings(model, train, autocast=torch.bfloat16)
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}  # the model did run in bfloat16
    assert got.dtype == torch.float32 and torch.equal(got_labels, labels)
    assert 0 < float((got - grads).abs().max()) < 0.05  # rounded, not another computation
