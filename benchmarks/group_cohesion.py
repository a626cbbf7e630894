"""How cohesive the large groups of the group detectors' rounds were, clean and poisoned.

Reads every stored trial of a group defense (``foreign-groups``, ``groups-epic-*``) in the given
result stores, and every group its rounds recorded (``defense.json``). A group is *large* when
it holds more than ``--share`` (default 1/8, ``ForeignGroups``'s ``unlearned``) of an average
class (the trial's examples over its classes); *poisoned* when most of its members are poisons,
*clean* when none is. Prints one JSON object: per kind, how many large groups, their cohesion's
quantiles and the largest, and the large poisoned groups the detector spared with the trial and
epoch of each. Where ``tight`` (``ForeignGroups``) sits between the two is what this measures.

Usage:
    python benchmarks/group_cohesion.py benchmarks/results/*/bench/results.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from epic.bench import ResultStore
from epic.bench.report import defense_rounds


def _quantiles(values: list[float]) -> dict[str, float]:
    """The 0, 10, 50, 90 and 100th percentiles, each one of ``values``."""
    if not values:
        return {}
    levels = (0, 10, 50, 90, 100)
    return {f"q{q}": float(v) for q, v in
            zip(levels, np.percentile(values, levels, method="nearest"), strict=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stores", nargs="+", help="results.jsonl files of `epic bench run`")
    parser.add_argument("--share", type=float, default=1 / 8)
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()
    cohesion: dict[str, list[float]] = {"clean": [], "poisoned": []}
    spared: list[dict[str, Any]] = []
    for path in args.stores:
        trials = Path(path).parent / "trials"
        for record in ResultStore(path).load():
            if "groups" not in str(record["defense"]):
                continue
            folder = trials / Path(record["run_dir"]).name
            if not (folder / "defense.json").is_file():
                continue
            average_class = record["examples"] / args.classes
            for round_ in defense_rounds(folder):
                for group, poisons in zip(round_.get("groups", []),
                                          round_.get("group_poisons", []), strict=True):
                    if group["size"] <= args.share * average_class:
                        continue
                    kind = ("poisoned" if poisons > group["size"] / 2 else
                            "clean" if poisons == 0 else None)
                    if kind is not None:
                        cohesion[kind].append(group["cohesion"])
                    if kind == "poisoned" and not group["dropped"]:
                        spared.append({"store": path, "key": record["key"],
                                       "schedule": record.get("schedule"),
                                       "epoch": round_["epoch"], "size": group["size"],
                                       "poisons": poisons, "cohesion": group["cohesion"],
                                       "learned": group.get("learned")})
    print(json.dumps({kind: {"groups": len(values), "cohesion": _quantiles(values)}
                      for kind, values in cohesion.items()} | {"poisoned_spared": spared},
                     indent=1))


if __name__ == "__main__":
    main()
