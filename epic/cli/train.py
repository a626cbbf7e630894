"""``epic train``: train a classifier, optionally poisoned and defended (also under torchrun)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

import torch

from epic.cli.argtypes import number, setting
from epic.cli.common import (
    add_data_args,
    add_epic_args,
    add_train_args,
    epic_settings,
    load_data,
    make_model,
    output_folder,
    pick_device,
    train_config,
)
from epic.defenses import DEFENSES, Defense, RunFacts, build_defense, options_for
from epic.distributed import init_from_env, world
from epic.formats import read_poisons
from epic.setups import load_setups, outside_victims
from epic.training import train

__all__ = ["add_train_command", "defense_settings", "make_defense"]


def add_train_command(sub: Any) -> None:
    """Register ``train`` on the ``epic`` subcommand parser."""
    p = sub.add_parser("train", help="train a model, optionally poisoned and/or defended",
                       description="Train a classifier with an optional defense and poison set; "
                                   "writes config, metrics, defense records, checkpoints and a "
                                   "summary to --out.")
    add_data_args(p)
    add_train_args(p)
    _add_defense_args(p)
    g = p.add_argument_group("run")
    g.add_argument("--poisons", default=None, metavar="PATH",
                   help="poison set to train on, in any format epic reads (its own folder, "
                        "the poisoning benchmark's folder, a MetaPoison pickle: "
                        "docs/attacks.md); attack success is reported every epoch")
    g.add_argument("--outside-victims", default=None, metavar="SETUPS",
                   help="train only on the training images that no transfer victim of this "
                        "benchmark setup file uses (a feature extractor disjoint from every "
                        "victim, as the benchmark's CIFAR-100 one is)")
    g.add_argument("--out", default=None, help="output folder (default: runs/<dataset>-<model>)")
    g.add_argument("--resume", action="store_true",
                   help="continue from --out/checkpoint.pt if present")
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="show a progress bar (default: when stderr is a terminal)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="never show a progress bar")
    g.add_argument("--json", action="store_true",
                   help="print the summary as JSON on the last line of output")
    p.set_defaults(handler=cmd_train)


def _add_defense_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("defense")
    g.add_argument("--defense", choices=DEFENSES, default="none",
                   help="defense to train with (default: none). epic is this library's; the "
                        "others are the paper's baselines (docs/defenses.md): deep-knn, "
                        "spectral-signatures and activation-clustering filter once in feature "
                        "space at --warmup; lowest-confidence, highest-loss and random drop on "
                        "EPIC's schedule; dp-sgd clips every example's gradient, adds noise and "
                        "reports the privacy spent (needs the [dp] extra); clip-noise clips and "
                        "noises the mini-batch gradient; adversarial-poisoning poisons part of "
                        "every batch on the fly. Each takes the options below that it knows")
    add_epic_args(g)
    g.add_argument("--budget", type=number(0, 1, low_open=True), default=0.01,
                   help="deep-knn, spectral-signatures: the poison share the defender expects "
                        "(default: 0.01)")
    g.add_argument("--threshold", type=number(), default=None,
                   help="lowest-confidence: drop below this confidence (default 0.5); "
                        "highest-loss: drop above this loss (default 1.0)")
    g.add_argument("--drop-fraction", type=number(0, 1), default=0.01,
                   help="random: share of the kept examples dropped per round (default: 0.01)")
    g.add_argument("--dp-clip", type=number(0, low_open=True), default=None,
                   help="dp-sgd: every example's gradient norm bound; clip-noise: the "
                        "mini-batch gradient's (default: 1)")
    g.add_argument("--dp-noise", type=number(0), default=None,
                   help="noise std relative to --dp-clip: dp-sgd's noise multiplier, on a "
                        "batch's sum of clipped gradients (default: 1); clip-noise's, on the "
                        "mini-batch gradient (default: 0.01)")
    g.add_argument("--dp-delta", type=number(0, 1, low_open=True), default=None,
                   help="dp-sgd: the delta of the (epsilon, delta) guarantee the summary "
                        "reports (default: 1e-5)")
    g.add_argument("--ap-share", type=number(0, 1), default=0.5,
                   help="adversarial-poisoning: share of each batch poisoned on the fly "
                        "(default: 0.5, the paper's AP-0.5)")
    g.add_argument("--ap-eps", type=number(0, 255, low_open=True), default=16,
                   help="adversarial-poisoning: budget in pixel steps of 255 (default: 16)")
    g.add_argument("--defense-option", type=setting, action="append", default=[],
                   metavar="NAME=VALUE",
                   help="any option of the defense by name (repeatable; an option it does not "
                        "take is an error), e.g. --defense-option noise=2")


def defense_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The defense options the flags above set, by the names the defenses take them under
    (each defense takes those it knows; None: not given, the defense's default)."""
    return dataclasses.asdict(epic_settings(args)) | {
            "warmup": args.warmup, "every": args.every, "until": args.until,
            "budget": args.budget, "threshold": args.threshold, "drop_fraction": args.drop_fraction,
            "clip": args.dp_clip, "noise": args.dp_noise, "delta": args.dp_delta,
            "share": args.ap_share, "eps": args.ap_eps / 255}


