"""Defenses by name, with the paper's settings: what the CLI and the benchmark build from.

:data:`DEFENSES` maps each name to its class; :func:`build_defense` builds one for a run
(:class:`~epic.protocol.RunFacts`) through the class's ``for_run``, whose keyword-only
arguments are the defense's options. Adding a defense is a new file with its class and one
line here (docs/defenses.md).
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from epic.defenses.adversarial import AdversarialPoisoning
from epic.defenses.base import ScheduledDefense
from epic.defenses.clipnoise import ClipNoise
from epic.defenses.clustering import ActivationClustering
from epic.defenses.dpsgd import DPSGD
from epic.defenses.epic import EPIC
from epic.defenses.groups import ForeignGroups
from epic.defenses.knn import DeepKNN
from epic.defenses.scores import HighestLoss, LowestConfidence, RandomDrop, RetrainWithout
from epic.defenses.spectral import SpectralSignatures
from epic.protocol import Defense, RunFacts

__all__ = ["DEFENSES", "REPLAYS", "SHORT_SPECS", "build_defense", "defense_options",
           "options_for", "parse_spec", "register_defense", "scheduled"]

DEFENSES: dict[str, type[Defense] | None] = {
    "none": None,
    "epic": EPIC,
    "deep-knn": DeepKNN,
    "spectral-signatures": SpectralSignatures,
    "foreign-groups": ForeignGroups,
    "activation-clustering": ActivationClustering,
    "lowest-confidence": LowestConfidence,
    "highest-loss": HighestLoss,
    "random": RandomDrop,
    "retrain": RetrainWithout,
    "dp-sgd": DPSGD,
    "clip-noise": ClipNoise,
    "adversarial-poisoning": AdversarialPoisoning,
}

D = TypeVar("D", bound=type[Defense])


def register_defense(name: str) -> Callable[[D], D]:
    """Class decorator: make a :class:`~epic.protocol.Defense` buildable as ``name`` (by
    ``epic train --defense``, ``epic bench run --defenses`` and :func:`build_defense`), once
    the module that defines it is imported (docs/defenses.md, "Adding a defense")."""
    if name in DEFENSES:
        raise ValueError(f"defense name {name!r} is taken")

    def register(cls: D) -> D:
        if not callable(getattr(cls, "for_run", None)):
            raise TypeError(f"{cls.__name__}: a defense needs a for_run(run, **options) "
                            f"classmethod")
        DEFENSES[name] = cls
        return cls
    return register


# Specs "<prefix>-<number>" (the benchmark's epic-0.2, ap-0.25): the defense and the option
# the number sets.
SHORT_SPECS: dict[str, tuple[str, str]] = {
    "epic": ("epic", "fraction"),
    "ap": ("adversarial-poisoning", "share"),
    "random": ("random", "drop_fraction"),
    "groups-epic": ("foreign-groups", "isolated"),
}
# "<prefix><spec>" -> the defense that replays what a <spec> trial of the same data dropped:
# as many random drops at the same epochs (the control of whether <spec> finds poisons), or
# a fresh model trained without all of it from the first epoch (filter, then retrain); each
# such defense's replay_options(rounds) turns that trial's rounds into its options
REPLAYS = {"random-as-": "random", "retrain-after-": "retrain"}


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """The defense a spec names and the options it sets: ``"epic-0.2"`` -> ``("epic",
    {"fraction": 0.2})``, ``"ap-0.25"`` -> ``("adversarial-poisoning", {"share": 0.25})``,
    ``"random-0.1"`` -> ``("random", {"drop_fraction": 0.1})``, ``"groups-epic-0.1"`` ->
    ``("foreign-groups", {"isolated": 0.1})``, ``"random-as-epic-0.1"`` ->
    ``("random", {"replay_of": "epic-0.1"})`` (as many random drops, at the same epochs, as
    an EPIC-0.1 trial made: the control of whether a defense finds poisons or only removes
    data), ``"retrain-after-epic-0.1"`` -> ``("retrain", {"replay_of": "epic-0.1"})`` (a fresh
    model trained without everything that trial dropped), a name of :data:`DEFENSES` ->
    ``(name, {})``."""
    if spec in DEFENSES:
        return spec, {}
    for prefix, name in REPLAYS.items():
        if spec.startswith(prefix):
            replayed = spec[len(prefix):]
            if not scheduled(replayed) or parse_spec(replayed)[0] in REPLAYS.values():
                raise ValueError(f"{spec}: {prefix}<defense> replays the rounds of a defense "
                                 f"that drops examples on a schedule (epic-0.1, highest-loss, "
                                 f"deep-knn, ...), not of {replayed!r}")
            return name, {"replay_of": replayed}
    prefix, _, number = spec.rpartition("-")
    if prefix in SHORT_SPECS:
        name, option = SHORT_SPECS[prefix]
        try:
            return name, {option: float(number)}
        except ValueError:
            pass
    short = ", ".join(f"{p}-<{o}>" for p, (_, o) in SHORT_SPECS.items())
    raise ValueError(f"unknown defense {spec!r}; choose from {', '.join(DEFENSES)} (or "
                     f"{short}: epic-0.1, ap-0.5, ...; or "
                     f"{', '.join(f'{p}<defense>' for p in REPLAYS)})")


def scheduled(spec: str) -> bool:
    """Whether defense ``spec`` drops examples in rounds on a schedule (``warmup``, ``every``,
    ``until`` apply to it)."""
    cls = DEFENSES[parse_spec(spec)[0]]
    return cls is not None and issubclass(cls, ScheduledDefense)


def defense_options(name: str) -> tuple[str, ...]:
    """The options of defense ``name``: the keyword-only arguments of its ``for_run``."""
    cls = DEFENSES[parse_spec(name)[0]]
    if cls is None:
        return ()
    return tuple(p.name for p in inspect.signature(cls.for_run).parameters.values()
                 if p.kind is inspect.Parameter.KEYWORD_ONLY)


def options_for(spec: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The ``settings`` (shared options such as the command line's, some of them for other
    defenses) that defense ``spec`` takes, leaving out those that are None (not given)."""
    known = defense_options(spec)
    return {k: v for k, v in settings.items() if k in known and v is not None}


