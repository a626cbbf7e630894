"""The selection benchmark's phase timers (they patch engine internals while active)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import epic.selection as engine

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "selection.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("selection_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_phases_are_all_timed_and_the_engine_restored() -> None:
    bench = load_benchmark()
    before = {name: getattr(owner, attr) for name, (owner, attr) in bench.PHASES.items()}
    args = argparse.Namespace(per_class=2500, classes=2, fraction=0.1, method="lazy",
                              repeat=1, seed=0)
    out = bench.phases(args)["seconds"]
    # 2,500 rows are k-d ordered and most of the first pick's rows rise: every phase runs
    assert set(out) == {"total", "other", *bench.PHASES}
    assert all(out[name] > 0 for name in bench.PHASES)
    assert out["other"] >= 0  # phases are timed exclusively: no time is counted twice
    after = {name: getattr(owner, attr) for name, (owner, attr) in bench.PHASES.items()}
    assert after == before
    assert engine._Coverage.best is before["choose"]
