"""``epic bench``: run trials into a result store, report it, rerun a row, find the effective
poisons of a set. The work is :mod:`epic.bench`'s; this module turns options into its calls."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from epic.bench.curves import measure_curves, read_curves, write_curves
from epic.bench.effective import measure_effective, write_effective
from epic.bench.presets import PRESETS, run_preset
from epic.bench.report import (
    defense_labels,
    paired,
    paired_markdown,
    summarize,
    to_markdown,
    write_report,
)
from epic.bench.runner import HOW, compare_rerun, rerun_defense, run_trials
from epic.bench.schema import setting_path
from epic.bench.store import ResultStore
from epic.cli.argtypes import at_least, number
from epic.cli.common import (
    add_data_args,
    add_round_embeddings_arg,
    add_setup_args,
    add_train_args,
    chosen_setups,
    load_data,
    make_model,
    parse_command,
    pick_device,
    run_command,
    train_config,
)
from epic.formats import read_poisons
from epic.setups import SetupError, victim_data

__all__ = ["SETTING", "add_bench_commands", "trial_setting"]


def add_bench_commands(sub: Any) -> None:
    """Register ``bench`` (with ``run`` and ``report``) on the ``epic`` subcommand parser."""
    p = sub.add_parser("bench", help="benchmark defenses against poison sets; report",
                       description="Train once per poison set x defense x seed, store attack "
                                   "success, accuracy and time, and turn the store into tables, "
                                   "figures and an HTML page.")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    _add_run(bsub)
    _add_effective(bsub)
    _add_curves(bsub)
    _add_report(bsub)
    _add_rerun(bsub)


def _add_run(bsub: Any) -> None:
    r = bsub.add_parser("run", help="run trials (skips those already in the store)",
                        description="Run trials; each poison set is a folder written by "
                                    "`epic craft`. Resumable: finished trials are skipped.")
    add_data_args(r)
    add_train_args(r)
    g = r.add_argument_group("benchmark")
    g.add_argument("--poisons", nargs="+", default=None, metavar="DIR",
                   help="poison set folders (required unless --preset)")
    g.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="run a whole CPU-scale evidence run of docs/results.md into --out: "
                        "build the attacker's model, craft per setup, train every defense "
                        "(resumable; prints each command; takes --data-dir, --first and "
                        "--defenses, ignores the other options)")
    g.add_argument("--defenses", nargs="+", default=["none", "epic-0.1"],
                   help="defenses as epic train --defense names them (none, epic, deep-knn, "
                        "spectral-signatures, activation-clustering, lowest-confidence, "
                        "highest-loss, random, dp-sgd, clip-noise, adversarial-poisoning), "
                        "with epic-<fraction> and ap-<share> for EPIC and Adversarial "
                        "Poisoning at a setting, random-as-<defense> (as many random drops "
                        "as that defense's trial made) and retrain-after-<defense> (a fresh "
                        "model without all it dropped) (default: none epic-0.1)")
    g.add_argument("--seeds", nargs="+", type=at_least(0), default=[0],
                   help="training seeds (default: 0)")
    g.add_argument("--warmup", type=at_least(0), default=None,
                   help="epochs before a defense's first round (default: the paper's, "
                        "100 x fraction for EPIC)")
    g.add_argument("--every", type=at_least(1), default=None,
                   help="epochs between rounds (default: epochs/20; 1 in transfer learning)")
    g.add_argument("--until", type=at_least(1), default=None,
                   help="no rounds from this epoch on (default: the last lr milestone)")
    add_round_embeddings_arg(g)
    g.add_argument("--out", default="bench", help="folder for results.jsonl and trial runs")
    g.add_argument("--progress", action="store_true", help="show a progress bar per trial")
    g.add_argument("--json", action="store_true", help="print the summary rows as JSON last")
    add_setup_args(r)
    r.set_defaults(handler=cmd_run)


def _add_effective(bsub: Any) -> None:
    e = bsub.add_parser("effective", help="find the effective poisons of a poison set",
                        description="Order the poisons by last-layer gradient distance to the "
                                    "adversarial target and bisect on the shortest prefix that "
                                    "alone makes the attack succeed (paper Sec. 3.2); about "
                                    "log2(P)+2 training runs. Writes effective.json and "
                                    "effective.png to --out.")
    add_data_args(e)
    add_train_args(e)
    e.add_argument("--poisons", required=True, metavar="PATH",
                   help="poison set, in any format epic reads (as epic train --poisons)")
    e.add_argument("--threshold", type=number(0, 1), default=0.5,
                   help="attack counts as successful above this success rate (default: 0.5)")
    e.add_argument("--out", default="effective", help="output folder")
    e.add_argument("--json", action="store_true", help="print the result as JSON last")
    e.set_defaults(handler=cmd_effective)


def _add_curves(bsub: Any) -> None:
    c = bsub.add_parser("curves", help="what each detector flags as its threshold moves",
                        description="Per poison set, train the victim undefended and, after "
                                    "each number of epochs given, run one round of every "
                                    "detector at each value of its threshold: the share of the "
                                    "poisons it flags against the share of the clean examples. "
                                    "Writes curves.json and curves-<epochs>.png to --out; a set "
                                    "it holds, measured with the same options, is skipped.")
    add_data_args(c)
    add_train_args(c)
    c.add_argument("--poisons", nargs="+", required=True, metavar="PATH",
                   help="poison sets, in any format epic reads (as epic train --poisons)")
    c.add_argument("--at", nargs="+", type=at_least(1), required=True, metavar="EPOCHS",
                   help="after how many epochs to measure (a round before that 0-based "
                        "epoch sees this model)")
    c.add_argument("--out", default="curves", help="output folder")
    c.set_defaults(handler=cmd_curves)


def _add_report(bsub: Any) -> None:
    rep = bsub.add_parser("report", help="tables, figures and report.html from a store",
                          description="Summarize results.jsonl into summary.md, summary.json, "
                                      "figures and a self-contained report.html.")
    rep.add_argument("store", help="a results.jsonl written by `epic bench run`")
    rep.add_argument("--out", default=None, help="output folder (default: beside the store)")
    rep.add_argument("--against", nargs="+", default=None, metavar="DEFENSE",
                     help="compare every defense with these on the same poison sets and "
                          "seeds, pair by pair (paired.md; default: none, the undefended "
                          "victims, where the store has them)")
    rep.add_argument("--json", action="store_true", help="print the summary rows as JSON last")
    rep.set_defaults(handler=cmd_report)


def _add_rerun(bsub: Any) -> None:
    rerun = bsub.add_parser("rerun", help="rerun one stored trial from scratch and compare",
                            description="Rerun the trial on line ROW (0-based) of a "
                                        "results.jsonl with the command line that produced "
                                        "it, in a fresh folder, and say whether attack "
                                        "success and test accuracy come out identical (they "
                                        "do on the CPU).")
    rerun.add_argument("store", help="a results.jsonl written by `epic bench run`")
    rerun.add_argument("row", type=at_least(0), help="0-based row of the store")
    rerun.add_argument("--out", default=None,
                       help="folder for the rerun (default: a temporary folder, removed after)")
    rerun.add_argument("--data-dir", default=None,
                       help="the data folder here, when it is not where the stored command "
                            "found it (paths under the stored --data-dir move with it)")
    rerun.add_argument("--json", action="store_true", help="print the comparison as JSON last")
    rerun.set_defaults(handler=cmd_rerun)


def cmd_run(args: argparse.Namespace) -> int:
    if args.preset is not None:
        data_dir = args.data_dir or os.environ.get("EPIC_DATA_DIR")
        if data_dir is None:
            raise ValueError("--preset needs --data-dir (or EPIC_DATA_DIR)")
        explicit = args.defenses if "--defenses" in args.argv else None
        run_preset(args.preset, data_dir=data_dir, out=args.out, first=args.first,
                   defenses=explicit, run=lambda argv: run_command(args.parser, argv))
        return cmd_report(argparse.Namespace(store=str(Path(args.out) / "bench" /
                                                       "results.jsonl"), out=None,
                                             against=None, json=args.json))
    if not args.poisons:
        raise ValueError("bench run needs --poisons DIR ... (or --preset)")
    store = ResultStore(Path(args.out) / "results.jsonl")
    _run(args, store)
    rows = summarize(store.load())
    print(to_markdown(rows))
    if args.json:
        print(json.dumps(rows))
    return 0


# The options that choose the model and the data a benchmark's trials train on: with the
# trial's own facts they define it (epic.bench.trial_id); paths among them are resolved and
# stored relative to the current directory (epic.bench.schema.setting_path).
SETTING = ("dataset", "subset", "test_subset", "model", "pretrained", "setups",
           "victim_per_class", "exact_test")
_PATHS = ("pretrained", "setups")


def trial_setting(args: argparse.Namespace) -> dict[str, Any]:
    """The setting of ``epic bench run`` ``args`` (:data:`SETTING`) as its records store it
    (None for an option the command does not take)."""
    setting: dict[str, Any] = {name: getattr(args, name, None) for name in SETTING}
    return setting | {name: setting_path(setting[name]) for name in _PATHS
                      if setting[name] is not None}


def _run(args: argparse.Namespace, store: ResultStore,
         how: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run the trials ``args`` plan; ``how``: the stored row's ``head_rng`` and ``min_batch``
    for a rerun (:data:`epic.bench.runner.HOW`: the trainer runs it as it ran), today's
    defaults else."""
    device = pick_device(args.device)
    train_data, test_data = load_data(args)
    config = train_config(args, **(how or {}))

    def fresh(seed: int) -> Any:
        return make_model(argparse.Namespace(**(vars(args) | {"seed": seed})), train_data,
                          device, head_rng=config.head_rng)

    return run_trials(args.poisons, args.defenses, seeds=args.seeds, train_data=train_data,
               test_data=test_data, make_model=fresh, config=config,
               setting=trial_setting(args), store=store, out=args.out,
               warmup=args.warmup, every=args.every, until=args.until, progress=args.progress,
               victim_for=_victim_for(args, train_data), context={"argv": args.argv})


