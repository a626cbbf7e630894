"""``epic demo``: the main job, end to end on the embedded digits (no download).

A patch backdoor is crafted for several source/adversarial class pairs, and a convnet trained
from scratch on each poisoned set undefended and with EPIC at its default settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

import torch

from epic.attacks import PatchBackdoor
from epic.cli.argtypes import at_least, number
from epic.cli.common import pick_device
from epic.data import load_digits
from epic.defenses import RunFacts, build_defense
from epic.models import build_model
from epic.training import TrainConfig, train

__all__ = ["add_demo_command", "run_demo"]

log = logging.getLogger("epic")


def add_demo_command(sub: Any) -> None:
    """Register ``demo`` on the ``epic`` subcommand parser."""
    d = sub.add_parser(
        "demo", help="craft an attack on the embedded digits, train undefended and with EPIC",
        description="On scikit-learn's 8x8 digits (no download) with the convnet model: craft "
                    "a patch backdoor (BadNets, 1%% of the training set) for several "
                    "source/adversarial class pairs, train from scratch undefended and with "
                    "EPIC at its default settings, and print attack success and test accuracy "
                    "(means over the pairs). Under 3 minutes on 2 CPU cores.")
    d.add_argument("--pairs", type=at_least(1), default=4,
                   help="source/target class pairs (default: 4)")
    d.add_argument("--epochs", type=at_least(1), default=40, help="training epochs (default: 40)")
    d.add_argument("--budget", type=number(0, 1, low_open=True), default=0.01,
                   help="poison budget (default: 0.01)")
    d.add_argument("--seed", type=at_least(0), default=0, help="seed (default: 0)")
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    d.add_argument("--json", action="store_true",
                   help="print a JSON object with undefended and epic results last")
    d.set_defaults(handler=cmd_demo)


def run_demo(*, pairs: int = 4, epochs: int = 40, budget: float = 0.01, seed: int = 0,
             device: torch.device | None = None) -> dict[str, Any]:
    """The demo's numbers: means over ``pairs`` backdoors of attack success and accuracy.

    Each pair ``(source k, adversarial k + 5 mod 10)`` gets a BadNets set (1% of the training
    set); a convnet is trained from scratch on it undefended and with EPIC at the command
    line's default settings (EPIC-0.1, warmup 10, every epochs/20, until the last milestone).
    """
    started = time.perf_counter()
    device = device or torch.device("cpu")
    train_data, test_data = load_digits()
    train_data, test_data = train_data.to(device), test_data.to(device)
    config = TrainConfig(epochs=epochs, seed=seed)
    rows: dict[str, list[dict[str, Any]]] = {"undefended": [], "epic": []}
    for k in range(pairs):
        source = k % train_data.num_classes
        adversarial = (source + 5) % train_data.num_classes
        poisons = PatchBackdoor(budget=budget).craft(None, train_data, source, adversarial,
                                                     seed=seed + k)
        for name in rows:
            torch.manual_seed(seed)
            model = build_model("convnet", num_classes=train_data.num_classes,
                                in_channels=train_data.shape[0], mean=train_data.mean,
                                std=train_data.std).to(device)
            defense = build_defense(name if name == "epic" else "none", RunFacts(
                num_examples=len(train_data), epochs=epochs,
                milestones=config.resolved_milestones, seed=seed))
            s = train(model, train_data, test_data, config, defense=defense,
                      poisons=poisons).summary
            rows[name].append({"source": source, "adversarial": adversarial,
                               "attack_success": s["attack_success"],
                               "test_acc": s["test_acc"], "poisons_dropped": s["poisons_dropped"],
                               "poisons": s["poisons"]})
            log.info("pair %d %s: %s", k, name, rows[name][-1])
    result: dict[str, Any] = {}
    for name, runs in rows.items():
        result[name] = {
            "attack_success": sum(r["attack_success"] for r in runs) / len(runs),
            "test_acc": sum(r["test_acc"] for r in runs) / len(runs),
            "successful_attacks": sum(r["attack_success"] >= 0.5 for r in runs),
            "poisons_dropped": sum(r["poisons_dropped"] for r in runs),
            "poisons": sum(r["poisons"] for r in runs), "runs": runs}
    result["attack"] = "badnets patch backdoor, 1% budget, from scratch, digits, convnet"
    result["pairs"] = pairs
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def cmd_demo(args: argparse.Namespace) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 8x8 images, a tiny model: more threads only add overhead
    try:
        r = run_demo(pairs=args.pairs, epochs=args.epochs, budget=args.budget, seed=args.seed,
                     device=pick_device(args.device))
    finally:
        torch.set_num_threads(threads)
    print(f"{r['attack']}; {r['pairs']} source/target pairs, means over pairs")
    print(f"{'':12} {'attack success':>15} {'test acc':>9} {'succeeded':>10} "
          f"{'poisons dropped':>16}")
    for name in ("undefended", "epic"):
        s = r[name]
        print(f"{name:12} {s['attack_success']:>15.3f} {s['test_acc']:>9.4f} "
              f"{s['successful_attacks']:>6}/{r['pairs']:<3} "
              f"{s['poisons_dropped']:>8}/{s['poisons']:<7}")
    print(f"{r['seconds']:.1f}s")
    if args.json:
        slim = {k: ({kk: vv for kk, vv in v.items() if kk != "runs"} if isinstance(v, dict)
                    else v) for k, v in r.items()}
        print(json.dumps(slim))
    return 0
