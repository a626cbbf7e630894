"""The demo's numbers (``epic demo``): a patch backdoor on the embedded digits, trained from
scratch undefended and with EPIC, for several source/adversarial class pairs."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from epic.attacks import PatchBackdoor
from epic.data import load_digits
from epic.defenses import RunFacts, build_defense
from epic.models import build_model
from epic.training import TrainConfig, train

__all__ = ["run_demo"]

log = logging.getLogger("epic")


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
            with torch.random.fork_rng(devices=[]):  # the caller's global RNG left alone
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