def _victim_for(args: argparse.Namespace, train_data: Any) -> Any:
    """With ``--setups``: poison set -> the victim set of the setup it was crafted for."""
    if args.setups is None:
        return None
    setups = {s.id: s for s in chosen_setups(args)}

    def victim(poisons: Any) -> Any:
        facts = poisons.metadata.get("setup")
        if not isinstance(facts, dict) or facts.get("id") not in setups:
            raise SetupError(f"poison set crafted for setup {facts and facts.get('id')}, "
                             f"which is not among the setups chosen from {args.setups}")
        return victim_data(train_data, setups[facts["id"]], scenario=args.scenario,
                           per_class=args.victim_per_class)[0]

    return victim


def cmd_effective(args: argparse.Namespace) -> int:
    train_data, test_data = load_data(args)
    poisons = read_poisons(args.poisons, train_data)
    result = measure_effective(make_model(args, train_data, pick_device(args.device)),
                               train_data, test_data, poisons, train_config(args),
                               threshold=args.threshold, pretrained=args.pretrained is not None)
    out = write_effective(result, args.out)
    print(f"{result['effective']} of {result['poisons']} poisons are effective "
          f"({result['training_runs']} training runs); results in {out}")
    if args.json:
        print(json.dumps({k: v for k, v in result.items()
                          if k not in ("distances", "effective_rows")}))
    return 0