def build_defense(spec: str, run: RunFacts, **options: Any) -> Defense | None:
    """The defense ``spec`` names (see :func:`parse_spec`) for ``run``: ``for_run(run,
    **options)`` of its class, with the paper's settings where ``options`` are silent; None
    for ``"none"``.

    On the paper's schedule (:func:`~epic.defenses.base.paper_schedule`): EPIC-0.1/0.2/0.3
    warm up 10/20/30 epochs, the other drop rules 10; rounds every ``epochs / 20`` epochs
    (every epoch in transfer learning) until the last learning-rate milestone; Deep k-NN,
    Spectral Signatures and Activation Clustering filter once, at the warmup. DP-SGD,
    clip-and-noise and Adversarial Poisoning have no schedule.

    Raises:
        ValueError: an unknown spec, an option the defense does not take or of the wrong
            type, or a schedule that runs no round within ``run.epochs``.

    Example:
        >>> build_defense("epic-0.2", RunFacts(num_examples=100, epochs=40, milestones=(25, 35)))
        ... # doctest: +ELLIPSIS
        <epic.defenses.epic.EPIC object at ...>
    """
    name, preset = parse_spec(spec)
    cls = DEFENSES[name]
    unknown = sorted(options.keys() - set(defense_options(name)))
    if unknown:
        takes = ", ".join(defense_options(name)) or "none"
        raise ValueError(f"defense {name} takes no option {', '.join(unknown)} (its options: "
                         f"{takes})")
    if cls is None:
        return None
    _check_option_types(name, cls, options)
    defense = cls.for_run(run, **(preset | options))
    if isinstance(defense, ScheduledDefense):
        defense.check_runs_within(run.epochs, name=spec)
    return defense


def _check_option_types(name: str, cls: type[Defense], options: Mapping[str, Any]) -> None:
    """Refuse an option whose value is not of the type ``for_run`` declares (``warmup=abc``),
    naming it, before anything is built."""
    try:
        hints = typing.get_type_hints(cls.for_run)
    except (NameError, TypeError):  # annotations this module cannot resolve: not checked
        return
    for key, value in options.items():
        if key in hints and not _fits(value, hints[key]):
            raise ValueError(f"defense {name} option {key}={value!r}: expected "
                             f"{_hint_name(hints[key])}")


def _fits(value: Any, hint: Any) -> bool:
    origin = get_origin(hint)
    if origin is Literal:
        return value in get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_fits(value, arg) for arg in get_args(hint))
    if hint is type(None):
        return value is None
    if hint in (int, float):  # a bool is not a number here; an int is a float
        return (isinstance(value, (int, float) if hint is float else int)
                and not isinstance(value, bool))
    if isinstance(hint, type) and origin is None:
        return isinstance(value, hint)
    return True  # generics and callables: not values a command line gives


def _hint_name(hint: Any) -> str:
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_hint_name(arg) for arg in get_args(hint))
    if get_origin(hint) is Literal:
        return " or ".join(repr(arg) for arg in get_args(hint))
    return "none" if hint is type(None) else getattr(hint, "__name__", str(hint))
