"""The poisoning benchmark's trial setups (Schwarzschild et al., ICML 2021), read safely.

The benchmark fixes every trial in a setup file: a pickle of a list of dicts with
``target index`` (a CIFAR-10 *test* index), ``target class``, ``base class`` (the class the
target should become, whose training images are perturbed) and ``base indices`` (CIFAR-10
*training* indices of base-class images: 25 per transfer setup, 500 per from-scratch one). The
EPIC paper evaluates on these setups. This module reads them with the restricted unpickler and
builds each trial's victim training set by the benchmark's rules.

Example:
    >>> setups = load_setups("cifar10_transfer_learning.pickle")  # doctest: +SKIP
    >>> s = setups[0]; victim = transfer_victim_indices(train.labels, s)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from epic.data import ImageData
from epic.errors import EpicError
from epic.io.files import read_untrusted
from epic.io.safe_pickle import safe_load

__all__ = ["Setup", "SetupError", "load_setups", "outside_victims", "resolve_target",
           "scratch_victim_indices", "select_setups", "transfer_victim_indices", "victim_data"]

_KEYS = ("target index", "target class", "base class", "base indices")


class SetupError(EpicError):
    """A setup file that is not a list of benchmark setups, or a setup that does not fit."""


@dataclass(frozen=True)
class Setup:
    """One benchmark trial: ``id`` is its position in the file (the benchmark's setup number)."""

    id: int
    target_index: int
    target_class: int
    base_class: int
    base_indices: Tensor  # (P,) int64 training indices, all of base_class
    source: str = ""  # file name and sha256 prefix, for the record
    repeated_bases: int = 0  # base indices the file listed twice (dropped)

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts of the setup (without the base indices)."""
        return {"id": self.id, "target_index": self.target_index,
                "target_class": self.target_class, "base_class": self.base_class,
                "bases": len(self.base_indices), "repeated_bases": self.repeated_bases,
                "file": self.source}


def _int(value: Any, where: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        if isinstance(value, np.ndarray) and value.shape == () and value.dtype.kind in "iu":
            return int(value)
        raise SetupError(f"{where} must be an integer, got {type(value).__name__}")
    return int(value)


def load_setups(path: str | os.PathLike[str], *, num_classes: int = 10) -> list[Setup]:
    """Read a benchmark setup pickle (restricted unpickler: arrays, numbers, containers only).

    Raises:
        SetupError: the file is not a list of dicts with the four benchmark keys, or a value
            is out of range; the message names the file, the setup and the field.
    """
    p = Path(path)
    data = read_untrusted(p)
    obj = safe_load(io.BytesIO(data), name=str(p))
    tag = f"{p.name} (sha256 {hashlib.sha256(data).hexdigest()[:12]})"
    if not isinstance(obj, list) or not obj:
        raise SetupError(f"{p}: expected a non-empty list of setups, got {type(obj).__name__}")
    setups = []
    for i, d in enumerate(obj):
        where = f"{p}: setup {i}"
        if not isinstance(d, dict) or any(k not in d for k in _KEYS):
            raise SetupError(f"{where}: expected a dict with keys {', '.join(_KEYS)}")
        target_class = _int(d["target class"], f"{where} 'target class'")
        base_class = _int(d["base class"], f"{where} 'base class'")
        for name, c in (("target class", target_class), ("base class", base_class)):
            if not 0 <= c < num_classes:
                raise SetupError(f"{where} '{name}' is {c}, outside 0..{num_classes - 1}")
        if target_class == base_class:
            raise SetupError(f"{where}: 'target class' and 'base class' are both {base_class}")
        bases = np.asarray(d["base indices"])
        if bases.ndim != 1 or bases.dtype.kind not in "iu" or len(bases) == 0:
            raise SetupError(f"{where} 'base indices' must be a non-empty 1-d integer array")
        if bases.min() < 0:
            raise SetupError(f"{where} 'base indices' must be non-negative")
        # Two setups of the benchmark's transfer file (78 and 84) list a base index twice: one
        # image cannot be poisoned twice, so the repeat is dropped (and counted).
        _, first = np.unique(bases, return_index=True)
        unique = bases[np.sort(first)]
        setups.append(Setup(i, _int(d["target index"], f"{where} 'target index'"),
                            target_class, base_class, torch.from_numpy(unique.astype(np.int64)),
                            tag, len(bases) - len(unique)))
    return setups


def select_setups(setups: list[Setup], *, first: int | None = None,
                  ids: list[int] | None = None) -> list[Setup]:
    """The setups numbered ``ids`` (in that order), or the ``first`` ones, or all."""
    if ids is not None:
        bad = [i for i in ids if not 0 <= i < len(setups)]
        if bad:
            raise SetupError(f"setup ids {bad} outside 0..{len(setups) - 1}")
        return [setups[i] for i in ids]
    if first is not None:
        if first < 1:
            raise SetupError(f"first must be at least 1, got {first}", options=("first",))
        return setups[:first]
    return list(setups)


def _check_bases(labels: Tensor, setup: Setup) -> None:
    if int(setup.base_indices.max()) >= len(labels):
        raise SetupError(f"setup {setup.id}: base index {int(setup.base_indices.max())} is "
                         f"outside the {len(labels)} training images")
    wrong = labels[setup.base_indices] != setup.base_class
    if bool(wrong.any()):
        raise SetupError(f"setup {setup.id}: {int(wrong.sum())} base images are not of base "
                         f"class {setup.base_class}: is this the training set the setup "
                         "file was made for?")


def transfer_victim_indices(labels: Tensor, setup: Setup, *, per_class: int = 250
                            ) -> tuple[Tensor, Tensor]:
    """The benchmark's transfer-learning training set for ``setup``: ``(indices, poison_rows)``.

    ``indices`` (sorted, training-set indices) are the first ``per_class`` images of each class
    that are not base images, except that the base class keeps only its first
    ``per_class - P`` and gains the ``P`` base images (2,500 in all for 250 and 25 bases).
    ``poison_rows`` are the positions of the base images within ``indices`` (in the order of
    ``setup.base_indices``).
    """
    labels = labels.cpu()
    _check_bases(labels, setup)
    is_base = torch.zeros(len(labels), dtype=torch.bool)
    is_base[setup.base_indices] = True
    parts = []
    for c in range(int(labels.max()) + 1):
        members = ((labels == c) & ~is_base).nonzero().squeeze(1)
        keep = per_class - len(setup.base_indices) if c == setup.base_class else per_class
        if keep < 0 or len(members) < keep:
            raise SetupError(f"setup {setup.id}: class {c} has {len(members)} non-base images, "
                             f"needs {keep}")
        parts.append(members[:keep])
    indices = torch.cat(parts + [setup.base_indices]).sort().values
    rows = torch.searchsorted(indices, setup.base_indices)
    return indices, rows


def scratch_victim_indices(labels: Tensor, setup: Setup, *, per_class: int | None = None
                           ) -> tuple[Tensor, Tensor]:
    """The from-scratch training set: all images (``per_class=None``) or the first
    ``per_class`` of each class, and the positions in it of the setup's base images that it
    holds (about ``per_class / 5000`` of them on CIFAR-10: the budget scales with the set)."""
    labels = labels.cpu()
    _check_bases(labels, setup)
    if per_class is None:
        indices = torch.arange(len(labels))
    else:
        indices = torch.cat([(labels == c).nonzero().squeeze(1)[:per_class]
                             for c in range(int(labels.max()) + 1)]).sort().values
    inside = setup.base_indices[torch.isin(setup.base_indices, indices)]
    return indices, torch.searchsorted(indices, inside)


def resolve_target(test_labels: Tensor, setup: Setup, *, exact_below: int | None = None
                   ) -> tuple[int, bool]:
    """The test index to attack for ``setup`` and whether it is a stand-in.

    With ``exact_below=None`` the setup's own target index is used. Where only the test images
    below ``exact_below`` are stored exactly (this project's CIFAR-10 copy: 1,000), a target at
    or above it is replaced by the exactly stored test image of the same class at position
    ``target_index mod count`` among them: deterministic, and the same for every defense.
    """
    labels = test_labels.cpu()
    if exact_below is None or setup.target_index < exact_below:
        if not 0 <= setup.target_index < len(labels):
            raise SetupError(f"setup {setup.id}: target index {setup.target_index} is outside "
                             f"the {len(labels)} test images")
        if int(labels[setup.target_index]) != setup.target_class:
            raise SetupError(f"setup {setup.id}: test image {setup.target_index} is of class "
                             f"{int(labels[setup.target_index])}, not {setup.target_class}")
        return setup.target_index, False
    same = (labels[:exact_below] == setup.target_class).nonzero().squeeze(1)  # may be fewer
    if len(same) == 0:
        raise SetupError(f"setup {setup.id}: no exactly stored test image of class "
                         f"{setup.target_class}")
    return int(same[setup.target_index % len(same)]), True


def victim_data(train: ImageData, setup: Setup, *, scenario: str,
                per_class: int | None = None) -> tuple[ImageData, Tensor]:
    """The victim's training set for ``setup`` and the rows of the base images in it.

    ``transfer`` follows :func:`transfer_victim_indices` (``per_class`` default 250); the
    other scenarios :func:`scratch_victim_indices` (default: the whole training set).
    """
    if scenario == "transfer":
        indices, rows = transfer_victim_indices(train.labels, setup, per_class=per_class or 250)
    else:
        indices, rows = scratch_victim_indices(train.labels, setup, per_class=per_class)
    return train.subset(indices), rows


def outside_victims(labels: Tensor, setups: list[Setup], *, per_class: int = 250) -> Tensor:
    """Sorted training indices that no transfer victim set of ``setups`` uses (neither a clean
    image nor a base): data for a feature extractor disjoint from every victim's."""
    used = torch.zeros(len(labels), dtype=torch.bool)
    for setup in setups:
        used[transfer_victim_indices(labels, setup, per_class=per_class)[0]] = True
    return (~used).nonzero().squeeze(1)
