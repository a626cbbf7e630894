"""The selection benchmark's --phases mode, through the engine's phase_times hook."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import torch

from epic.selection import phase_times, select_medoids, timing
from epic.selection.timing import PHASES

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "selection.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("selection_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_phases_are_all_timed() -> None:
    bench = load_benchmark()
    args = argparse.Namespace(per_class=2500, classes=2, fraction=0.1, method="lazy",
                              repeat=1, seed=0)
    out = bench.phases(args)["seconds"]
    # 2,500 rows are k-d ordered and most of the first pick's rows rise: every phase runs
    assert set(out) == {"total", "other", *PHASES}
    assert all(out[name] > 0 for name in PHASES)


def test_a_phase_within_a_phase_counts_for_itself_only(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """On a clock moved by hand: every second goes to the innermost phase running then."""
    now = [0.0]
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    @timing.phase("order")
    def inner() -> None:
        now[0] += 5

    @timing.phase("kernel")
    def outer() -> None:
        now[0] += 3
        inner()
        now[0] += 2
        inner()

    @timing.phase("choose")
    def recursive(depth: int) -> None:  # a phase that calls itself
        now[0] += 1
        if depth:
            recursive(depth - 1)

    totals: dict[str, float] = {}
    with phase_times(totals):
        outer()
        inner()
        recursive(2)
    assert totals == {"kernel": 5.0, "order": 15.0, "choose": 3.0}
    assert now[0] == sum(totals.values())  # no second counted twice, none lost
    outer()
    assert totals == {"kernel": 5.0, "order": 15.0, "choose": 3.0}  # not timed outside


def test_phase_times_records_only_while_active() -> None:
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(0))
    y = torch.arange(300) % 2
    totals: dict[str, float] = {}
    with phase_times(totals):
        inside = select_medoids(x, y, 0.1)
    seen = dict(totals)
    assert {"kernel", "choose"} <= set(seen) <= set(PHASES)
    outside = select_medoids(x, y, 0.1)
    assert totals == seen  # nothing added once the block is left
    assert torch.equal(inside.indices, outside.indices)  # timing changes nothing
