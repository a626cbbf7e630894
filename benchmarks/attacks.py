"""Reduced-scale CIFAR-10 runs of the attacks, printing each acceptance figure as JSON.

The setting is the paper's (Sec. 4.1) scaled down to a CPU: a class-balanced subset of the
CIFAR-10 training set (``--train-size``, default 5,000), the first ``--test-size`` test images
(default 1,000: the exactly stored ones), the ``convnet`` model, 1% budget. A clean model is
trained on the subset first (cached under ``--cache``); it is the attacker's model for every
attack and the pretrained feature extractor of the transfer-learning victims.

Experiments (one per call):

* ``transfer --attack bp|fc``: per target, craft against the clean model at eps 8/255, retrain
  the last layer of a copy on the poisoned subset (frozen features), count the target flipped.
* ``gm``: per target, craft Gradient Matching at eps 16/255, train a fresh model from scratch
  on the poisoned subset, count the target flipped.
* ``sa``: per source/target class pair, craft Sleeper Agent at eps 16/255, train from scratch,
  measure the share of patched source-class test images classified as the target class,
  against the patch-free baseline (the same model on the same images without the patch) and
  the clean-model baseline (a model trained on clean data, patched images).

Targets are random test images that the clean model classifies correctly, with a random other
class as the adversarial one, drawn from ``--seed``. Every trial prints one JSON line; the last
line is the summary.

Usage:
    python benchmarks/attacks.py transfer --attack bp --targets 10
    python benchmarks/attacks.py transfer --attack fc --targets 10
    python benchmarks/attacks.py gm --targets 6
    python benchmarks/attacks.py sa --pairs 3
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from epic.attacks import BullseyePolytope, FeatureCollision, GradientMatching, SleeperAgent
from epic.data import ImageData, load_cifar
from epic.models import Classifier, build_model
from epic.training import TrainConfig, evaluate, train


def _subset(train: ImageData, size: int) -> ImageData:
    per = size // train.num_classes
    idx = torch.cat([(train.labels == c).nonzero().squeeze(1)[:per]
                     for c in range(train.num_classes)]).sort().values
    return train.subset(idx)


def _fresh(name: str, data: ImageData, seed: int) -> Classifier:
    torch.manual_seed(seed)
    return build_model(name, num_classes=data.num_classes, in_channels=data.shape[0],
                       mean=data.mean, std=data.std)


def _clean_model(args: argparse.Namespace, tr: ImageData, te: ImageData) -> Classifier:
    size = args.pretrain_size or args.train_size
    split = "" if args.pretrain_classes is None else "-classes" + "".join(
        map(str, args.pretrain_classes))
    path = Path(args.cache) / (f"clean-{args.model}-{size}-{args.pretrain_epochs}"
                               f"-{args.seed}{split}.pt")
    model = _fresh(args.model, tr, args.seed)
    pre_train, pre_test = args.pretrain_data
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        data = tr if pre_train is tr and size == args.train_size else _subset(pre_train, size)
        train(model, data.with_stats_of(tr), pre_test,
              TrainConfig(epochs=args.pretrain_epochs, seed=args.seed))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    acc = evaluate(model, pre_test)
    _emit({"clean_model": str(path), "test_acc": round(acc, 4)})
    return model


@torch.no_grad()
def _predict(model: Classifier, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(images.float() / 255).argmax(1)


def _targets(args: argparse.Namespace, model: Classifier, te: ImageData,
             count: int) -> list[tuple[int, int, int]]:
    correct = (_predict(model, te.images) == te.labels).nonzero().squeeze(1)
    g = torch.Generator().manual_seed(args.seed)
    picks = correct[torch.randperm(len(correct), generator=g)[:count]]
    out = []
    for i in picks.tolist():
        true = int(te.labels[i])
        adv = (true + 1 + int(torch.randint(0, te.num_classes - 1, (1,), generator=g)))
        adv %= te.num_classes
        out.append((i, true, adv))
    return out


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def _overrides(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The attack hyperparameters given on the command line (the rest keep their defaults)."""
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def run_transfer(args: argparse.Namespace, tr: ImageData, te: ImageData) -> dict[str, Any]:
    clean = _clean_model(args, tr, te)
    cls = BullseyePolytope if args.attack == "bp" else FeatureCollision
    attack = cls(eps=args.eps / 255, budget=args.budget,
                 **_overrides(args, "iterations"))
    return _targeted_trials(
        args, attack, clean, tr, te, f"transfer-{args.attack}",
        lambda k: (copy.deepcopy(clean), TrainConfig(epochs=args.epochs, scenario="transfer",
                                                     seed=args.seed + k, augment=args.augment)))


def _targeted_trials(args: argparse.Namespace, attack: Any, clean: Classifier, tr: ImageData,
                     te: ImageData, experiment: str,
                     victim: Callable[[int], tuple[Classifier, TrainConfig]]) -> dict[str, Any]:
    """Craft against each target, train the victim ``victim(k)`` on the poisons, count flips."""
    wins, trials = 0, []
    for k, (idx, true, adv) in enumerate(_targets(args, clean, te, args.targets)):
        ps = attack.craft(clean, tr, te.images[idx], true, adv, seed=args.seed + k)
        model, config = victim(k)
        s = train(model, tr, te, config, poisons=ps).summary
        hit = s["attack_success"] >= 0.5
        wins += hit
        trial = {"target_index": idx, "target_class": true, "adversarial_class": adv,
                 "success": hit, "test_acc": round(s["test_acc"], 4),
                 "craft_seconds": ps.metadata["seconds"],
                 "final_loss": round(ps.metadata["final_loss"], 4)}
        trials.append(trial)
        _emit(trial)
    return {"experiment": experiment, "successes": wins, "targets": len(trials),
            "success_rate": wins / max(len(trials), 1), "settings": _settings(args, attack)}


