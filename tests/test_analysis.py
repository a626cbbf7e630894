from __future__ import annotations

import pytest
import torch

from epic.analysis import effective_poisons, gradient_distance_to_target
from epic.poisons import PoisonSet

from .conftest import seeded_convnet


def _poisons(train, count=10):  # type: ignore[no-untyped-def]
    idx = torch.arange(count) * 3
    return PoisonSet(idx, train.images[idx], train.images[:1], target_class=0,
                     adversarial_class=1, eps=8 / 255)


def test_bisection_finds_the_responsible_poisons(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train, _ = tiny_data
    poisons = _poisons(train)
    needed = {int(poisons.indices[2]), int(poisons.indices[7])}
    order = torch.tensor([7, 2, 0, 1, 3, 4, 5, 6, 8, 9])
    found = effective_poisons(poisons, lambda s: set(s.indices.tolist()) >= needed, order=order)
    assert sorted(found.effective.tolist()) == [2, 7]
    assert found.succeeds_alone and found.fails_without
    assert len(found.trials) <= 2 + 4
    assert found.trials[0] == {"poisons": 10, "which": "prefix", "success": True}


def test_a_failing_attack_has_no_effective_poisons(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train, _ = tiny_data
    found = effective_poisons(_poisons(train), lambda s: False)
    assert len(found.effective) == 0 and not found.succeeds_alone
    with pytest.raises(ValueError, match="permutation"):
        effective_poisons(_poisons(train), lambda s: True, order=torch.tensor([0, 0]))


def test_gradient_distance_matches_a_direct_computation(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train, _ = tiny_data
    model = seeded_convnet(train).eval()
    poisons = _poisons(train, 4)
    dist = gradient_distance_to_target(model, poisons, train)
    with torch.no_grad():
        px = train.images[poisons.indices].float() / 255
        g = torch.softmax(model(px), 1) - torch.nn.functional.one_hot(
            train.labels[poisons.indices], 3)
        t = torch.softmax(model(train.images[:1].float() / 255), 1)[0] - torch.eye(3)[1]
    assert torch.allclose(dist, (g - t).norm(dim=1), atol=1e-5)


def test_measure_effective_trains_its_victims_and_writes_what_it_found(
        tiny_data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """End to end on a tiny set: distances in a clean model trained first, victims per
    bisection step, and effective.json / effective.png from the result."""
    import json

    from epic.bench.effective import measure_effective, write_effective
    from epic.training import TrainConfig

    train, test = tiny_data
    poisons = _poisons(train, count=4)
    result = measure_effective(seeded_convnet(train), train, test, poisons,
                               TrainConfig(epochs=1), threshold=-1.0)  # any run "succeeds"
    assert result["poisons"] == 4 and len(result["distances"]) == 4
    assert result["training_runs"] == len(result["trials"]) >= 2
    assert result["effective"] == len(result["effective_indices"]) >= 1
    assert set(result["effective_indices"]) <= set(poisons.indices.tolist())
    out = write_effective(result, tmp_path / "eff")
    stored = json.loads((out / "effective.json").read_text())
    assert stored["effective_indices"] == result["effective_indices"]
    assert "effective_rows" not in stored and (out / "effective.png").stat().st_size > 0
