"""The selection benchmark's --phases mode, through the engine's phase_times hook."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

from epic.selection import phase_times, select_medoids
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
    assert out["other"] >= 0  # phases are timed exclusively: no time is counted twice


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
