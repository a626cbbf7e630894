"""``epic demo``: the main job, end to end on the embedded digits (no download).

A patch backdoor is crafted for several source/adversarial class pairs, and a convnet trained
from scratch on each poisoned set undefended and with EPIC at its default settings.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from epic.bench.demo import run_demo
from epic.cli.argtypes import at_least, number
from epic.cli.common import pick_device

__all__ = ["add_demo_command"]



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