def run_gm(args: argparse.Namespace, tr: ImageData, te: ImageData) -> dict[str, Any]:
    clean = _clean_model(args, tr, te)
    attack = GradientMatching(eps=args.eps / 255, budget=args.budget,
                              **_overrides(args, "iterations", "restarts"))
    return _targeted_trials(
        args, attack, clean, tr, te, "gm-scratch",
        lambda k: (_fresh(args.model, tr, args.seed + 100 + k),
                   TrainConfig(epochs=args.epochs, seed=args.seed + k)))


def run_sa(args: argparse.Namespace, tr: ImageData, te: ImageData) -> dict[str, Any]:
    clean = _clean_model(args, tr, te)
    extra = _overrides(args, "iterations", "retrain_epochs", "retrain_every")
    attack = SleeperAgent(eps=args.eps / 255, budget=args.budget, **extra)
    classes = te.num_classes
    if args.pairs > classes * (classes - 1):
        raise SystemExit(f"--pairs {args.pairs}: only {classes * (classes - 1)} class pairs")
    g = torch.Generator().manual_seed(args.seed)
    rows: list[dict[str, Any]] = []
    drawn: set[tuple[int, int]] = set()
    while len(rows) < args.pairs:  # distinct random source/adversarial class pairs
        source = int(torch.randint(0, classes, (1,), generator=g))
        adv = (source + 1 + int(torch.randint(0, classes - 1, (1,), generator=g))) % classes
        if (source, adv) in drawn:
            continue
        drawn.add((source, adv))
        k = len(rows)
        ps = attack.craft(clean, tr, source, adv, seed=args.seed + k)
        victim = _fresh(args.model, tr, args.seed + 100 + k)
        s = train(victim, tr, te, TrainConfig(epochs=args.epochs, seed=args.seed + k),
                  poisons=ps).summary
        row = {"source_class": source, "adversarial_class": adv,
               "attack_success": round(s["attack_success"], 4),
               "patch_free_baseline": round(ps.success(victim, te, patched=False), 4),
               "clean_model_patched": round(ps.success(clean, te), 4),
               "test_acc": round(s["test_acc"], 4), "craft_seconds": ps.metadata["seconds"],
               "source_test_images": int((te.labels == source).sum())}
        rows.append(row)
        _emit(row)
    n = max(len(rows), 1)
    return {"experiment": "sa-scratch", "pairs": len(rows),
            "attack_success": sum(r["attack_success"] for r in rows) / n,
            "patch_free_baseline": sum(r["patch_free_baseline"] for r in rows) / n,
            "clean_model_patched": sum(r["clean_model_patched"] for r in rows) / n,
            "settings": _settings(args, attack)}


def _settings(args: argparse.Namespace, attack: Any) -> dict[str, Any]:
    import dataclasses

    return {"argv": sys.argv[1:], "train_size": args.train_size, "test_size": args.test_size,
            "pretrain_size": args.pretrain_size or args.train_size,
            "model": args.model, "pretrain_epochs": args.pretrain_epochs,
            "victim_epochs": args.epochs, "victim_augment": args.augment, "seed": args.seed,
            "attack": dataclasses.asdict(attack), "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", choices=["transfer", "gm", "sa"])
    parser.add_argument("--attack", choices=["bp", "fc"], default="bp")
    parser.add_argument("--targets", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--eps", type=float, default=None,
                        help="pixel steps (default: 8 transfer, 16 gm and sa)")
    parser.add_argument("--budget", type=float, default=0.01)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--restarts", type=int, default=None)
    parser.add_argument("--retrain-epochs", type=int, default=None)
    parser.add_argument("--retrain-every", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None,
                        help="victim epochs (default: 20 transfer, 20 gm and sa)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                        help="victim trains with crop and flip (default: yes from scratch, no "
                             "in transfer learning, where features are computed once)")
    parser.add_argument("--train-size", type=int, default=5000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--pretrain-size", type=int, default=None,
                        help="training images of the clean model (default: --train-size; "
                             "transfer learning reuses a model trained on more data)")
    parser.add_argument("--pretrain-classes", type=lambda v: [int(c) for c in v.split(",")],
                        default=None,
                        help="comma-separated classes the clean model is trained on; the "
                             "victim's task is then the other classes (a disjoint-class "
                             "transfer, like the benchmark's CIFAR-100 extractor on CIFAR-10)")
    parser.add_argument("--model", default="convnet")
    parser.add_argument("--pretrain-epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=os.environ.get("EPIC_DATA_DIR", "data"))
    parser.add_argument("--cache", default="runs/bench-attacks")
    args = parser.parse_args(argv)
    if args.eps is None:
        args.eps = 8 if args.experiment == "transfer" else 16
    if args.epochs is None:
        args.epochs = 20
    if args.augment is None:
        args.augment = args.experiment != "transfer"
    started = time.perf_counter()
    full_train, te = load_cifar("cifar10", args.data_dir)
    te = te.subset(torch.arange(min(args.test_size, len(te))))
    if args.pretrain_classes is None:
        tr = _subset(full_train, args.train_size)
        args.pretrain_data = (full_train, te)
    else:  # extractor trained on some classes, the victim's task made of the others
        rest = [c for c in range(full_train.num_classes) if c not in args.pretrain_classes]
        args.pretrain_data = (full_train.select_classes(args.pretrain_classes),
                              te.select_classes(args.pretrain_classes))
        tr = _subset(full_train.select_classes(rest), args.train_size)
        te = te.select_classes(rest)
    runner = {"transfer": run_transfer, "gm": run_gm, "sa": run_sa}[args.experiment]
    summary = runner(args, tr, te)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    _emit(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
