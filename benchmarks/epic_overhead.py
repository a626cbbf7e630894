"""Wall time of a training run with EPIC against the same run without it.

All runs start from the same weights, in one process; each repeat runs them side by side
(undefended, EPIC with the eval-pass embeddings, EPIC with the training-pass embeddings), so a
slow phase of the machine hits all of them. EPIC pays per round an embedding pass over the
kept examples (none with ``train-pass``) and a medoid selection, and earns back the examples
it drops from every later epoch.

    python benchmarks/epic_overhead.py --json                    # CIFAR-10 subset if found
    python benchmarks/epic_overhead.py --subset 5000 --epochs 40 --json
    python benchmarks/epic_overhead.py --eval-every 16 --json   # evaluate after the last only
    python benchmarks/epic_overhead.py --dataset digits --json

With ``--json`` the last line is a JSON object: the settings, and per run
(``undefended``, ``epic``, ``epic_train_pass``) the wall times of every repeat, their median
and spread, the ratio to the same repeat's undefended run, seconds in rounds split into
embedding and selection, examples embedded, the mean round as a share of an undefended epoch,
examples dropped and test accuracy; ``train_pass_overlap`` is the share of the eval-pass
drops that the training-pass rounds also drop.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from typing import Any

import torch

from epic.data import load_dataset
from epic.defenses import EPIC, paper_warmup
from epic.models import build_model
from epic.training import RoundEmbeddings, TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    have_cifar = bool(os.environ.get("EPIC_DATA_DIR"))
    p.add_argument("--dataset", default="cifar10" if have_cifar else "digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--subset", type=int, default=10000, help="training examples used")
    p.add_argument("--model", default="convnet")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--every", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3, help="side-by-side repeats")
    p.add_argument("--eval-every", type=int, default=1,
                   help="evaluate every N epochs and after the last (the trainer's option)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    train_data, test_data = load_dataset(args.dataset, args.data_dir)
    train_data = train_data.subset(torch.arange(min(args.subset, len(train_data))))
    torch.manual_seed(args.seed)
    model = build_model(args.model, num_classes=train_data.num_classes,
                        in_channels=train_data.shape[0], mean=train_data.mean,
                        std=train_data.std).to(args.device)
    milestones = TrainConfig(epochs=args.epochs).resolved_milestones
    warmup = args.warmup if args.warmup is not None else min(paper_warmup(args.fraction),
                                                             args.epochs // 4)
    every = args.every if args.every is not None else max(1, args.epochs // 20)

    runs: dict[str, list[dict[str, Any]]] = {"undefended": [], "epic": [], "epic_train_pass": []}
    drops: dict[str, set[int]] = {}
    for _ in range(args.repeat):
        for name in runs:
            defense = None if name == "undefended" else EPIC(
                args.fraction, warmup=warmup, every=every, until=milestones[-1],
                num_examples=len(train_data))
            mode: RoundEmbeddings = (
                "train-pass" if name == "epic_train_pass" else "eval")
            config = TrainConfig(epochs=args.epochs, seed=args.seed, round_embeddings=mode,
                                 eval_every=args.eval_every)
            start = time.perf_counter()
            result = train(copy.deepcopy(model), train_data, test_data, config, defense=defense)
            seconds = time.perf_counter() - start
            history = defense.history if defense is not None else []
            runs[name].append({
                "seconds": seconds, "test_acc": result.summary["test_acc"],
                "epoch_s": seconds / args.epochs, "rounds": len(history),
                "embed_s": sum(r.embed_seconds for r in history),
                "select_s": sum(r.seconds - r.embed_seconds for r in history),
                "embedded": sum(r.remaining + len(r.dropped) for r in history),
                "dropped": len(defense.dropped) if defense is not None else 0})
            if defense is not None:
                drops[name] = set(defense.dropped.tolist())
    undefended_epoch = statistics.median(r["epoch_s"] for r in runs["undefended"])
    out: dict[str, Any] = {
        "dataset": args.dataset, "train_examples": len(train_data), "model": args.model,
        "epochs": args.epochs, "fraction": args.fraction, "warmup": warmup, "every": every,
        "eval_every": args.eval_every,
        "repeat": args.repeat, "device": str(args.device), "threads": torch.get_num_threads()}
    for name, reps in runs.items():
        times = [r["seconds"] for r in reps]
        row = {"seconds": [round(t, 2) for t in times],
               "median_s": round(statistics.median(times), 2),
               "spread_s": round(max(times) - min(times), 2),
               "test_acc": reps[-1]["test_acc"], "dropped": reps[-1]["dropped"]}
        if name != "undefended":
            ratios = [r["seconds"] / u["seconds"] for r, u in zip(reps, runs["undefended"],
                                                                  strict=True)]
            rounds = reps[-1]["rounds"]
            row |= {"time_ratio": [round(x, 3) for x in ratios],
                    "median_ratio": round(statistics.median(ratios), 3),
                    "rounds": rounds,
                    "embed_s": round(statistics.median(r["embed_s"] for r in reps), 2),
                    "select_s": round(statistics.median(r["select_s"] for r in reps), 2),
                    "embedded": reps[-1]["embedded"],
                    "round_share_of_epoch": round(statistics.median(
                        (r["embed_s"] + r["select_s"]) / max(rounds, 1) for r in reps)
                        / undefended_epoch, 3)}
        out[name] = row
    eval_drops = drops.get("epic", set())
    out["train_pass_overlap"] = (round(len(eval_drops & drops["epic_train_pass"])
                                       / len(eval_drops), 3) if eval_drops else None)
    if not args.json:
        for k, v in out.items():
            print(f"{k:>20}: {v}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