def cmd_curves(args: argparse.Namespace) -> int:
    train_data, test_data = load_data(args)
    device = pick_device(args.device)
    config = train_config(args)
    # what the curves of a set were measured with: a set already measured so is not again
    how = json.loads(json.dumps({"at": sorted(args.at), "config": dataclasses.asdict(config),
                                 "setting": trial_setting(args)}))
    results = read_curves(Path(args.out) / "curves.json")
    for path in args.poisons:
        name = Path(path).name
        if {k: results.get(name, {}).get(k) for k in how} == how:
            print(f"{path}: measured already", flush=True)
            continue
        poisons = read_poisons(path, train_data)
        results[name] = measure_curves(make_model(args, train_data, device), train_data,
                                       test_data, poisons, config, at=args.at) | how
        write_curves(results, args.out)
        print(f"{path}: measured after {', '.join(map(str, args.at))} epochs", flush=True)
    print(f"curves in {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    store = ResultStore(args.store)
    records = store.load()
    if not records:
        raise ValueError(f"no records in {args.store}")
    against = args.against or ["none"]
    labels = set(defense_labels(records))
    if args.against and not labels.issuperset(against):
        raise ValueError(f"--against {' '.join(sorted(set(against) - labels))}: no such defense "
                         f"in {args.store}; it has {', '.join(sorted(labels))}")
    page = write_report(records, args.out or Path(args.store).parent / "report",
                        trials=Path(args.store).parent / "trials", against=against)
    rows = summarize(records)
    print(to_markdown(rows))
    pairs = [row for spec in against for row in paired(records, spec)]
    if pairs:
        print(paired_markdown(pairs))
    print(f"report: {page}")
    if store.skipped:
        print(f"({store.skipped} unreadable lines skipped)")
    if args.json:
        print(json.dumps(rows))
    return 0


def cmd_rerun(args: argparse.Namespace) -> int:
    records = ResultStore(args.store).load()
    if not 0 <= args.row < len(records):
        raise ValueError(f"{args.store} has rows 0..{len(records) - 1}, not {args.row}")
    old = records[args.row]
    if not isinstance(old.get("argv"), list):
        raise ValueError(f"row {args.row} of {args.store} does not record its command line")
    argv = list(old["argv"])
    if argv[:2] != ["bench", "run"]:
        raise ValueError(f"row {args.row} of {args.store}: 'argv' is not an `epic bench run` "
                         f"command line: {' '.join(argv)[:120]!r}")
    if "--data-dir" in argv and argv.index("--data-dir") == len(argv) - 1:
        raise ValueError(f"row {args.row} of {args.store}: 'argv' ends at --data-dir")
    if args.data_dir is not None and "--data-dir" in argv:
        stored = argv[argv.index("--data-dir") + 1]
        argv = [args.data_dir + a[len(stored):] if a.startswith(stored) else a for a in argv]
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        again = parse_command(args.parser, argv)
        for name, value in {"poisons": [old["poisons_dir"]], "defenses": [rerun_defense(old)],
                            "seeds": [old["seed"]], "out": out, "progress": False}.items():
            setattr(again, name, value)
        written = _run(again, ResultStore(Path(out) / "results.jsonl"),
                       how={k: old["config"][k] for k in HOW})
        if not written:
            raise ValueError(f"{out} already holds this trial: rerun into an empty --out")
        new = written[0]
    result = {"row": args.row} | compare_rerun(old, new)
    print(f"row {args.row} ({old['key']}): {result['verdict']}")
    if args.json:
        print(json.dumps(result))
    return 0 if result["reproduced"] else 1
