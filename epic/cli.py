"""Command line: ``epic train`` (and the subcommands other modules register)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from epic.attacks.cli import add_attack_commands
from epic.bench.cli import add_bench_commands
from epic.data import DATASETS, ImageData, load_dataset
from epic.defense import ScheduledDefense
from epic.defenses import DEFENSES, DP_SGD_CLIP, DP_SGD_NOISE, build_batch_transform, build_defense
from epic.models import MODELS, Classifier, build_model
from epic.poisons import PoisonSet
from epic.train import TrainConfig, train

__all__ = ["main"]

log = logging.getLogger("epic")


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="training data (default: digits, scikit-learn's embedded 8x8 digits)")
    g.add_argument("--data-dir", default=None,
                   help="folder holding cifar-10-batches-py (or cifar10/..., or the .tar.gz); "
                        "default: $EPIC_DATA_DIR")
    g.add_argument("--download", action="store_true",
                   help="download CIFAR (checksum-verified) if it is not in --data-dir")
    g.add_argument("--subset", type=int, default=None, metavar="N",
                   help="train on the first N training examples only (quick runs)")
    g.add_argument("--test-subset", type=int, default=None, metavar="N",
                   help="evaluate on the first N test examples only")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and training")
    g.add_argument("--model", choices=list(MODELS), default="convnet",
                   help="architecture (resnet18, vgg16 as in the paper; *-small and convnet "
                        "for CPU work; default: convnet)")
    g.add_argument("--scenario", choices=["scratch", "transfer", "finetune"], default="scratch",
                   help="scratch: train all from random init; transfer: freeze the feature "
                        "extractor of --pretrained, retrain a new last layer; finetune: new last "
                        "layer, train all at lr 1e-4")
    g.add_argument("--pretrained", default=None, metavar="MODEL_PT",
                   help="weights to start transfer/finetune from (a model.pt written by a run "
                        "of this tool on clean data)")
    g.add_argument("--epochs", type=int, default=40, help="training epochs (default: 40)")
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: 0.1; 1e-4 when fine-tuning)")
    g.add_argument("--batch-size", type=int, default=128, help="mini-batch size (default: 128)")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="default: 5e-4")
    g.add_argument("--milestones", type=int, nargs="*", default=None,
                   help="epochs where lr drops by 10 (default: 100 150 for 200 epochs, "
                        "else 25/40 and 35/40 of the epochs)")
    g.add_argument("--no-augment", action="store_true",
                   help="train without random crop and flip")
    g.add_argument("--seed", type=int, default=0, help="seed for init, order, augmentation")
    g.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, ... (default: cuda when available)")


def _add_defense_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("defense")
    g.add_argument("--defense", choices=DEFENSES, default="none",
                   help="defense to train with (default: none). epic is this library's; the "
                        "others are the paper's baselines: deep-knn, spectral-signatures and "
                        "activation-clustering filter once in feature space at --warmup; "
                        "lowest-confidence, highest-loss and random drop on EPIC's schedule; "
                        "dp-sgd clips and noises every gradient; adversarial-poisoning poisons "
                        "part of every batch on the fly")
    g.add_argument("--fraction", type=float, default=0.1,
                   help="EPIC: share of each class chosen as medoids (default: 0.1)")
    g.add_argument("--warmup", type=int, default=None,
                   help="epochs before the first round (default: 100 x --fraction, as the "
                        "paper's 10/20/30 for EPIC-0.1/0.2/0.3)")
    g.add_argument("--every", type=int, default=None,
                   help="epochs between rounds (default: epochs/20, i.e. 2 of 40 and 10 of 200; "
                        "1 in transfer learning)")
    g.add_argument("--until", type=int, default=None,
                   help="no rounds from this epoch on (default: the last lr milestone; one round "
                        "only for the feature-space filters)")
    g.add_argument("--max-cluster-size", type=int, default=1,
                   help="EPIC: drop medoids of clusters this small (default: 1, alone)")
    g.add_argument("--similarity", choices=["exp", "linear", "cosine"], default="exp",
                   help="EPIC: gradient similarity (default: exp(-d/D), the authors' code)")
    g.add_argument("--per-class", choices=["proportional", "equal"], default="proportional",
                   help="EPIC: medoids per class proportional to class size, or equal")
    g.add_argument("--budget", type=float, default=0.01,
                   help="deep-knn, spectral-signatures: the poison share the defender expects "
                        "(default: 0.01)")
    g.add_argument("--threshold", type=float, default=None,
                   help="lowest-confidence: drop below this confidence (default 0.5); "
                        "highest-loss: drop above this loss (default 1.0)")
    g.add_argument("--drop-fraction", type=float, default=0.01,
                   help="random: share of the kept examples dropped per round (default: 0.01)")
    g.add_argument("--dp-clip", type=float, default=DP_SGD_CLIP,
                   help=f"dp-sgd: gradient norm bound (default: {DP_SGD_CLIP})")
    g.add_argument("--dp-noise", type=float, default=DP_SGD_NOISE,
                   help=f"dp-sgd: noise std relative to --dp-clip (default: "
                        f"{DP_SGD_NOISE})")
    g.add_argument("--ap-share", type=float, default=0.5,
                   help="adversarial-poisoning: share of each batch poisoned on the fly "
                        "(default: 0.5, the paper's AP-0.5)")
    g.add_argument("--ap-eps", type=float, default=16,
                   help="adversarial-poisoning: budget in pixel steps of 255 (default: 16)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epic",
        description="Train image classifiers that resist data poisoning (EPIC, ICML 2022).")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model, optionally poisoned and/or defended",
                       description="Train a classifier with an optional defense and poison set; "
                                   "writes config, metrics, defense records, checkpoints and a "
                                   "summary to --out.")
    _add_data_args(p)
    _add_train_args(p)
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
    add_attack_commands(sub)
    add_bench_commands(sub)
    return parser


def load_data(args: argparse.Namespace) -> tuple[ImageData, ImageData]:
    """The train/test sets the arguments name, cut to --subset / --test-subset."""
    train_data, test_data = load_dataset(args.dataset, args.data_dir, download=args.download)
    if args.subset is not None:
        train_data = train_data.subset(torch.arange(min(args.subset, len(train_data))))
    if args.test_subset is not None:
        test_data = test_data.subset(torch.arange(min(args.test_subset, len(test_data))))
    return train_data, test_data


def make_model(args: argparse.Namespace, train_data: ImageData,
               device: torch.device) -> Classifier:
    """A seeded fresh model, loaded from --pretrained when given."""
    torch.manual_seed(args.seed)
    model = build_model(args.model, num_classes=train_data.num_classes,
                        in_channels=train_data.shape[0], mean=train_data.mean,
                        std=train_data.std)
    if args.pretrained is not None:
        state = torch.load(args.pretrained, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            lines = str(exc).splitlines()
            detail = (lines[1].strip() if len(lines) > 1 else lines[0])[:160]
            raise ValueError(f"{args.pretrained} is not a {args.model} for {args.dataset} "
                             f"({detail}); pass the --model it was trained as") from exc
    elif args.scenario != "scratch":
        raise SystemExit(f"--scenario {args.scenario} needs --pretrained MODEL_PT")
    return model.to(device)


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
    dropped = record.get("poisons_dropped")
    print(f"epoch {epoch}: attack success {record['attack_success']:.3f}, test accuracy "
          f"{record['test_acc']:.4f}" + ("" if dropped is None else f", poisons dropped {dropped}"),
          flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    device = _device(args.device)
    train_data, test_data = load_data(args)
    if args.outside_victims is not None:
        from epic.setups import load_setups, outside_victims

        train_data = train_data.subset(
            outside_victims(train_data.labels, load_setups(args.outside_victims)))
    poisons = PoisonSet.load(args.poisons, train_data) if args.poisons else None
    model = make_model(args, train_data, device)
    config = TrainConfig(epochs=args.epochs, scenario=args.scenario, lr=args.lr,
                         batch_size=args.batch_size, weight_decay=args.weight_decay,
                         milestones=tuple(args.milestones) if args.milestones is not None
                         else None, augment=not args.no_augment, seed=args.seed,
                         grad_clip=args.dp_clip if args.defense == "dp-sgd" else None,
                         grad_noise=args.dp_noise if args.defense == "dp-sgd" else 0.0)
    defense = make_defense(args, len(train_data), config.resolved_milestones)
    out = Path(args.out or f"runs/{args.dataset}-{args.model}-{args.scenario}")
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    result = train(model, train_data, test_data, config, defense=defense, poisons=poisons,
                   out=out, resume=args.resume, progress=progress,
                   batch_transform=build_batch_transform(args.defense, share=args.ap_share,
                                                         eps=args.ap_eps / 255, seed=args.seed),
                   run_info={"argv": sys.argv[1:], "dataset": args.dataset, "model": args.model,
                             "train_examples": len(train_data), "seed": args.seed},
                   on_epoch_end=_report_attack if poisons is not None else None)
    s = result.summary
    print(f"test accuracy {s['test_acc']:.4f} after {s['epochs']} epochs, {s['seconds']:.1f}s; "
          f"dropped {s['examples_dropped']} of {s['examples']} examples; results in {out}")
    if poisons is not None:
        print(f"attack success {s['attack_success']:.3f}; poisons dropped "
              f"{s['poisons_dropped']} of {s['poisons']}")
    if args.json:
        print(json.dumps(s))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        parser.exit(2, f"epic: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
