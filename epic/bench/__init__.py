"""The benchmark: poison sets x defenses x seeds -> attack success, accuracy, time; reports.

Example:
    >>> from epic.bench import ResultStore, run_trials, write_report  # doctest: +SKIP
    >>> store = ResultStore("bench/results.jsonl")
    >>> run_trials(["poisons/bp0"], ["none", "epic-0.1"], seeds=[0],
    ...            setting={"dataset": "cifar10", "model": "resnet18"}, store=store, ...)
    >>> write_report(store.load(), "bench/report")
"""

from epic.bench.report import (
    cluster_size_rounds,
    drop_curve,
    summarize,
    to_markdown,
    write_report,
)
from epic.bench.runner import plan_trials, run_trials, trial_id
from epic.bench.store import ResultStore

__all__ = ["ResultStore", "cluster_size_rounds", "drop_curve", "plan_trials",
           "run_trials", "summarize", "to_markdown", "trial_id", "write_report"]