def make_defense(args: argparse.Namespace, n: int,
                 milestones: tuple[int, ...]) -> Defense | None:
    """The defense the arguments name, with the paper's settings unless overridden: the
    flags it takes (:func:`defense_settings`) and every ``--defense-option``."""
    run = RunFacts(num_examples=n, epochs=args.epochs, milestones=milestones,
                   scenario=args.scenario, seed=args.seed)
    options = options_for(args.defense, defense_settings(args)) | dict(args.defense_option)
    return build_defense(args.defense, run, **options)


def _report_attack(epoch: int, record: dict[str, object]) -> None:
    """A line for an evaluated epoch of a run on poisons (the progress bar shows the rest)."""
    if "attack_success" not in record:  # not an evaluated epoch (--eval-every)
        return
    _report_epoch(epoch, record)


def _report_epoch(epoch: int, record: dict[str, Any]) -> None:
    """A line for every epoch, for logs where no progress bar is drawn (piped, under
    torchrun): attack success first on poisons, else the training loss; then test accuracy
    when evaluated, and the defense round when one ran."""
    parts = ([f"attack success {record['attack_success']:.3f}"] if "attack_success" in record
             else [f"train loss {record['train_loss']:.4f}"])
    if "test_acc" in record:
        parts.append(f"test accuracy {record['test_acc']:.4f}")
    if record.get("poisons_dropped") is not None:
        parts.append(f"poisons dropped {record['poisons_dropped']}")
    if record.get("defense_seconds") is not None:
        parts.append(f"defense round {record['defense_seconds']:.1f}s")
    print(f"epoch {epoch}: " + ", ".join(parts), flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    launched = init_from_env()  # one of several ranks under torchrun
    device = launched or pick_device(args.device)
    try:
        return _train(args, device, first=world()[0] == 0)
    finally:
        if launched is not None:
            torch.distributed.destroy_process_group()


def _train(args: argparse.Namespace, device: torch.device, *, first: bool) -> int:
    """``epic train`` on ``device``; ``first``: this process speaks (rank 0 under torchrun)."""
    out = output_folder(args.out or f"runs/{args.dataset}-{args.model}-{args.scenario}")
    train_data, test_data = load_data(args)
    if args.outside_victims is not None:
        train_data = train_data.subset(
            outside_victims(train_data.labels, load_setups(args.outside_victims)))
    poisons = read_poisons(args.poisons, train_data) if args.poisons else None
    model = make_model(args, train_data, device)
    config = train_config(args)
    defense = make_defense(args, len(train_data), config.resolved_milestones)
    progress = first and (sys.stderr.isatty() if args.progress is None else args.progress)
    result = train(model, train_data, test_data, config, defense=defense, poisons=poisons,
                   out=out, resume=args.resume, progress=progress,
                   run_info={"argv": args.argv, "dataset": args.dataset, "model": args.model,
                             "train_examples": len(train_data), "seed": args.seed},
                   on_epoch_end=None if not first else _report_epoch if not progress
                   else _report_attack if poisons is not None else None)
    if not first:
        return 0
    s = result.summary
    print(f"test accuracy {s['test_acc']:.4f} after {s['epochs']} epochs, {s['seconds']:.1f}s; "
          f"dropped {s['examples_dropped']} of {s['examples']} examples; results in {out}")
    if poisons is not None:
        print(f"attack success {s['attack_success']:.3f}; poisons dropped "
              f"{s['poisons_dropped']} of {s['poisons']}")
    if s.get("dp_epsilon") is not None:
        print(f"differential privacy: epsilon {s['dp_epsilon']:.3g} at delta {s['dp_delta']:g}")
    if args.json:
        print(json.dumps(s))
    return 0
