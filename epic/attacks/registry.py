"""Attacks by name: what ``epic craft`` and the benchmark build from.

An attack is a frozen dataclass of typed hyperparameters with a ``name`` and a ``craft``
method of one of two kinds: a :class:`TargetedAttack` aims at one test image, a
:class:`BackdoorAttack` (``backdoor = True``) at every image of a source class that carries a
trigger. :func:`register_attack` adds one to :data:`ATTACKS` (docs/attacks.md, "Adding an
attack"); :func:`build_attack` makes one from options, refusing those it does not take.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Protocol, TypeVar, cast

from torch import Tensor, nn

from epic.data import ImageData
from epic.errors import EpicError
from epic.poisons import PoisonSet

__all__ = ["ATTACKS", "BackdoorAttack", "TargetedAttack", "attack_options", "build_attack",
           "craft_attack", "is_backdoor", "register_attack", "uses_model"]


class TargetedAttack(Protocol):
    """Poisons of ``adversarial_class`` that make a model trained on them put ``target`` (one
    uint8 test image) there; ``bases``: the training rows to perturb (default: drawn)."""

    name: ClassVar[str]

    def craft(self, model: nn.Module, train: ImageData, target: Tensor, target_class: int,
              adversarial_class: int, *, seed: int = 0, bases: Tensor | None = None,
              progress: bool = False) -> PoisonSet: ...


class BackdoorAttack(Protocol):
    """Poisons that make a model trained on them put ``source_class`` images carrying the
    set's trigger (``trigger``, or one drawn from ``seed``) into ``adversarial_class``."""

    name: ClassVar[str]
    backdoor: ClassVar[bool]

    def craft(self, model: nn.Module | None, train: ImageData, source_class: int,
              adversarial_class: int, *, seed: int = 0, trigger: Tensor | None = None,
              progress: bool = False) -> PoisonSet: ...


ATTACKS: dict[str, type] = {}
A = TypeVar("A", bound=type)


def register_attack(cls: A) -> A:
    """Class decorator: make the attack dataclass ``cls`` buildable by its ``name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not dataclasses.is_dataclass(cls) or not callable(
            getattr(cls, "craft", None)):
        raise TypeError(f"{cls.__name__}: an attack is a dataclass with a str 'name' and a "
                        f"'craft' method")
    if name in ATTACKS and ATTACKS[name] is not cls:
        raise ValueError(f"attack name {name!r} is taken by {ATTACKS[name].__name__}")
    ATTACKS[name] = cls
    return cls


def _attack_class(name: str) -> type:
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
    return ATTACKS[name]


def is_backdoor(name: str) -> bool:
    """Whether attack ``name`` is a backdoor (a source class and a trigger, no target)."""
    return bool(getattr(_attack_class(name), "backdoor", False))


def uses_model(name: str) -> bool:
    """Whether attack ``name`` crafts against a model (a patch backdoor does not: no clean
    model needs training for it)."""
    return bool(getattr(_attack_class(name), "uses_model", True))


def attack_options(name: str) -> dict[str, Any]:
    """The hyperparameters of attack ``name`` with their defaults (the published ones)."""
    return {f.name: f.default for f in dataclasses.fields(_attack_class(name))}


def build_attack(name: str, **options: Any) -> TargetedAttack | BackdoorAttack:
    """Attack ``name`` with ``options`` in place of its defaults.

    Raises:
        ValueError: an unknown attack, or an option it does not take (named, with those it
            does), instead of an option silently left unused.
    """
    takes = attack_options(name)
    unknown = sorted(options.keys() - takes.keys())
    if unknown:
        raise EpicError(f"attack {name} takes no {', '.join(unknown)} (its options: "
                        f"{', '.join(takes)})", options=("attack", *unknown))
    attack: TargetedAttack | BackdoorAttack = _attack_class(name)(**options)
    return attack


def craft_attack(name: str, model: nn.Module | None, train: ImageData, test: ImageData, *,
                 target_index: int | None = None, source_class: int | None = None,
                 adversarial_class: int | None = None, seed: int = 0,
                 bases: Tensor | None = None, progress: bool = False,
                 **options: Any) -> PoisonSet:
    """Build attack ``name`` with ``options`` (:func:`build_attack`) and craft its poisons.

    A backdoor moves ``source_class`` (required) to ``adversarial_class``; a targeted attack
    moves test image ``target_index`` (required; recorded in the set's metadata) from its own
    class to ``adversarial_class``, perturbing ``bases`` (training rows) when given. The
    adversarial class defaults to the class after the source or target class.
    """
    attack = build_attack(name, **options)

    def adversarial_for(source: int) -> int:
        return (source + 1) % train.num_classes if adversarial_class is None \
            else adversarial_class

    if is_backdoor(name):
        if source_class is None:
            raise EpicError(f"attack {name} is a backdoor: it needs source_class",
                            options=("source_class",))
        return cast(BackdoorAttack, attack).craft(model, train, source_class,
                                                  adversarial_for(source_class), seed=seed,
                                                  progress=progress)
    if target_index is None or model is None:
        raise EpicError(f"attack {name} needs a target_index and a model",
                        options=("target_index",))
    target_class = int(test.labels[target_index])
    poisons = cast(TargetedAttack, attack).craft(model, train, test.images[target_index],
                                                 target_class, adversarial_for(target_class),
                                                 seed=seed, bases=bases, progress=progress)
    return dataclasses.replace(poisons, metadata=poisons.metadata | {
        "target_index": target_index})
