"""``epic train``: train a classifier, optionally poisoned and defended (also under torchrun)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from epic.cli.argtypes import number
from epic.cli.common import (
    add_data_args,
    add_epic_args,
    add_train_args,
    load_data,
    make_model,
    output_folder,
    pick_device,
    train_config,
)
from epic.defenses import (
    DEFENSES,
    DP_SGD_CLIP,
    DP_SGD_NOISE,
    ScheduledDefense,
    build_batch_transform,
    build_defense,
)
from epic.distributed import init_from_env, world
from epic.poisons import PoisonSet
from epic.setups import load_setups, outside_victims
from epic.train import train

__all__ = ["add_train_command", "make_defense"]


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
    g.add_argument("--poisons", default=None, metavar="DIR",
                   help="poison set folder (poisons.npz + poisons.json) to train on; attack "
                        "success is reported every epoch")
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
                        "others are the paper's baselines: deep-knn, spectral-signatures and "
                        "activation-clustering filter once in feature space at --warmup; "
                        "lowest-confidence, highest-loss and random drop on EPIC's schedule; "
                        "dp-sgd clips and noises every gradient; adversarial-poisoning poisons "
                        "part of every batch on the fly")
    add_epic_args(g)
    g.add_argument("--budget", type=number(0, 1, low_open=True), default=0.01,
                   help="deep-knn, spectral-signatures: the poison share the defender expects "
                        "(default: 0.01)")
    g.add_argument("--threshold", type=number(), default=None,
                   help="lowest-confidence: drop below this confidence (default 0.5); "
                        "highest-loss: drop above this loss (default 1.0)")
    g.add_argument("--drop-fraction", type=number(0, 1), default=0.01,
                   help="random: share of the kept examples dropped per round (default: 0.01)")
    g.add_argument("--dp-clip", type=number(0, low_open=True), default=DP_SGD_CLIP,
                   help=f"dp-sgd: gradient norm bound (default: {DP_SGD_CLIP})")
    g.add_argument("--dp-noise", type=number(0), default=DP_SGD_NOISE,
                   help=f"dp-sgd: noise std relative to --dp-clip (default: "
                        f"{DP_SGD_NOISE})")
    g.add_argument("--ap-share", type=number(0, 1), default=0.5,
                   help="adversarial-poisoning: share of each batch poisoned on the fly "
                        "(default: 0.5, the paper's AP-0.5)")
    g.add_argument("--ap-eps", type=number(0, 255, low_open=True), default=16,
                   help="adversarial-poisoning: budget in pixel steps of 255 (default: 16)")


def make_defense(args: argparse.Namespace, n: int,
                 milestones: tuple[int, ...]) -> ScheduledDefense | None:
    """The defense the arguments name, with the paper's schedule unless overridden."""
    return build_defense(args.defense, num_examples=n, epochs=args.epochs, milestones=milestones,
                         scenario=args.scenario, fraction=args.fraction, warmup=args.warmup,
                         every=args.every, until=args.until,
                         max_cluster_size=args.max_cluster_size, similarity=args.similarity,
                         per_class=args.per_class, budget=args.budget, threshold=args.threshold,
                         drop_fraction=args.drop_fraction, seed=args.seed)


def _report_attack(epoch: int, record: dict[str, object]) -> None:
    if "attack_success" not in record:  # not an evaluated epoch (--eval-every)
        return
    dropped = record.get("poisons_dropped")
    print(f"epoch {epoch}: attack success {record['attack_success']:.3f}, test accuracy "
          f"{record['test_acc']:.4f}" + ("" if dropped is None else f", poisons dropped {dropped}"),
          flush=True)


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
    poisons = PoisonSet.load(args.poisons, train_data) if args.poisons else None
    model = make_model(args, train_data, device)
    config = train_config(args, grad_clip=args.dp_clip if args.defense == "dp-sgd" else None,
                          grad_noise=args.dp_noise if args.defense == "dp-sgd" else 0.0,
                          round_embeddings=args.round_embeddings)
    defense = make_defense(args, len(train_data), config.resolved_milestones)
    progress = first and (sys.stderr.isatty() if args.progress is None else args.progress)
    result = train(model, train_data, test_data, config, defense=defense, poisons=poisons,
                   out=out, resume=args.resume, progress=progress,
                   batch_transform=build_batch_transform(args.defense, share=args.ap_share,
                                                         eps=args.ap_eps / 255, seed=args.seed),
                   run_info={"argv": sys.argv[1:], "dataset": args.dataset, "model": args.model,
                             "train_examples": len(train_data), "seed": args.seed},
                   on_epoch_end=_report_attack if poisons is not None and first else None)
    if not first:
        return 0
    s = result.summary
    print(f"test accuracy {s['test_acc']:.4f} after {s['epochs']} epochs, {s['seconds']:.1f}s; "
          f"dropped {s['examples_dropped']} of {s['examples']} examples; results in {out}")
    if poisons is not None:
        print(f"attack success {s['attack_success']:.3f}; poisons dropped "
              f"{s['poisons_dropped']} of {s['poisons']}")
    if args.json:
        print(json.dumps(s))
    return 0
