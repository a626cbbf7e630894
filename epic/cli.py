"""Command line: ``epic train``, ``epic scan`` (and the subcommands other modules register)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from epic.argtypes import at_least, number
from epic.attacks.cli import add_attack_commands
from epic.bench.cli import add_bench_commands
from epic.data import DATASETS, ImageData, load_dataset
from epic.defenses import (
    DEFENSES,
    DP_SGD_CLIP,
    DP_SGD_NOISE,
    EPIC,
    ScheduledDefense,
    build_batch_transform,
    build_defense,
)
from epic.distributed import init_from_env, world
from epic.images import MAX_FILE_BYTES, MAX_PIXELS, Skipped, read_image_folder, read_npz
from epic.models import MODELS, Classifier, build_model
from epic.poisons import PoisonSet
from epic.scan import scan, train_and_scan, write_outputs
from epic.train import TrainConfig, train

__all__ = ["main"]

log = logging.getLogger("epic")


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPUs")
    return device


def output_folder(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as a folder this process can write to, created if missing; else a one-line
    error naming ``flag``, before any work starts."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out}: is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{flag} {out}: cannot create it ({exc.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {out}: not writable")
    return out


def _add_data_args(p: argparse.ArgumentParser, *, test_split: bool = True
                   ) -> argparse._ArgumentGroup:
    """The data group: --dataset, --data-dir, --download, --subset (and --test-subset)."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="training data (default: digits, scikit-learn's embedded 8x8 digits)")
    g.add_argument("--data-dir", default=None,
                   help="folder holding cifar-10-batches-py (or cifar10/..., or the .tar.gz); "
                        "default: $EPIC_DATA_DIR")
    g.add_argument("--download", action="store_true",
                   help="download CIFAR (checksum-verified) if it is not in --data-dir")
    g.add_argument("--subset", type=at_least(1), default=None, metavar="N",
                   help="train on the first N training examples only (quick runs)")
    if test_split:
        g.add_argument("--test-subset", type=at_least(1), default=None, metavar="N",
                       help="evaluate on the first N test examples only")
    else:
        p.set_defaults(test_subset=None)
    return g


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.set_defaults(arch_flag="--model")
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
    _add_fit_args(g)


def _add_fit_args(g: argparse._ArgumentGroup) -> None:
    """--epochs, --lr, --batch-size, --weight-decay, --milestones, --no-augment, --seed,
    --device: what :func:`train_config` and :func:`_device` read."""
    g.add_argument("--epochs", type=at_least(1), default=40, help="training epochs (default: 40)")
    g.add_argument("--lr", type=number(0, low_open=True), default=None,
                   help="learning rate (default: 0.1; 1e-4 when fine-tuning)")
    g.add_argument("--batch-size", type=at_least(1), default=128,
                   help="mini-batch size (default: 128)")
    g.add_argument("--weight-decay", type=number(0), default=5e-4, help="default: 5e-4")
    g.add_argument("--milestones", type=at_least(1), nargs="*", default=None,
                   help="epochs where lr drops by 10 (default: 100 150 for 200 epochs, "
                        "else 25/40 and 35/40 of the epochs)")
    g.add_argument("--no-augment", action="store_true",
                   help="train without random crop and flip")
    g.add_argument("--seed", type=at_least(0), default=0, help="seed for init, order, augmentation")
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
    _add_epic_args(g)
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


def _add_epic_args(g: argparse._ArgumentGroup) -> None:
    """EPIC's settings and schedule: --fraction ... --per-class."""
    g.add_argument("--fraction", type=number(0, 1, low_open=True), default=0.1,
                   help="EPIC: share of each class chosen as medoids (default: 0.1)")
    g.add_argument("--warmup", type=at_least(0), default=None,
                   help="epochs before the first round (default: 100 x --fraction, as the "
                        "paper's 10/20/30 for EPIC-0.1/0.2/0.3)")
    g.add_argument("--every", type=at_least(1), default=None,
                   help="epochs between rounds (default: epochs/20, i.e. 2 of 40 and 10 of 200; "
                        "1 in transfer learning)")
    g.add_argument("--until", type=at_least(1), default=None,
                   help="no rounds from this epoch on (default: the last lr milestone; one round "
                        "only for the feature-space filters)")
    g.add_argument("--max-cluster-size", type=at_least(1), default=1,
                   help="EPIC: drop medoids of clusters this small (default: 1, alone)")
    g.add_argument("--similarity", choices=["exp", "linear", "cosine"], default="exp",
                   help="EPIC: gradient similarity (default: exp(-d/D), the authors' code)")
    g.add_argument("--per-class", choices=["proportional", "equal"], default="proportional",
                   help="EPIC: medoids per class proportional to class size, or equal")
    g.add_argument("--round-embeddings", choices=["eval", "train-pass"], default="eval",
                   help="EPIC: gradients from an eval pass before each round (default, the "
                        "paper's), or from the training pass of the epoch before (no extra "
                        "pass; augmented, train-mode inputs)")


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
    _add_scan_command(sub)
    add_attack_commands(sub)
    add_bench_commands(sub)
    return parser


def load_data(args: argparse.Namespace) -> tuple[ImageData, ImageData]:
    """The train/test sets the arguments name, cut to --subset / --test-subset."""
    train_data, test_data = load_dataset(args.dataset, args.data_dir, download=args.download)
    return _first(train_data, args.subset), _first(test_data, args.test_subset)


def _first(data: ImageData, n: int | None) -> ImageData:
    """The first ``n`` examples of ``data`` (all when ``n`` is None)."""
    return data if n is None else data.subset(torch.arange(min(n, len(data))))


def make_model(args: argparse.Namespace, train_data: ImageData,
               device: torch.device) -> Classifier:
    """A seeded fresh model, loaded from --pretrained when given (the architecture is
    ``args.model``, named on the command line by ``args.arch_flag``)."""
    torch.manual_seed(args.seed)
    model = build_model(args.model, num_classes=train_data.num_classes,
                        in_channels=train_data.shape[0], mean=train_data.mean,
                        std=train_data.std)
    if args.pretrained is not None:
        state = _load_weights(args.pretrained)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            lines = str(exc).splitlines()
            detail = (lines[1].strip() if len(lines) > 1 else lines[0])[:160]
            raise ValueError(f"{args.pretrained} is not a {args.model} for "
                             f"{train_data.num_classes} classes of {train_data.shape[0]}-channel "
                             f"images ({detail}); pass the {args.arch_flag} it was trained "
                             f"as") from exc
    elif args.scenario != "scratch":
        raise SystemExit(f"--scenario {args.scenario} needs --pretrained MODEL_PT")
    return model.to(device)


def _load_weights(path: str) -> Mapping[str, Any]:
    """The state dict in ``path``, read with ``weights_only=True`` (nothing is executed)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch.load raises many types on a file that is not its own
        detail = (str(exc).splitlines() or [""])[0][:160]
        raise ValueError(f"{path} is not a model file that torch.load reads safely "
                         f"({type(exc).__name__}: {detail})") from exc
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a model state dict")
    return state


def train_config(args: argparse.Namespace, **settings: Any) -> TrainConfig:
    """The :class:`TrainConfig` of the arguments :func:`_add_fit_args` adds, plus
    ``settings``."""
    return TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                       weight_decay=args.weight_decay,
                       milestones=tuple(args.milestones) if args.milestones is not None
                       else None, augment=not args.no_augment, seed=args.seed, **settings)


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
    launched = init_from_env()  # one of several ranks under torchrun
    device = launched or _device(args.device)
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
        from epic.setups import load_setups, outside_victims

        train_data = train_data.subset(
            outside_victims(train_data.labels, load_setups(args.outside_victims)))
    poisons = PoisonSet.load(args.poisons, train_data) if args.poisons else None
    model = make_model(args, train_data, device)
    config = train_config(args, scenario=args.scenario,
                          grad_clip=args.dp_clip if args.defense == "dp-sgd" else None,
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


def _add_scan_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scan", help="scan a data set for suspected poisons: a CSV and an HTML page to review",
        description="Flag the examples EPIC finds isolated in gradient space (suspected "
                    "poisons, or mislabelled or odd examples). With --model, one EPIC round "
                    "on that trained model; without, a fresh --arch is trained on the data "
                    "for --epochs with EPIC and every round's drops are flagged. Writes "
                    "suspicious.csv (file, label, cluster_size, round), skipped.csv (files "
                    "not read, and why) and scan.html (the flagged images by class) to --out.")
    g = _add_data_args(p, test_split=False)
    g.add_argument("--data", default=None, metavar="DIR|FILE.npz",
                   help="the set to scan: a folder with one sub-folder per class (PNG, JPEG, "
                        "BMP, GIF or WEBP files; any other file is skipped and listed), or an "
                        ".npz of uint8 'images' and integer 'labels' (optional 'classes'); "
                        "without it, the training split of --dataset")
    g.add_argument("--image-size", type=at_least(1), default=None, metavar="S",
                   help="folders: resize every image to S x S (default: the most common size "
                        "in the folder)")
    g.add_argument("--max-file-bytes", type=at_least(1), default=MAX_FILE_BYTES,
                   help=f"folders: skip files larger than this (default: {MAX_FILE_BYTES:,})")
    g.add_argument("--max-pixels", type=at_least(1), default=MAX_PIXELS,
                   help=f"folders: skip images whose header declares more pixels, before "
                        f"decoding them (default: {MAX_PIXELS:,})")
    # --model names a weights file here (the wording) and --arch the architecture;
    # their dests are those of `epic train`'s --pretrained and --model, which make_model reads.
    m = p.add_argument_group(
        "model and training", "with --model: one EPIC round on that model (the training "
        "options are unused); without: a fresh --arch trained on the data")
    m.add_argument("--model", dest="pretrained", default=None, metavar="MODEL_PT",
                   help="weights of a trained model to scan with (a model.pt written by epic "
                        "train, or by an earlier scan in --out/train/)")
    m.add_argument("--arch", dest="model", choices=list(MODELS), default="convnet",
                   help="architecture of --model, or to train (default: convnet)")
    _add_fit_args(m)
    _add_epic_args(p.add_argument_group("EPIC"))
    o = p.add_argument_group("output")
    o.add_argument("--out", default="scan",
                   help="output folder (default: scan); the training run goes to --out/train")
    o.add_argument("--json", action="store_true",
                   help="print the summary as JSON on the last line of output")
    p.set_defaults(handler=cmd_scan, arch_flag="--arch", scenario="scratch")


def _scan_input(args: argparse.Namespace
                ) -> tuple[ImageData, tuple[str, ...] | None, tuple[Skipped, ...], str]:
    """``(data, file names or None, skipped files, where from)`` of --data or --dataset."""
    if args.data is None:
        return load_data(args)[0], None, (), args.dataset
    path = Path(args.data)
    if path.is_dir():
        folder = read_image_folder(path, image_size=args.image_size,
                                   max_file_bytes=args.max_file_bytes,
                                   max_pixels=args.max_pixels)
        data = _first(folder.data, args.subset)
        return data, folder.files[:len(data)], folder.skipped, str(path)
    if path.suffix == ".npz" or path.is_file():
        if path.suffix != ".npz":
            raise ValueError(f"{path} is neither a folder nor an .npz file")
        return _first(read_npz(path), args.subset), None, (), str(path)
    raise FileNotFoundError(f"{path} does not exist")


def cmd_scan(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    device = _device(args.device)
    out = output_folder(args.out)
    data, files, skipped, source = _scan_input(args)
    c, h, w = data.shape
    print(f"read {len(data)} images of {data.num_classes} classes ({c} x {h} x {w}) from "
          f"{source}; files skipped: {len(skipped)}", flush=True)
    model = make_model(args, data, device)
    settings = {"fraction": args.fraction, "max_cluster_size": args.max_cluster_size,
                "similarity": args.similarity, "per_class": args.per_class}
    if args.pretrained is not None:
        result = scan(model, data, files=files, skipped=skipped, **settings)
        print(f"EPIC round on {args.pretrained}: flagged {len(result.flags)}", flush=True)
    else:
        config = train_config(args, round_embeddings=args.round_embeddings)
        defense = cast(EPIC, build_defense(
            "epic", num_examples=len(data), epochs=args.epochs,
            milestones=config.resolved_milestones, warmup=args.warmup, every=args.every,
            until=args.until, **settings))
        rounds = [e for e in range(args.epochs) if defense.due(e)]
        print(f"training {args.model} for {args.epochs} epochs with EPIC-{args.fraction}, "
              f"rounds before epochs {rounds}", flush=True)

        def report(epoch: int, record: dict[str, Any]) -> None:
            line = f"epoch {epoch}: "
            if "defense_seconds" in record:
                r = defense.history[-1]
                line += (f"EPIC round {len(defense.history)} flagged {len(r.dropped)}, "
                         f"{r.remaining} remain; ")
            print(f"{line}train accuracy {record['train_acc']:.3f}", flush=True)

        result = train_and_scan(model, data, defense, config, files=files, skipped=skipped,
                                out=out / "train", on_epoch_end=report,
                                run_info={"argv": args.argv, "data": source,
                                          "model": args.model, "seed": args.seed})
    paths = write_outputs(result, out)
    seconds = time.perf_counter() - start
    rounds_done = len(result.rounds)
    print(f"flagged {len(result.flags)} of {len(data)} examples in {rounds_done} EPIC "
          f"round{'' if rounds_done == 1 else 's'}, files skipped: {len(skipped)}, "
          f"{seconds:.1f}s; wrote "
          f"{', '.join(str(p) for p in paths.values())}")
    if args.json:
        print(json.dumps(result.summary() | {"seconds": round(seconds, 3)}
                         | {name: str(p) for name, p in paths.items()}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args))
    except (ValueError, OSError, RuntimeError) as exc:
        parser.exit(2, f"epic: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
