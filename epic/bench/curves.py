"""Detection curves: what each detector flags of a poison set as its own knob moves.

A dropping defense makes one choice per round at the setting it runs with; the benchmark's
detection table (:func:`epic.bench.report.detection`) is that one point. Here each detector
runs one round on the same model (a victim trained on the poisoned set, at a given epoch)
at every value of the option that trades the poisons it finds against the clean examples it
drops (:data:`SWEEPS`), through its own ``embed`` and ``choose``: the trade each detector
offers, with the point each defense runs at marked.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from epic.data import ImageData
from epic.defenses import ScheduledDefense, build_defense
from epic.gradients import Examples, count_examples
from epic.io.files import read_json, write_atomically
from epic.models import Classifier
from epic.poisons import PoisonSet
from epic.protocol import RunFacts
from epic.training import TrainConfig, train

__all__ = ["CLEAN_LIMIT", "ONE_ROUND", "SWEEPS", "best_within", "curves_markdown",
           "detection_curves", "measure_curves", "plot_curves", "read_curves", "write_curves"]

# detector -> (the option swept, its values, in the order that flags more); the value the
# defense runs with by default is among them
SWEEPS: dict[str, tuple[str, tuple[float, ...]]] = {
    "epic": ("fraction", (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)),
    "deep-knn": ("budget", (0.0025, 0.005, 0.01, 0.02, 0.05, 0.1)),
    "spectral-signatures": ("budget", (0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)),
    "activation-clustering": ("size_threshold", (0.05, 0.1, 0.15, 0.2, 0.25, 0.35, 0.45)),
    "lowest-confidence": ("threshold", (0.1, 0.25, 0.5, 0.75, 0.9)),
    "highest-loss": ("threshold", (4.0, 3.0, 2.0, 1.0, 0.5)),
    "foreign-groups": ("threshold", (5.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.0)),
}
# the share of the clean examples a detector may flag in the summary tables (curves.md)
CLEAN_LIMIT = 0.02
# options that let a detector decide in one round: foreign-groups waits for a second round's
# scores by default
ONE_ROUND: dict[str, dict[str, Any]] = {"foreign-groups": {"min_rounds": 1}}


def detection_curves(model: nn.Module, data: Examples, poisons: Tensor, run: RunFacts, *,
                     sweeps: Mapping[str, tuple[str, Sequence[float]]] = SWEEPS
                     ) -> list[dict[str, Any]]:
    """One round of each detector of ``sweeps`` on ``model`` at each value of its option.

    Args:
        data: the training set with the poisons in place, without augmentation (what a
            round sees; see :meth:`epic.defenses.ScheduledDefense.update`).
        poisons: ``(P,)`` indices of the poisoned examples in ``data``.
        run: the run's facts (the detectors' defaults follow them, as in training).

    Returns:
        One row per detector and value: ``detector``, ``option``, ``value``, ``default``
        (whether the defense runs with this value), ``poisons_flagged`` of ``poisons``,
        ``clean_flagged`` of ``clean``, and their shares ``recall`` and ``clean_share``.
    """
    n = count_examples(data)
    if n is None:
        raise ValueError("detection curves need a data set of known size")
    poisoned = torch.zeros(n, dtype=torch.bool)
    poisoned[poisons.cpu()] = True
    p = int(poisoned.sum())
    keep = torch.ones(n, dtype=torch.bool)
    rows: list[dict[str, Any]] = []
    for name, (option, values) in sweeps.items():
        # the round is run here, not by a schedule: any that runs in the run will do
        fixed = {"warmup": 0} | ONE_ROUND.get(name, {})
        default = getattr(build_defense(name, run, **fixed), option)  # what it runs with
        embedded: tuple[Tensor, Tensor] | None = None
        for value in values:
            defense = cast(ScheduledDefense, build_defense(name, run, **{option: value} | fixed))
            if embedded is None:  # the same embeddings for every value of the option
                embedded = defense.embed(model, data, keep)
            flagged = torch.zeros(n, dtype=torch.bool)
            flagged[defense.choose(*embedded, keep)[0]] = True
            found, clean = int((flagged & poisoned).sum()), int((flagged & ~poisoned).sum())
            rows.append({"detector": name, "option": option, "value": value,
                         "default": value == default, "poisons_flagged": found, "poisons": p,
                         "clean_flagged": clean, "clean": n - p,
                         "recall": found / max(1, p), "clean_share": clean / max(1, n - p)})
    return rows


def measure_curves(model: Classifier, train_data: ImageData, test_data: ImageData,
                   poisons: PoisonSet, config: TrainConfig, *, at: Sequence[int],
                   sweeps: Mapping[str, tuple[str, Sequence[float]]] = SWEEPS
                   ) -> dict[str, Any]:
    """Train ``model`` undefended on ``train_data`` with ``poisons`` under ``config`` and,
    after each number of epochs in ``at`` (the model a round before that 0-based epoch
    sees), run :func:`detection_curves` on it.

    Returns:
        ``curves``: epochs -> rows of :func:`detection_curves`; the victim's ``test_acc`` and
        ``attack_success`` at the end, and the poison set's ``attack`` and size.
    """
    wrong = sorted(e for e in at if not 0 < e <= config.epochs)
    if wrong:
        raise ValueError(f"curves after {wrong} epochs: a run of {config.epochs} epochs has "
                         f"them after 1 to {config.epochs}")
    data = poisons.apply(train_data)
    run = config.run_facts(len(data), poison_eps=poisons.eps)
    curves: dict[int, list[dict[str, Any]]] = {}

    def probe(epoch: int, _: Mapping[str, Any]) -> None:
        if epoch + 1 in at:
            curves[epoch + 1] = detection_curves(model, data, poisons.indices, run,
                                                 sweeps=sweeps)

    result = train(model, train_data, test_data, config, poisons=poisons, on_epoch_end=probe)
    return {"attack": poisons.metadata.get("attack"), "poisons": len(poisons),
            "test_acc": result.summary["test_acc"],
            "attack_success": result.summary["attack_success"], "curves": curves}


def read_curves(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The results a :func:`write_curves` ``curves.json`` holds, by poison set name (none when
    the file does not exist), each set's curves by number of epochs as :func:`measure_curves`
    gives them; a ValueError naming the file when it is not such a file."""
    if not os.path.exists(path):
        return {}
    results = read_json(path)
    if not isinstance(results, dict) or not all(
            isinstance(r, dict) and isinstance(r.get("curves"), dict)
            and all(isinstance(e, str) and e.isdigit() for e in r["curves"])
            and all(isinstance(r.get(k), (int, float)) for k in ("attack_success", "test_acc"))
            for r in results.values()):
        raise ValueError(f"{path}: not a curves.json written by epic bench curves")
    for r in results.values():  # JSON names the epochs with strings
        r["curves"] = {int(e): rows for e, rows in r["curves"].items()}
    return results


