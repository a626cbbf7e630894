"""Run poison set x defense x seed trials and store attack success, accuracy and time."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from epic.bench.store import ResultStore
from epic.data import ImageData
from epic.defenses import DEFENSES, DP_SGD_CLIP, DP_SGD_NOISE, build_batch_transform, build_defense
from epic.models import Classifier
from epic.poisons import PoisonSet
from epic.train import TrainConfig, provenance, train

__all__ = ["parse_defense", "run_trials"]

log = logging.getLogger(__name__)


def parse_defense(spec: str) -> tuple[str, float]:
    """A defense spec and its number: ``"epic-0.2"`` -> ``("epic", 0.2)`` (medoid fraction),
    ``"ap-0.25"`` -> ``("adversarial-poisoning", 0.25)`` (share of each batch poisoned); other
    names come with 0.1 for EPIC and 0.5 for Adversarial Poisoning."""
    prefix, _, number = spec.rpartition("-")
    name = {"epic": "epic", "ap": "adversarial-poisoning"}.get(prefix)
    if name is not None:
        try:
            return name, float(number)
        except ValueError:
            pass
    if spec not in DEFENSES:
        raise ValueError(f"unknown defense {spec!r}; choose from {', '.join(DEFENSES)} "
                         "(or epic-<fraction>, ap-<share>: epic-0.1, ap-0.5, ...)")
    return spec, 0.5 if spec == "adversarial-poisoning" else 0.1


def run_trials(
    poison_dirs: Sequence[str | os.PathLike[str]],
    defenses: Sequence[str],
    *,
    seeds: Sequence[int],
    train_data: ImageData,
    test_data: ImageData,
    make_model: Callable[[int], Classifier],
    config: TrainConfig,
    store: ResultStore,
    out: str | os.PathLike[str],
    warmup: int | None = None,
    every: int | None = None,
    until: int | None = None,
    progress: bool = False,
    victim_for: Callable[[PoisonSet], ImageData] | None = None,
    context: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Train once per (poison set, defense, seed) and append each outcome to ``store``.

    Trials already in the store are skipped, so an interrupted benchmark resumes. Each trial's
    run folder (metrics, defense records) goes under ``out/trials/``.

    Args:
        make_model: seed -> a fresh model (loaded with pretrained weights for transfer and
            fine-tuning), on the device to train on.
        config: the pipeline; its ``seed`` is replaced by each trial's seed.
        warmup, every, until: override the defenses' paper schedules (see
            :func:`epic.defenses.build_defense`).
        victim_for: poison set -> the training set it belongs to (benchmark setups give each
            trial its own victim set); default: ``train_data`` for every poison set.
        context: facts stored with every record (the command line, for ``bench rerun``).

    Returns:
        The records written in this call.
    """
    done = store.keys()
    written = []
    versions = provenance()  # the same for every trial of this call
    for poison_dir in poison_dirs:
        poisons = PoisonSet.load(poison_dir)
        data = train_data if victim_for is None else victim_for(poisons)
        poisons.validate(data)
        attack = str(poisons.metadata.get("attack", "unknown"))
        for spec in defenses:
            name, number = parse_defense(spec)
            for seed in seeds:
                key = f"{Path(poison_dir).name}/{spec}/{config.scenario}/{seed}"
                if key in done:
                    continue
                dp = name == "dp-sgd"
                trial_config = dataclasses.replace(
                    config, seed=seed, grad_clip=DP_SGD_CLIP if dp else config.grad_clip,
                    grad_noise=DP_SGD_NOISE if dp else config.grad_noise)
                defense = build_defense(name, num_examples=len(data),
                                        epochs=config.epochs,
                                        milestones=trial_config.resolved_milestones,
                                        scenario=config.scenario, fraction=number,
                                        warmup=warmup, every=every, until=until, seed=seed)
                model = make_model(seed)
                run_dir = Path(out) / "trials" / key.replace("/", "_")
                start = time.perf_counter()
                transform = build_batch_transform(name, share=number, eps=poisons.eps, seed=seed)
                result = train(copy.deepcopy(model), data, test_data, trial_config,
                               defense=defense, poisons=poisons, out=run_dir, progress=progress,
                               batch_transform=transform)
                record = {"key": key, "poisons_dir": str(poison_dir), "attack": attack,
                          "scenario": config.scenario, "defense": spec, "seed": seed,
                          "eps": poisons.eps, "target_class": poisons.target_class,
                          "adversarial_class": poisons.adversarial_class,
                          "wall_seconds": round(time.perf_counter() - start, 3),
                          "run_dir": str(run_dir), "device": str(_device_of(model)),
                          "setup": poisons.metadata.get("setup"),
                          "schedule": {"warmup": warmup, "every": every, "until": until},
                          "config": dataclasses.asdict(trial_config), "run": versions}
                record |= context or {}
                record |= result.summary
                store.append(record)
                written.append(record)
                log.info("%s: success %.3f, acc %.4f", key, record["attack_success"],
                         record["test_acc"])
    return written


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
