"""Effective poisons of a poison set (paper Sec. 3.2), measured end to end: order the poisons by
last-layer gradient distance to the adversarial target in a clean model, then bisect, by
training victims, on the shortest prefix that alone makes the attack succeed."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch

from epic.analysis import effective_poisons, gradient_distance_to_target
from epic.bench.report import plot_effective
from epic.data import ImageData
from epic.io.files import write_atomically
from epic.models import Classifier
from epic.poisons import PoisonSet
from epic.training import TrainConfig, train

__all__ = ["measure_effective", "write_effective"]


def measure_effective(model: Classifier, train_data: ImageData, test_data: ImageData,
                      poisons: PoisonSet, config: TrainConfig, *, threshold: float = 0.5,
                      pretrained: bool = False) -> dict[str, Any]:
    """Which poisons make the attack work: about log2(P) + 2 training runs of ``config``,
    each from ``model``'s weights.

    The distances are measured in ``model`` when it is ``pretrained`` (a clean model), else
    in a copy of it first trained on the clean ``train_data``. The attack succeeds when the
    victim's attack success exceeds ``threshold``.

    Returns:
        the counts, the effective poisons' training-set indices, whether they succeed alone
        and the attack fails without them, every training run, and each poison's distance.
    """
    targets = (poisons.target_images if len(poisons.target_images)
               else poisons.evaluation_images(test_data))
    probe = copy.deepcopy(model)
    if not pretrained:
        train(probe, train_data, test_data, config)
    distances = gradient_distance_to_target(probe, poisons, train_data, targets=targets)

    def succeeds(subset: PoisonSet) -> bool:
        result = train(copy.deepcopy(model), train_data, test_data, config, poisons=subset)
        return float(result.summary["attack_success"]) > threshold

    found = effective_poisons(poisons, succeeds, order=distances.argsort())
    return {"poisons": len(poisons), "effective": len(found.effective),
            "effective_rows": found.effective.tolist(),
            "effective_indices": poisons.indices[found.effective].tolist(),
            "succeeds_alone": found.succeeds_alone, "fails_without": found.fails_without,
            "training_runs": len(found.trials), "trials": found.trials,
            "distances": distances.tolist()}


def write_effective(result: dict[str, Any], out: str | os.PathLike[str]) -> Path:
    """``effective.json`` and ``effective.png`` (distance of each poison, the effective ones
    marked) of a :func:`measure_effective` result, in the folder ``out``."""
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    stored = {k: v for k, v in result.items() if k != "effective_rows"}
    write_atomically(outp / "effective.json", json.dumps(stored, indent=2))
    effective = torch.zeros(result["poisons"], dtype=torch.bool)
    effective[result["effective_rows"]] = True
    plot_effective(torch.tensor(result["distances"]), effective, outp / "effective.png")
    return outp