def best_within(rows: Sequence[Mapping[str, Any]], clean_limit: float = CLEAN_LIMIT
                ) -> Mapping[str, Any] | None:
    """Of one detector's rows (:func:`detection_curves`), the one that flags the most poisons
    while flagging at most ``clean_limit`` of the clean examples (of those, the one that
    flags fewest clean); None when every value flags more."""
    within = [r for r in rows if r["clean_share"] <= clean_limit]
    return max(within, key=lambda r: (r["recall"], -r["clean_share"]), default=None)


def curves_markdown(results: Mapping[str, Mapping[str, Any]],
                    clean_limit: float = CLEAN_LIMIT) -> str:
    """Per number of epochs, a table of the poisons each detector flags at best while
    flagging at most ``clean_limit`` of the clean examples, a column per poison set of
    ``results`` (:func:`read_curves`), the clean share it takes in each cell."""
    names = list(results)
    lines = [f"Poisons flagged at best while flagging at most {100 * clean_limit:g}% of the "
             f"clean examples (that share in each cell; –: no value of the option flags so "
             f"few); first, each set's undefended victim.", ""]
    for epochs in sorted({e for r in results.values() for e in r["curves"]}):
        lines += [f"After {epochs} epochs:", "",
                  "| detector (its option) | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names),
                  "| undefended: attack success, accuracy | " + " | ".join(
                      f"{100 * results[n]['attack_success']:.1f}%, "
                      f"{100 * results[n]['test_acc']:.1f}%" for n in names) + " |"]
        curves = {n: results[n]["curves"].get(epochs) for n in names}
        detectors = dict.fromkeys((r["detector"], r["option"]) for rows in curves.values()
                                  if rows for r in rows)
        for detector, option in detectors:
            cells = []
            for n in names:
                best = best_within([r for r in curves[n] or () if r["detector"] == detector],
                                   clean_limit)
                cells.append("–" if best is None else f"{100 * best['recall']:.0f}% @ "
                             f"{100 * best['clean_share']:.1f}%")
            lines.append(f"| {detector} ({option}) | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_curves(results: Mapping[str, Mapping[str, Any]], out: str | os.PathLike[str]
                 ) -> Path:
    """``curves.json`` (``results``: poison set name -> :func:`measure_curves`), its summary
    ``curves.md`` (:func:`curves_markdown`) and per number of epochs ``curves-<epochs>.png``,
    a panel per poison set, in the folder ``out``."""
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    write_atomically(outp / "curves.json", json.dumps(results, indent=1))
    write_atomically(outp / "curves.md", curves_markdown(results))
    for epochs in sorted({e for r in results.values() for e in r["curves"]}):
        plot_curves({f"{name}, after {epochs} epochs": r["curves"][epochs]
                     for name, r in results.items() if epochs in r["curves"]},
                    outp / f"curves-{epochs}.png")
    return outp


def plot_curves(panels: Mapping[str, list[dict[str, Any]]], path: str | os.PathLike[str]
                ) -> None:
    """One panel per title of ``panels`` (rows of :func:`detection_curves`): the share of the
    poisons each detector flags against the share of the clean examples, one line per
    detector over its option, the value it runs with ringed."""
    from epic.bench.report import pyplot

    plt = pyplot()
    cols = min(3, len(panels))
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.6 * rows_n), squeeze=False,
                             sharey=True)
    colours = plt.get_cmap("tab10")
    for ax, (title, rows) in zip(axes.flat, panels.items(), strict=False):
        for i, name in enumerate(dict.fromkeys(r["detector"] for r in rows)):
            mine = [r for r in rows if r["detector"] == name]
            x = [100 * r["clean_share"] for r in mine]
            y = [100 * r["recall"] for r in mine]
            ax.plot(x, y, marker=".", color=colours(i), label=name)
            ax.scatter([a for a, r in zip(x, mine, strict=True) if r["default"]],
                       [b for b, r in zip(y, mine, strict=True) if r["default"]],
                       s=90, facecolors="none", edgecolors=colours(i))
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(0, 100)
        ax.set_ylim(-3, 103)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("clean examples flagged (%)")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("poisons flagged (%)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    ncol = min(len(labels), 2 * cols)
    legend_rows = -(-len(labels) // ncol)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8,
               bbox_to_anchor=(0.5, 0))
    fig.tight_layout(rect=(0, 0.25 * legend_rows / (3.6 * rows_n), 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
