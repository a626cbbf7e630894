"""Wall time of a training run with EPIC against the same run without it.

Both runs start from the same weights, in one process, one after the other. EPIC pays one
forward pass over the kept examples and a medoid selection per round, and earns back the
examples it drops from every later epoch.

    python benchmarks/epic_overhead.py --json                    # CIFAR-10 subset if found
    python benchmarks/epic_overhead.py --dataset digits --json

With ``--json`` the last line is a JSON object: ``undefended_s``, ``epic_s``,
``time_ratio`` (EPIC / undefended), ``epic_rounds_s`` (time inside EPIC rounds), ``dropped``,
``test_acc_undefended``, ``test_acc_epic`` and the settings.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

from epic.data import load_dataset
from epic.defense import EPIC, paper_warmup
from epic.models import build_model
from epic.train import TrainConfig, train


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
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    train_data, test_data = load_dataset(args.dataset, args.data_dir)
    train_data = train_data.subset(torch.arange(min(args.subset, len(train_data))))
    torch.manual_seed(args.seed)
    model = build_model(args.model, num_classes=train_data.num_classes,
                        in_channels=train_data.shape[0], mean=train_data.mean,
                        std=train_data.std).to(args.device)
    config = TrainConfig(epochs=args.epochs, seed=args.seed)
    milestones = config.resolved_milestones
    warmup = args.warmup if args.warmup is not None else min(paper_warmup(args.fraction),
                                                             args.epochs // 4)
    every = args.every if args.every is not None else max(1, args.epochs // 20)

    times, results = {}, {}
    for name in ("undefended", "epic"):
        defense = None
        if name == "epic":
            defense = EPIC(args.fraction, warmup=warmup, every=every, until=milestones[-1],
                           num_examples=len(train_data))
        start = time.perf_counter()
        results[name] = train(copy.deepcopy(model), train_data, test_data, config,
                              defense=defense)
        times[name] = time.perf_counter() - start
        if defense is not None:
            rounds_s = sum(r.seconds for r in defense.history)
            dropped = int(defense.dropped.numel())
    out = {
        "dataset": args.dataset, "train_examples": len(train_data), "model": args.model,
        "epochs": args.epochs, "fraction": args.fraction, "warmup": warmup, "every": every,
        "device": str(args.device), "threads": torch.get_num_threads(),
        "undefended_s": round(times["undefended"], 2), "epic_s": round(times["epic"], 2),
        "time_ratio": round(times["epic"] / times["undefended"], 3),
        "epic_rounds_s": round(rounds_s, 2), "dropped": dropped,
        "test_acc_undefended": results["undefended"].summary["test_acc"],
        "test_acc_epic": results["epic"].summary["test_acc"],
    }
    if not args.json:
        for k, v in out.items():
            print(f"{k:>20}: {v}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
