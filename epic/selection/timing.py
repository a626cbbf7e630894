"""Where the engine's time goes: an opt-in timer of its phases.

``with phase_times(totals): select_medoids(...)`` adds to ``totals`` the seconds spent in each
phase of the engine: ``order`` (k-d ordering of rows), ``kernel`` (building the similarity
kernels), ``fresh_pass`` (summing every gain afresh), ``updates`` (lowering the known gains
after a selection) and ``choose`` (picking the best candidate). Phases are timed exclusively: a
phase called from within another counts for itself only. Outside ``phase_times`` the timed
functions run as they are. ``benchmarks/selection.py --phases`` reports these figures.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

__all__ = ["PHASES", "phase", "phase_times"]

PHASES = ("order", "kernel", "fresh_pass", "updates", "choose")

_P = ParamSpec("_P")
_R = TypeVar("_R")

_totals: dict[str, float] | None = None  # where the active phase_times adds up
_inner: list[float] = []  # per open timed call: seconds spent in phases called from it


@contextmanager
def phase_times(totals: dict[str, float]) -> Iterator[dict[str, float]]:
    """Add the seconds of every engine phase (:data:`PHASES`) to ``totals`` while active."""
    global _totals
    outer, _totals = _totals, totals
    try:
        yield totals
    finally:
        _totals = outer


def phase(name: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Time the calls of the decorated function as phase ``name`` under :func:`phase_times`."""
    if name not in PHASES:
        raise ValueError(f"unknown phase {name!r}; the phases are {', '.join(PHASES)}")

    def decorate(fn: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(fn)
        def timed(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            totals = _totals
            if totals is None:
                return fn(*args, **kwargs)
            _inner.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                totals[name] = totals.get(name, 0.0) + spent - _inner.pop()
                if _inner:
                    _inner[-1] += spent

        return timed

    return decorate
