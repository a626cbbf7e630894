from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from epic.poisons import PoisonSet, PoisonSetError, apply_trigger


def _poisons(train, eps=8 / 255, shift=8):  # type: ignore[no-untyped-def]
    idx = torch.tensor([3, 7, 11])
    images = (train.images[idx].short() + shift).clamp(0, 255).to(torch.uint8)
    return PoisonSet(idx, images, train.images[:1].clone(), target_class=0,
                     adversarial_class=1, eps=eps, metadata={"attack": "test", "seed": 0})


def test_save_load_round_trip(tiny_data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    train, _ = tiny_data
    p = _poisons(train)
    p.save(tmp_path / "p")
    q = PoisonSet.load(tmp_path / "p", train)
    assert torch.equal(p.indices, q.indices) and torch.equal(p.images, q.images)
    assert torch.equal(p.target_images, q.target_images)
    assert (q.target_class, q.adversarial_class, q.eps) == (0, 1, 8 / 255)
    assert q.metadata == {"attack": "test", "seed": 0}


def test_apply_replaces_only_the_poisoned_images(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train, _ = tiny_data
    p = _poisons(train)
    poisoned = p.apply(train)
    changed = (poisoned.images != train.images).flatten(1).any(1).nonzero().squeeze(1)
    assert changed.tolist() == [3, 7, 11]  # each base brightened by 8 (none is all white)
    assert torch.equal(poisoned.images[[3, 7, 11]], p.images)
    assert torch.equal(poisoned.labels, train.labels)
    assert not torch.equal(train.images[[3, 7, 11]], p.images)  # the original is left alone


def test_load_rejects_a_poison_outside_eps(tiny_data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    train, _ = tiny_data
    p = _poisons(train)
    p.save(tmp_path / "p")
    with np.load(tmp_path / "p" / "poisons.npz") as npz:
        arrays = dict(npz)
    arrays["images"][1, 0, 0, 0] = (int(train.images[7, 0, 0, 0]) + 40) % 256
    np.savez(tmp_path / "p" / "poisons.npz", **arrays)
    with pytest.raises(PoisonSetError, match="exceed eps=8/255 .*index 7"):
        PoisonSet.load(tmp_path / "p", train)
    PoisonSet.load(tmp_path / "p")  # without the training set there is nothing to check against


def test_load_rejects_relabelled_clean_label_poisons(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train, _ = tiny_data
    p = _poisons(train)
    bad = PoisonSet(p.indices, p.images, p.target_images, 0, 1, p.eps,
                    labels=(train.labels[p.indices] + 1) % 3)
    with pytest.raises(PoisonSetError, match="changes labels"):
        bad.validate(train)


def test_load_refuses_pickled_arrays(tiny_data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    train, _ = tiny_data
    _poisons(train).save(tmp_path / "p")
    np.savez(tmp_path / "p" / "poisons.npz", indices=np.array([object()], dtype=object),
             images=np.zeros((1, 3, 8, 8), np.uint8), target_images=np.zeros((1, 3, 8, 8),
                                                                            np.uint8))
    with pytest.raises(PoisonSetError, match="cannot read"):
        PoisonSet.load(tmp_path / "p")


def test_unknown_format_is_refused(tiny_data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    train, _ = tiny_data
    _poisons(train).save(tmp_path / "p")
    (tmp_path / "p" / "poisons.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(PoisonSetError, match="not an epic poison set"):
        PoisonSet.load(tmp_path / "p")


def test_constructor_checks_shapes(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train, _ = tiny_data
    with pytest.raises(PoisonSetError, match="distinct"):
        PoisonSet(torch.tensor([1, 1]), train.images[:2], train.images[:1], 0, 1, 0.03)
    with pytest.raises(PoisonSetError, match="2 indices but 1 images"):
        PoisonSet(torch.tensor([1, 2]), train.images[:1], train.images[:1], 0, 1, 0.03)


def test_trigger_is_pasted_whole_and_success_counts_patched_source(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train, test = tiny_data
    trigger = torch.full((3, 2, 2), 255, dtype=torch.uint8)
    out = apply_trigger(torch.zeros(5, 3, 8, 8, dtype=torch.uint8), trigger,
                        generator=torch.Generator().manual_seed(0))
    assert (out == 255).flatten(1).sum(1).tolist() == [12] * 5
    p = PoisonSet(torch.tensor([0]), train.images[:1], train.images[:0], target_class=2,
                  adversarial_class=0, eps=1.0, trigger=trigger)
    probe = p.evaluation_images(test)
    assert len(probe) == int((test.labels == 2).sum())

    class Always(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tensor([[1.0, 0.0, 0.0]]).repeat(len(x), 1)

    assert p.success(Always(), test) == 1.0


def test_patch_free_success_reads_the_same_images_without_the_trigger(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train, test = tiny_data
    trigger = torch.full((3, 2, 2), 255, dtype=torch.uint8)
    p = PoisonSet(torch.tensor([0]), train.images[:1], train.images[:0], target_class=2,
                  adversarial_class=0, eps=1.0, trigger=trigger)
    clean = p.evaluation_images(test, patched=False)
    assert torch.equal(clean, test.images[test.labels == 2])

    class SeesWhite(torch.nn.Module):  # class 0 exactly when some pixel is saturated white
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            white = (x == 1.0).all(1).flatten(1).any(1).float()
            return torch.stack([white, 1 - white, torch.zeros_like(white)], 1)

    model = SeesWhite()
    model.register_parameter("w", torch.nn.Parameter(torch.zeros(1)))
    assert p.success(model, test) == 1.0
    assert p.success(model, test, patched=False) == 0.0


def test_load_names_the_bad_field(tiny_data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    train, _ = tiny_data
    p = _poisons(train)
    folder = p.save(tmp_path / "p")
    meta = json.loads((folder / "poisons.json").read_text())
    bad_json = {"adversarial_class": "1", "eps": True, "metadata": [1]}
    for key, value in bad_json.items():
        (folder / "poisons.json").write_text(json.dumps(meta | {key: value}))
        with pytest.raises(PoisonSetError, match=f"'{key}'"):
            PoisonSet.load(folder, train)
    (folder / "poisons.json").write_text(json.dumps([meta]))
    with pytest.raises(PoisonSetError, match="not an epic poison set"):
        PoisonSet.load(folder, train)
    (folder / "poisons.json").write_text(json.dumps(meta))
    arrays = dict(np.load(folder / "poisons.npz"))
    np.savez(folder / "poisons.npz", **(arrays | {"indices": arrays["indices"] + 0.5}))
    with pytest.raises(PoisonSetError, match="'indices' must be integers"):
        PoisonSet.load(folder, train)


def test_classes_outside_the_dataset_are_refused(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train, _ = tiny_data  # 3 classes
    p = _poisons(train)
    with pytest.raises(PoisonSetError, match="adversarial_class is 42, outside the 3 classes"):
        PoisonSet(**{**p.__dict__, "adversarial_class": 42}).validate(train)
    with pytest.raises(PoisonSetError, match="labels must lie in 0..2"):
        PoisonSet(**{**p.__dict__, "labels": torch.tensor([0, 1, 5]),
                     "metadata": {"clean_label": False}}).validate(train)
