"""Tables, figures and an HTML page from benchmark records and run folders.

Figures follow the paper: attack success against wall time per defense (Fig. 6), the share of
clean examples and of poisons in gradient clusters of each size at EPIC rounds (Figs. 4 and 5),
and the cumulative share of poisons dropped against the share of all examples dropped (Figs. 2
and 3b). matplotlib is needed for the figures (``pip install 'epic-defense[plot]'``).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from epic.defenses import scheduled
from epic.io.files import read_json, replace_atomically, write_atomically
from epic.pages import write_page

__all__ = ["cluster_size_rounds", "defense_label", "defense_labels", "defense_rounds", "detection",
           "detection_markdown", "drop_curve", "paired", "paired_markdown", "plot_effective",
           "sign_test", "summarize", "to_markdown", "write_report"]

SIZE_BUCKETS = ((1, 1), (2, 5), (6, 20), (21, 100), (101, math.inf))


def _mean_se(values: list[Any]) -> tuple[float | None, float | None]:
    """Mean and its standard error (sample standard deviation / sqrt(n); 0 for one value) of
    the values that are not None (a run of zero epochs measures nothing); None, None if none."""
    known = [float(v) for v in values if v is not None]
    n = len(known)
    if n == 0:
        return None, None
    m = sum(known) / n
    if n < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in known) / (n - 1) / n)


def defense_label(record: dict[str, Any]) -> str:
    """The defense of a benchmark record as the report names it: its spec, with
    " (train-pass)" when its rounds took their gradients from the training pass
    (``round_embeddings``) and " (crop+flip)" for a transfer-learning victim trained on
    augmented images (transfer victims train on cached features, without augmentation, unless
    asked), except that a record whose training configuration carries a batch-level
    ``grad_clip`` ran "dp-sgd" when that name meant clipping and noising the mini-batch
    gradient (what ``clip-noise`` is now), and reads "<spec> (batch clip-noise)"."""
    config = record.get("config") or {}
    if config.get("grad_clip") is not None:
        return f"{record['defense']} (batch clip-noise)"
    notes = [note for note, applies in (
        ("train-pass", config.get("round_embeddings") == "train-pass"),
        ("crop+flip", record.get("scenario") == "transfer" and config.get("augment") is True))
        if applies]
    return f"{record['defense']} ({', '.join(notes)})" if notes else str(record["defense"])


def defense_labels(records: list[dict[str, Any]]) -> list[str]:
    """:func:`defense_label` of every record, with " (from epoch W, every E)" added where
    records of one label ran on different schedules (so that a report never pools them)."""
    labels = [defense_label(r) for r in records]
    runs = [(r.get("schedule") or {}) for r in records]
    schedules: dict[str, set[tuple[Any, ...]]] = defaultdict(set)
    for label, run in zip(labels, runs, strict=True):
        schedules[label].add((run.get("warmup"), run.get("every"), run.get("until")))
    return [f"{label} (from epoch {run['warmup']}, every {run.get('every')})"
            if len(schedules[label]) > 1 and run.get("warmup") is not None else label
            for label, run in zip(labels, runs, strict=True)]


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (scenario, attack, defense): ``n`` trials, attack success (the share of
    targets flipped, or of patched source images for backdoors) and test accuracy as mean and
    standard error, mean seconds, and the shares of poisons and of all examples dropped. For
    backdoors also ``patch_free_success``: the same victims on the source images without the
    trigger; for DP-SGD ``dp_epsilon`` (mean) at ``dp_delta``, the privacy spent. Means skip
    trials without the value (null after zero epochs); None when no trial has it. Defenses
    are named by :func:`defense_labels`."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r, label in zip(records, defense_labels(records), strict=True):
        groups[(r["scenario"], r["attack"], label)].append(r)
    rows = []
    for (scenario, attack, defense), rs in sorted(groups.items()):
        succ, succ_se = _mean_se([r["attack_success"] for r in rs])
        acc, acc_se = _mean_se([r["test_acc"] for r in rs])
        poisons = sum(r.get("poisons", 0) for r in rs)
        row = {
            "scenario": scenario, "attack": attack, "defense": defense, "n": len(rs),
            "attack_success": succ, "attack_success_se": succ_se, "test_acc": acc,
            "test_acc_se": acc_se, "seconds": sum(float(r["seconds"]) for r in rs) / len(rs),
            "poisons_dropped": sum(r.get("poisons_dropped", 0) for r in rs) / max(poisons, 1),
            "examples_dropped": sum(r.get("examples_dropped", 0) for r in rs)
            / max(sum(r.get("examples", 0) for r in rs), 1),
        }
        free = [r.get("patch_free_success") for r in rs]
        if any(v is not None for v in free):
            row["patch_free_success"], row["patch_free_success_se"] = _mean_se(free)
        epsilon = _mean_se([r.get("dp_epsilon") for r in rs])[0]
        if epsilon is not None:
            row["dp_epsilon"], row["dp_delta"] = epsilon, max(r.get("dp_delta") or 0 for r in rs)
        rows.append(row)
    return rows


def detection(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What each defense dropped, as a detector: one row per (attack, poison count, defense),
    with ``recall`` (the share of poisons dropped), ``clean_flagged`` (the share of clean
    examples dropped) and ``precision`` (the share of the dropped that were poisons), each
    pooled over the row's trials, and ``n``. Only defenses that drop examples (on a
    schedule) are detectors: the undefended trials and DP-SGD are left out."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = defaultdict(list)
    for r, label in zip(records, defense_labels(records), strict=True):
        if scheduled(str(r["defense"])) and "poisons" in r and "examples" in r:
            groups[(r["attack"], int(r["poisons"]), label)].append(r)
    rows = []
    for (attack, poisons, defense), rs in sorted(groups.items()):
        hit = sum(r.get("poisons_dropped", 0) for r in rs)
        dropped = sum(r.get("examples_dropped", 0) for r in rs)
        clean = sum(r["examples"] - r["poisons"] for r in rs)
        rows.append({"attack": attack, "poisons": poisons, "defense": defense, "n": len(rs),
                     "recall": hit / max(poisons * len(rs), 1),
                     "clean_flagged": (dropped - hit) / max(clean, 1),
                     "precision": hit / dropped if dropped else None})
    return rows


def sign_test(higher: int, lower: int) -> float:
    """The two-sided exact sign test's p-value for ``higher`` pairs against ``lower`` (ties
    left out): the chance, were either side equally likely in each pair, of a split at least
    this uneven. 1.0 when no pair differs.

    Example:
        >>> round(sign_test(5, 0), 4), sign_test(2, 2)
        (0.0625, 1.0)
    """
    n, k = higher + lower, min(higher, lower)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired(records: list[dict[str, Any]], against: str) -> list[dict[str, Any]]:
    """Each defense against the defense labelled ``against`` (:func:`defense_labels`) on the
    same victims: the pairs of trials with the same scenario, attack, poison set and seed, each
    side run once. One row per (scenario, attack, defense) with pairs: ``pairs``, the mean
    difference in attack success (the defense's minus ``against``'s) and its standard error,
    in how many pairs the defense's is ``higher``, ``equal`` and ``lower``, and ``p``, the
    :func:`sign_test` over the pairs that differ. Where an attack's outcome moves with the
    seed by more than defenses move it, the mean of each defense apart hides what the pairs
    show."""
    trials: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r, label in zip(records, defense_labels(records), strict=True):
        if r.get("poisons_dir") is not None and r.get("seed") is not None:
            trials[(r["scenario"], r["attack"], label, r["poisons_dir"], r["seed"])].append(r)
    differences: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for (scenario, attack, label, poisons, seed), rs in trials.items():
        base = trials.get((scenario, attack, against, poisons, seed), [])
        if label != against and len(rs) == 1 == len(base):
            differences[(scenario, attack, label)].append(
                float(rs[0]["attack_success"]) - float(base[0]["attack_success"]))
    rows = []
    for (scenario, attack, label), diffs in sorted(differences.items()):
        mean, se = _mean_se(diffs)
        higher, lower = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
        rows.append({"scenario": scenario, "attack": attack, "defense": label,
                     "against": against, "pairs": len(diffs), "difference": mean,
                     "difference_se": se, "higher": higher,
                     "equal": len(diffs) - higher - lower, "lower": lower,
                     "p": sign_test(higher, lower)})
    return rows


def paired_markdown(rows: list[dict[str, Any]]) -> str:
    """:func:`paired` rows as a Markdown table (differences in percentage points)."""
    lines = ["| scenario | attack | defense | against | pairs | attack success difference | "
             "higher / equal / lower | sign test p |", "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['attack']} | {r['defense']} | {r['against']} | "
                     f"{r['pairs']} | {100 * r['difference']:+.1f} ± "
                     f"{100 * r['difference_se']:.1f} points | {r['higher']} / {r['equal']} / "
                     f"{r['lower']} | {r['p']:.3g} |")
    return "\n".join(lines)


def detection_markdown(rows: list[dict[str, Any]]) -> str:
    """:func:`detection` rows as a Markdown table."""
    lines = ["| attack | poisons | defense | n | poisons dropped (recall) | clean examples "
             "dropped | precision |", "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        precision = "–" if r["precision"] is None else f"{100 * r['precision']:.1f}%"
        lines.append(f"| {r['attack']} | {r['poisons']} | {r['defense']} | {r['n']} | "
                     f"{100 * r['recall']:.1f}% | {100 * r['clean_flagged']:.2f}% | "
                     f"{precision} |")
    return "\n".join(lines)


def _detection_figure(rows: list[dict[str, Any]], path: Path) -> None:
    """Share of poisons dropped against share of clean examples dropped, a marker per
    defense, a panel per attack, the poison count by each marker."""
    plt = pyplot()
    attacks = sorted({r["attack"] for r in rows})
    defenses = sorted({r["defense"] for r in rows})
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.5 * len(attacks), 4.2), squeeze=False)
    markers = "os^vD<>pP*Xh"
    handles: dict[str, Any] = {}  # one legend entry per defense, the same look in every panel
    for ax, attack in zip(axes[0], attacks, strict=True):
        for i, defense in enumerate(defenses):
            pts = [r for r in rows if r["attack"] == attack and r["defense"] == defense]
            if not pts:
                continue
            handles[defense] = ax.scatter(
                [100 * r["clean_flagged"] for r in pts], [100 * r["recall"] for r in pts],
                marker=markers[i % len(markers)], color=f"C{i % 10}", label=defense, alpha=0.8)
            for r in pts:
                ax.annotate(str(r["poisons"]), (100 * r["clean_flagged"], 100 * r["recall"]),
                            fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_title(attack, fontsize=9)
        ax.set_xlabel("% of clean examples dropped")
        ax.set_ylabel("% of poisons dropped")
        ax.set_ylim(-3, 103)
    axes[0][-1].legend([handles[d] for d in defenses if d in handles],
                       [d for d in defenses if d in handles], fontsize=6, loc="upper left",
                       bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    replace_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table (mean ± standard error); a last column gives the
    privacy spent when a row has it (DP-SGD)."""
    private = any(r.get("dp_epsilon") is not None for r in rows)
    head = ("| scenario | attack | defense | n | attack success | test acc | seconds | "
            "poisons dropped | examples dropped |" + (" epsilon (delta) |" if private else "")
            + "\n|---|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if private else ""))
    lines = [head]
    for r in rows:
        free = r.get("patch_free_success")
        epsilon = (f" {r['dp_epsilon']:.3g} ({r['dp_delta']:g}) |" if r.get("dp_epsilon")
                   is not None else " – |") if private else ""
        lines.append(
            f"| {r['scenario']} | {r['attack']} | {r['defense']} | {r['n']} | "
            f"{_mean_pm(r, 'attack_success', 1)}"
            + ("" if free is None else f" (no patch: {100 * free:.1f}%)") + " | "
            f"{_mean_pm(r, 'test_acc', 2)} | {r['seconds']:.1f} | "
            f"{100 * r['poisons_dropped']:.1f}% | {100 * r['examples_dropped']:.2f}% |"
            + epsilon)
    return "\n".join(lines)


def _mean_pm(row: dict[str, Any], name: str, digits: int) -> str:
    """``row[name]`` in percent ± its standard error; "–" when no trial measured it."""
    mean, se = row[name], row[name + "_se"]
    return "–" if mean is None else f"{100 * mean:.{digits}f}% ± {100 * se:.{digits}f}"


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _histogram(value: Any) -> bool:
    return isinstance(value, dict) and all(_count(c) for c in value.values())


# field of a defense round -> (its check, required)
_ROUND_FIELDS = {"epoch": (_count, True), "dropped": (lambda v: isinstance(v, list), True),
                 "cluster_size_histogram": (_histogram, False),
                 "poisons_dropped": (_count, False),
                 "poison_cluster_size_histogram": (_histogram, False)}


def defense_rounds(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rounds of ``run_dir/defense.json``, each checked for the fields the report uses.

    Raises:
        ValueError: not a list of rounds; the message names the file, the round and field.
    """
    path = Path(run_dir) / "defense.json"
    rounds = read_json(path)
    if not isinstance(rounds, list):
        raise ValueError(f"{path}: expected a list of defense rounds")
    for i, r in enumerate(rounds):
        for name, (valid, required) in _ROUND_FIELDS.items():
            if not isinstance(r, dict) or (name in r or required) and not valid(r.get(name)):
                raise ValueError(f"{path}: round {i} '{name}' is missing or malformed")
    return rounds


def drop_curve(run_dir: str | os.PathLike[str]) -> list[tuple[int, float, float]]:
    """``(epoch, share of all examples dropped, share of poisons dropped)``, cumulative, per
    defense round of a run folder that trained on poisons.

    Raises:
        ValueError: ``defense.json`` or ``summary.json`` is malformed (named with the field).
    """
    run = Path(run_dir)
    rounds = defense_rounds(run)
    summary = read_json(run / "summary.json")
    if (not isinstance(summary, dict) or not _count(summary.get("examples"))
            or not _count(summary.get("poisons", 0))):
        raise ValueError(f"{run / 'summary.json'}: 'examples' and 'poisons' must be counts")
    n, p = max(summary["examples"], 1), max(summary.get("poisons", 0), 1)
    curve, all_dropped, poisons_dropped = [], 0, 0
    for r in rounds:
        all_dropped += len(r["dropped"])
        poisons_dropped += r.get("poisons_dropped", 0)
        curve.append((r["epoch"], all_dropped / n, poisons_dropped / p))
    return curve


def _bucket_shares(hist: dict[str, int]) -> list[float]:
    total = sum(hist.values()) or 1
    shares = []
    for lo, hi in SIZE_BUCKETS:
        shares.append(sum(c for s, c in hist.items() if lo <= int(s) <= hi) / total)
    return shares


def _bucket_label(lo: int, hi: float) -> str:
    return str(lo) if lo == hi else (f">{lo - 1}" if math.isinf(hi) else f"{lo}-{int(hi)}")


def pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("figures need matplotlib: pip install 'epic-defense[plot]'") from exc
    return plt


def plot_effective(distances: Any, effective: Any, path: str | os.PathLike[str]) -> None:
    """Histogram of poisons' gradient distance to the target, effective vs. not (Fig. 1a)."""
    plt = pyplot()
    d = [float(v) for v in distances]
    eff = [bool(v) for v in effective]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist([x for x, e in zip(d, eff, strict=True) if e], bins=20, alpha=0.7,
            label=f"effective ({sum(eff)})", color="tab:red")
    ax.hist([x for x, e in zip(d, eff, strict=True) if not e], bins=20, alpha=0.7,
            label=f"ineffective ({len(eff) - sum(eff)})", color="tab:purple")
    ax.set_xlabel("last-layer gradient distance to the adversarial target")
    ax.set_ylabel("poisons")
    ax.legend()
    fig.tight_layout()
    replace_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def _time_scale(seconds: list[float]) -> str:
    """A logarithmic time axis where the runs span more than two orders of magnitude (victims
    of seconds on cached features beside ones of half an hour), so that neither end is a
    single pile of points; a linear one otherwise."""
    positive = [s for s in seconds if s > 0]
    return "log" if positive and max(positive) > 100 * min(positive) else "linear"


def _success_vs_time(rows: list[dict[str, Any]], path: Path) -> None:
    """Attack success (± standard error) against wall time: a colour per defense, a marker
    per attack, and a legend for both instead of labels on the points."""
    plt = pyplot()
    shown = [r for r in rows if r["attack_success"] is not None]  # not only zero-epoch runs
    defenses = sorted({r["defense"] for r in shown})
    attacks = sorted({(r["scenario"], r["attack"]) for r in shown})
    colours = plt.get_cmap("tab20" if len(defenses) > 10 else "tab10")
    markers = "osD^vP*Xhp"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in shown:
        ax.errorbar(r["seconds"], 100 * r["attack_success"],
                    yerr=100 * (r["attack_success_se"] or 0), fmt=markers[
                        attacks.index((r["scenario"], r["attack"])) % len(markers)],
                    color=colours(defenses.index(r["defense"]) % colours.N), markersize=7,
                    capsize=2, alpha=0.85)
    handles = [plt.Line2D([], [], linestyle="", marker="o", color=colours(i % colours.N),
                          label=d) for i, d in enumerate(defenses)]
    handles += [plt.Line2D([], [], linestyle="", marker=markers[i % len(markers)],
                           color="black", label=f"{a} ({sc})")
                for i, (sc, a) in enumerate(attacks)]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_xscale(_time_scale([r["seconds"] for r in shown]))
    ax.set_xlabel("wall time per run (s)")
    ax.set_ylabel("attack success (%, ± s.e.)")
    ax.set_title("Attack success vs. time")
    fig.tight_layout()
    replace_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def _epic_runs(records: list[dict[str, Any]], trials: Path | None
               ) -> list[tuple[dict[str, Any], Path]]:
    """The EPIC trials of ``records`` whose run folder has a ``defense.json`` (read, or refused
    by name, later), with that folder."""
    runs = [(r, _run_folder(r, trials)) for r in records if str(r["defense"]).startswith("epic")]
    return [(r, run) for r, run in runs if (run / "defense.json").exists()]


def cluster_size_rounds(records: list[dict[str, Any]], trials: Path | None = None
                        ) -> dict[tuple[str, str], dict[int, dict[str, dict[str, int]]]]:
    """Per (attack, EPIC defense label) and round epoch, the cluster sizes of the clean
    examples and of the poisons summed over that defense's trials, from the ``defense.json``
    of their run folders (in ``trials`` for a store from elsewhere, see :func:`write_report`):
    ``{"clean": {size: count}, "poisons": {size: count}}``."""
    out: dict[tuple[str, str], dict[int, dict[str, dict[str, int]]]] = defaultdict(dict)
    for r, run in _epic_runs(records, trials):
        for rnd in defense_rounds(run):
            allh = rnd.get("cluster_size_histogram") or {}
            poih = rnd.get("poison_cluster_size_histogram") or {}
            sums = out[(str(r["attack"]), defense_label(r))].setdefault(
                int(rnd["epoch"]), {"clean": defaultdict(int), "poisons": defaultdict(int)})
            for size, count in allh.items():
                sums["clean"][size] += int(count) - int(poih.get(size, 0))
            for size, count in poih.items():
                sums["poisons"][size] += int(count)
    return out


def _cluster_sizes(records: list[dict[str, Any]], path: Path, trials: Path | None, *,
                   most: int = 6) -> str | None:
    """The paper's Figs. 4 and 5 from committed run folders: a row per (attack, EPIC
    setting), the first, middle and last round as columns; None without EPIC rounds."""
    plt = pyplot()
    found = {k: v for k, v in sorted(cluster_size_rounds(records, trials).items()) if v}
    if not found:
        return None
    shown = list(found.items())[:most]
    fig, axes = plt.subplots(len(shown), 3, figsize=(12, 2.8 * len(shown)), squeeze=False)
    labels = [_bucket_label(lo, hi) for lo, hi in SIZE_BUCKETS]
    xs = range(len(labels))
    for row, ((attack, defense), rounds) in zip(axes, shown, strict=True):
        epochs = sorted(rounds)
        picks = sorted({epochs[0], epochs[len(epochs) // 2], epochs[-1]})
        for ax in row[len(picks):]:
            ax.axis("off")
        for ax, epoch in zip(row, picks, strict=False):
            sums = rounds[epoch]
            ax.bar([x - 0.2 for x in xs], _bucket_shares(sums["clean"]), 0.4, label="clean",
                   color="tab:blue")
            ax.bar([x + 0.2 for x in xs], _bucket_shares(sums["poisons"]), 0.4,
                   label="poisons", color="tab:red")
            ax.set_xticks(list(xs), labels)
            ax.set_title(f"{attack}, {defense}: round at epoch {epoch}", fontsize=9)
        row[0].set_ylabel("share of examples")
    axes[0][0].legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("gradient cluster size")
    fig.tight_layout()
    replace_atomically(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    names = ", ".join(f"{a} under {d}" for (a, d), _ in shown)
    return (f"Share of clean examples and of poisons by gradient cluster size at EPIC's rounds "
            f"(first, middle, last), summed over the trials of each row: {names} "
            f"(paper Figs. 4, 5)")


def _run_folder(record: dict[str, Any], trials: Path | None) -> Path:
    """The run folder of ``record``: its ``run_dir``, or with ``trials`` (a store from
    elsewhere) the folder of that name in ``trials``, so a record cannot point the report at
    any other folder (``../..``)."""
    if trials is None:
        return Path(record["run_dir"])
    name = Path(record["run_dir"]).name
    if name in ("", ".", ".."):
        raise ValueError(f"'run_dir' {record['run_dir']!r} of trial {record['key']!r} names "
                         f"no run folder")
    return trials / name


def _figures(records: list[dict[str, Any]], rows: list[dict[str, Any]],
             found: list[dict[str, Any]], out: Path, trials: Path | None
             ) -> list[tuple[str, Path]]:
    plt = pyplot()
    figures = []
    path = out / "success_vs_time.png"
    _success_vs_time(rows, path)
    figures.append(("Attack success against wall time, per defense (paper Fig. 6)", path))

    path = out / "cluster_sizes.png"
    caption = _cluster_sizes(records, path, trials)
    if caption is not None:
        figures.append((caption, path))

    if found:
        path = out / "detection.png"
        _detection_figure(found, path)
        figures.append(("Each defense as a detector: poisons dropped against clean examples "
                        "dropped, per poison set (its size by the marker)", path))

    epic_runs = _epic_runs(records, trials)
    if epic_runs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        curves = [(r["key"], drop_curve(run)) for r, run in epic_runs[:8]]
        for key, curve in curves:
            ax.plot([0] + [c[1] for c in curve], [0] + [c[2] for c in curve], marker="o",
                    label=key, alpha=0.8)
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
        widest = max((c[-1][1] for _, c in curves if c), default=0.0)
        ax.set_xlim(0, max(0.05, 1.2 * widest))
        ax.set_xlabel("share of all examples dropped")
        ax.set_ylabel("share of poisons dropped")
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
        path = out / "drop_curve.png"
        fig.tight_layout()
        replace_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120))
        plt.close(fig)
        figures.append(("Cumulative share of poisons dropped vs. all examples dropped "
                        "(paper Figs. 2, 3b)", path))
    return figures


def write_report(records: list[dict[str, Any]], out: str | os.PathLike[str], *,
                 trials: str | os.PathLike[str] | None = None,
                 against: Sequence[str] = ("none",)) -> Path:
    """Write ``summary.md``, ``summary.json``, ``detection.md`` and ``detection.json`` (each
    defense as a detector, :func:`detection`), ``paired.md`` and ``paired.json`` (every
    defense against each of ``against`` on the same victims, :func:`paired`), the figures and
    ``report.html`` to ``out``.

    ``trials``: the folder holding the run folders (``trials/`` beside a store's
    ``results.jsonl``); the records' ``run_dir`` then only names a folder in it. By default
    ``run_dir`` is followed as written (records of your own).

    Raises:
        ValueError: a run folder's ``defense.json`` or ``summary.json`` is malformed or not a
            regular file; the message names the file and the field.
    """
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    rows = summarize(records)
    write_atomically(outp / "summary.json", json.dumps(rows, indent=2))
    table = to_markdown(rows)
    write_atomically(outp / "summary.md", table + "\n")
    found = detection(records)
    write_atomically(outp / "detection.json", json.dumps(found, indent=2))
    write_atomically(outp / "detection.md", detection_markdown(found) + "\n")
    pairs = [row for spec in against for row in paired(records, spec)]
    write_atomically(outp / "paired.json", json.dumps(pairs, indent=2))
    write_atomically(outp / "paired.md", paired_markdown(pairs) + "\n")
    figures = (_figures(records, rows, found, outp, None if trials is None else Path(trials))
               if records else [])
    parts = ["<h1>Benchmark report</h1>", f"<p>{len(records)} trials.</p><table><tr>"]
    cols = ["scenario", "attack", "defense", "n", "attack_success", "test_acc", "seconds",
            "poisons_dropped", "examples_dropped"]
    if any(r.get("patch_free_success") is not None for r in rows):
        cols.insert(5, "patch_free_success")
    if any(r.get("dp_epsilon") is not None for r in rows):
        cols.append("dp_epsilon")
    parts.append("".join(f"<th>{c}</th>" for c in cols) + "</tr>")
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if v is None:  # no trial of the row measured it
                text = "–"
            elif c + "_se" in r:  # a mean over trials: with its standard error
                text = _mean_pm(r, c, 1)
            elif c in ("poisons_dropped", "examples_dropped"):
                text = f"{100 * v:.1f}%"
            else:
                text = f"{v:.1f}" if isinstance(v, float) else str(v)
            cells.append(f"<td>{html.escape(text)}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    if pairs:
        parts.append("<h2>Paired: the same poison sets and seeds</h2>"
                     + _html_table(paired_markdown(pairs)))
    for caption, path in figures:
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<figure><img src='data:image/png;base64,{data}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    page = outp / "report.html"
    write_page(page, "epic benchmark", "\n".join(parts), style=_STYLE)
    return page


def _html_table(markdown: str) -> str:
    """A Markdown table of this module's (no pipes inside cells) as an HTML table."""
    head, _, *body = ([html.escape(c.strip()) for c in line.strip("|").split("|")]
                      for line in markdown.splitlines())
    return ("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in body)
            + "</table>")


_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:auto}"
          "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
          "td{text-align:right}")
