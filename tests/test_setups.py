"""Benchmark setup files: restricted reading, validation, victim sets and target stand-ins."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from epic.data import ImageData
from epic.io.safe_pickle import UnsafePickleError
from epic.setups import (
    Setup,
    SetupError,
    load_setups,
    outside_victims,
    resolve_target,
    scratch_victim_indices,
    select_setups,
    transfer_victim_indices,
)

from .conftest import requires_cifar

# 3 classes x 10 training images, labels 0,1,2,0,1,2,...
LABELS = torch.arange(30) % 3


def _write(tmp_path: Path, setups: object) -> Path:
    path = tmp_path / "setups.pickle"
    path.write_bytes(pickle.dumps(setups))
    return path


def _setup(bases: list[int], target: int = 4, target_class: int = 1, base_class: int = 0
           ) -> dict[str, object]:
    return {"target index": np.int64(target), "target class": target_class,
            "base class": base_class, "base indices": np.array(bases, dtype=np.int64)}


def test_load_setups_reads_and_drops_repeated_bases(tmp_path: Path) -> None:
    path = _write(tmp_path, [_setup([3, 9]), _setup([6, 6, 12], base_class=0)])
    first, second = load_setups(path, num_classes=3)
    assert (first.id, first.target_index, first.target_class, first.base_class) == (0, 4, 1, 0)
    assert first.base_indices.tolist() == [3, 9] and first.repeated_bases == 0
    assert second.base_indices.tolist() == [6, 12] and second.repeated_bases == 1
    assert "setups.pickle" in first.source


@pytest.mark.parametrize(("setups", "message"), [
    ({"not": "a list"}, "list of setups"),
    ([{"target index": 1}], "keys"),
    ([_setup([3], base_class=7)], "'base class' is 7"),
    ([_setup([3], target_class=0, base_class=0)], "both 0"),
    ([_setup([3]) | {"base indices": np.array([1.5])}], "integer array"),
    ([_setup([3]) | {"target index": "4"}], "'target index' must be an integer"),
])
def test_load_setups_names_the_bad_field(tmp_path: Path, setups: object, message: str) -> None:
    with pytest.raises(SetupError, match=message):
        load_setups(_write(tmp_path, setups), num_classes=3)


def test_load_setups_refuses_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("owned",))

    with pytest.raises(UnsafePickleError):
        load_setups(_write(tmp_path, [Evil()]))


def test_transfer_victim_set_follows_the_benchmark_rule(tmp_path: Path) -> None:
    # base class 0 loses as many of its first images as there are bases, and gains the bases
    (setup,) = load_setups(_write(tmp_path, [_setup([21, 27])]), num_classes=3)
    indices, rows = transfer_victim_indices(LABELS, setup, per_class=4)
    assert indices.tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 10, 11, 21, 27]
    assert torch.bincount(LABELS[indices]).tolist() == [4, 4, 4]
    assert indices[rows].tolist() == [21, 27]


def test_victim_sets_check_the_bases_against_the_labels(tmp_path: Path) -> None:
    (setup,) = load_setups(_write(tmp_path, [_setup([1])]), num_classes=3)  # 1 is class 1
    with pytest.raises(SetupError, match="not of base class 0"):
        transfer_victim_indices(LABELS, setup, per_class=4)


def test_scratch_victim_set_keeps_the_bases_it_holds(tmp_path: Path) -> None:
    (setup,) = load_setups(_write(tmp_path, [_setup([3, 27])]), num_classes=3)
    indices, rows = scratch_victim_indices(LABELS, setup, per_class=5)
    assert len(indices) == 15 and indices[rows].tolist() == [3]
    everything, all_rows = scratch_victim_indices(LABELS, setup)
    assert len(everything) == 30 and everything[all_rows].tolist() == [3, 27]


def test_resolve_target_and_stand_in(tmp_path: Path) -> None:
    test_labels = torch.tensor([0, 1, 2, 1, 0, 1, 2, 2])
    setups = load_setups(_write(tmp_path, [_setup([0], target=3), _setup([0], target=7,
                                                                        target_class=2)]),
                         num_classes=3)
    assert resolve_target(test_labels, setups[0]) == (3, False)
    # only the first 4 are exact: class 2 has one exact image, at 2
    assert resolve_target(test_labels, setups[1], exact_below=4) == (2, True)
    wrong = load_setups(_write(tmp_path, [_setup([0], target=0)]), num_classes=3)[0]
    with pytest.raises(SetupError, match="is of class 0, not 1"):
        resolve_target(test_labels, wrong)


def test_select_setups(tmp_path: Path) -> None:
    setups = load_setups(_write(tmp_path, [_setup([3]) for _ in range(4)]), num_classes=3)
    assert [s.id for s in select_setups(setups, first=2)] == [0, 1]
    assert [s.id for s in select_setups(setups, ids=[3, 1])] == [3, 1]
    with pytest.raises(SetupError, match="outside"):
        select_setups(setups, ids=[4])


def test_outside_victims_is_the_complement_of_every_victim_set(tmp_path: Path) -> None:
    setups = load_setups(_write(tmp_path, [_setup([21, 27]), _setup([14], base_class=2)]),
                         num_classes=3)
    rest = outside_victims(LABELS, setups, per_class=4)
    used = set()
    for s in setups:
        used |= set(transfer_victim_indices(LABELS, s, per_class=4)[0].tolist())
    assert set(rest.tolist()) == set(range(30)) - used
    assert {21, 27, 14, 0, 1, 2}.isdisjoint(rest.tolist())


def _benchmark_file(name: str) -> Path | None:
    root = os.environ.get("EPIC_DATA_DIR")
    path = Path(root) / "poisoning-benchmark" / name if root else None
    return path if path is not None and path.exists() else None


def _needs_setups(name: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(_benchmark_file(name) is None, reason=(
        "the poisoning benchmark's setups not found under $EPIC_DATA_DIR"))


def _shared_setups(name: str) -> tuple[list[Setup], ImageData, ImageData]:
    """The setup file ``name`` and the shared CIFAR-10 (train, test)."""
    from epic.data import load_cifar

    path = _benchmark_file(name)
    assert path is not None
    return (load_setups(path),
            *load_cifar("cifar10", Path(os.environ["EPIC_DATA_DIR"]) / "cifar10"))


@requires_cifar
@_needs_setups("cifar10_transfer_learning.pickle")
def test_the_benchmark_transfer_setups_fit_the_shared_cifar10() -> None:
    setups, train, test = _shared_setups("cifar10_transfer_learning.pickle")
    assert len(setups) == 100 and [s.id for s in setups if s.repeated_bases] == [78, 84]
    for s in setups[:20]:
        indices, rows = transfer_victim_indices(train.labels, s)
        assert len(indices) == 2500 and torch.bincount(train.labels[indices]).tolist() == [250] * 10
        target, stand_in = resolve_target(test.labels, s, exact_below=1000)
        assert stand_in == (s.target_index >= 1000) and int(test.labels[target]) == s.target_class


@requires_cifar
@_needs_setups("cifar10_from_scratch.pickle")
def test_the_transfer_budget_study_attacks_setup_0s_target() -> None:
    from epic.bench.presets import BUDGET_TARGET

    setups, _, test = _shared_setups("cifar10_from_scratch.pickle")
    setup = setups[0]
    target, _ = resolve_target(test.labels, setup, exact_below=1000)
    attacked = ("--target-index", str(target), "--adversarial-class", str(setup.base_class))
    assert attacked == BUDGET_TARGET
