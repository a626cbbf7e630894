"""Run poison set x defense x seed trials and store attack success, accuracy and time."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from epic.bench.report import defense_rounds
from epic.bench.schema import VERSION, migrate
from epic.bench.store import ResultStore
from epic.data import ImageData
from epic.defenses import DEFENSES, build_defense, options_for, parse_spec, scheduled
from epic.errors import EpicError
from epic.gradients import feature_embeddings
from epic.io.files import read_untrusted, replace_atomically
from epic.io.safe_pickle import load_weights
from epic.models import Classifier
from epic.poisons import PoisonSet
from epic.protocol import changes_batches
from epic.training import TrainConfig, provenance, train
from epic.training.config import RETIRED_SETTINGS
from epic.training.records import describe, describe_device

__all__ = ["HOW", "Trial", "compare_rerun", "plan_trials", "rerun_defense",
           "run_trials", "trial_id", "victim_features"]

log = logging.getLogger(__name__)


_POISON_FILES = ("poisons.json", "poisons.npz")  # a poison set, as PoisonSet.save writes it
# Settings that say how the trainer ran a trial, not which trial it is: rows stored before
# the new last layer came from the run's seed (TrainConfig.head_rng), or before a last batch
# of one example was left out (min_batch), are the same trials; `bench rerun` reruns each as
# it ran.
HOW = ("head_rng", "min_batch")


def trial_id(record: Mapping[str, Any], digests: dict[str, str | None] | None = None) -> str:
    """The identity of the trial a record describes: a hash of everything that defines it.

    That is the poison set (its folder's resolved path, the SHA-256 of its files, and the
    attack, eps, classes and benchmark setup read from it), the scenario, the defense as
    specified, the schedule overrides, the seed, the training configuration, and the setting
    (the model and the data, see :func:`plan_trials`). A planned trial and its stored record
    give the same identity, so a rerun with the same arguments skips it, while poison folders
    of one name in two places, or another ``--epochs``, make other trials. How a value was
    spelled does not count: a default given explicitly is the same trial; nor does where the
    new last layer was drawn from (``head_rng``), nor which last batches were left out
    (``min_batch``).

    Records written before poison sets were hashed lack ``poisons_sha256``: they are taken to
    have run on what their folder holds now. A record of an older schema is read as today's
    (:func:`~epic.bench.schema.migrate`). Relative paths resolve against
    the current directory, as they did for the command that wrote them: resume from there.

    Args:
        digests: resolved poison folder -> SHA-256 of its files, filled as folders are read,
            so that many old records of one poison set read it once.
    """
    poisons = os.path.realpath(record["poisons_dir"])
    digest = record.get("poisons_sha256")
    if digest is None:
        digests = {} if digests is None else digests
        if poisons not in digests:
            digests[poisons] = _poisons_sha256(poisons)
        digest = digests[poisons]
    facts = {k: record.get(k) for k in ("attack", "eps", "target_class", "adversarial_class",
                                        "setup", "scenario", "defense", "seed", "schedule")}
    current = migrate(dict(record))
    config = {k: v for k, v in current["config"].items() if k not in HOW}
    facts |= {"poisons": [poisons, digest], "config": config, "setting": current["setting"]}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def compare_rerun(stored: Mapping[str, Any], rerun: Mapping[str, Any]) -> dict[str, Any]:
    """Whether a rerun of a stored trial came out the same: attack success, test accuracy and
    the drops, field by field, and a one-line ``verdict``.

    On one device a rerun is exact (``reproduced``). Across devices (a row stored from a GPU,
    rerun on the CPU) the arithmetic differs, so exact equality is not expected: the verdict
    names both devices and says whether the outcome (attack success) held.
    """
    fields = ("attack_success", "test_acc", "poisons_dropped", "examples_dropped")
    same = {f: stored.get(f) == rerun.get(f) for f in fields}
    devices = (str(stored.get("device", "cpu")), str(rerun.get("device", "cpu")))
    verdict = ("reproduced" if all(same.values())
               else "DIFFERS: " + ", ".join(f for f, ok in same.items() if not ok))
    if devices[0] != devices[1] and not all(same.values()):
        held = "held" if same["attack_success"] else "did NOT hold"
        verdict += (f" (stored on {devices[0]}, rerun on {devices[1]}: the arithmetic differs "
                    f"across devices; the attack's outcome {held})")
    return {"key": stored.get("key"), "reproduced": all(same.values()),
            "same_outcome": same["attack_success"], "devices": list(devices),
            "stored": {f: stored.get(f) for f in fields},
            "rerun": {f: rerun.get(f) for f in fields}, "seconds": rerun.get("seconds"),
            "verdict": verdict}


def rerun_defense(record: Mapping[str, Any]) -> str:
    """The defense spec that reruns what a stored record ran.

    Rows stored while ``dp-sgd`` meant clipping and noising the mini-batch gradient (a
    retired ``grad_clip``/``grad_noise`` in their configuration) ran what ``clip-noise`` runs
    now, with the same noise stream; at its defaults (clip 1, noise 0.01) they rerun as
    ``clip-noise``. Other retired settings cannot be set by ``bench run``: an error says so.
    """
    config = record.get("config") or {}
    retired = {k: config[k] for k in RETIRED_SETTINGS
               if k in config and config[k] != RETIRED_SETTINGS[k]}
    if not retired:
        return str(record["defense"])
    if retired == {"grad_clip": 1.0, "grad_noise": 0.01}:
        return "clip-noise"
    raise EpicError(f"the row ran batch-level clipping and noise {retired} under "
                    f"{record['defense']!r}, which a benchmark run cannot set: train it with "
                    f"defense clip-noise and its dp_clip and dp_noise set to those values",
                    options=("defense", "dp_clip", "dp_noise"))


def _poisons_sha256(folder: str | os.PathLike[str]) -> str | None:
    """SHA-256 of a poison set's files; None when they cannot be read."""
    h = hashlib.sha256()
    try:
        for name in _POISON_FILES:
            data = read_untrusted(Path(folder) / name)
            h.update(f"{name} {len(data)}\n".encode() + data)
    except (OSError, ValueError):  # missing, or not a regular file: the set's reader says so
        return None
    return h.hexdigest()


@dataclass(frozen=True)
class Trial:
    """A planned trial: its identity (:func:`trial_id`), the record it will be stored as less
    its outcome, its poison set and its own training configuration (its seed)."""

    id: str
    record: dict[str, Any]
    poisons: PoisonSet
    config: TrainConfig


def plan_trials(
    poison_dirs: Sequence[str | os.PathLike[str]],
    defenses: Sequence[str],
    *,
    seeds: Sequence[int],
    config: TrainConfig,
    setting: Mapping[str, Any],
    warmup: int | None = None,
    every: int | None = None,
    until: int | None = None,
    context: Mapping[str, Any] | None = None,
) -> Iterator[Trial]:
    """The trials of poison set x defense x seed, in that order, without running any; each
    poison set is read (and hashed) when its first trial is planned. Arguments as in
    :func:`run_trials`."""
    missing = [name for name in ("dataset", "model") if name not in setting]
    if missing:
        raise EpicError(f"a trial's setting must name its {' and '.join(missing)}: two trials "
                        f"on other data or another model would share an identity",
                        options=("setting",))
    setting = json.loads(json.dumps(dict(setting)))  # as the store will hold it
    schedule = {"warmup": warmup, "every": every, "until": until}
    unscheduled = dict.fromkeys(schedule)  # what the flags mean to a defense without rounds
    for poison_dir in poison_dirs:
        digest = _poisons_sha256(poison_dir)
        poisons = PoisonSet.load(poison_dir)
        for spec in defenses:
            parse_spec(spec)  # an unknown defense stops the plan before anything runs
            for seed in seeds:
                trial_config = dataclasses.replace(config, seed=seed)
                record = {"key": f"{Path(poison_dir).name}/{spec}/{config.scenario}/{seed}",
                          "poisons_dir": str(poison_dir), "poisons_sha256": digest,
                          "attack": str(poisons.metadata.get("attack", "unknown")),
                          "scenario": config.scenario, "defense": spec, "seed": seed,
                          "eps": poisons.eps, "target_class": poisons.target_class,
                          "adversarial_class": poisons.adversarial_class,
                          "setup": poisons.metadata.get("setup"),
                          "schedule": schedule if scheduled(spec) else unscheduled,
                          "config": dataclasses.asdict(trial_config), "setting": setting,
                          "schema": VERSION}
                record |= context or {}
                yield Trial(trial_id(record), record, poisons, trial_config)


def run_trials(
    poison_dirs: Sequence[str | os.PathLike[str]],
    defenses: Sequence[str],
    *,
    seeds: Sequence[int],
    train_data: ImageData,
    test_data: ImageData,
    make_model: Callable[[int], Classifier],
    config: TrainConfig,
    setting: Mapping[str, Any],
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

    Trials already in the store (by :func:`trial_id`) are skipped, so an interrupted benchmark
    resumes; so are trials that another run on the same store is running (it holds their
    claim, see :meth:`ResultStore.claim`), so two runs share the work and store each trial
    once. Each trial's run folder (metrics, defense records) goes under ``out/trials/``, named
    by its key and identity.

    Args:
        make_model: seed -> a fresh model (loaded with pretrained weights for transfer and
            fine-tuning), on the device to train on.
        config: the pipeline; its ``seed`` is replaced by each trial's seed.
        setting: what the model and the data are, JSON values under names of the caller's
            choosing; at least ``dataset`` and ``model``, and whatever else tells two trials
            apart (``epic bench run`` adds the subsets, pretrained weights, setup file, victim
            and exact-test sizes, paths resolved). It is part of each trial's identity.
        warmup, every, until: override the paper schedules of the defenses that have one
            (see :func:`epic.defenses.build_defense`).
        victim_for: poison set -> the training set it belongs to (benchmark setups give each
            trial its own victim set); default: ``train_data`` for every poison set. Called
            only for poison sets with a trial to run.
        context: facts stored with every record, not part of its identity: the command line
            (``argv``), for ``bench rerun``.

    Returns:
        The records written in this call.
    """
    digests: dict[str, str | None] = {}
    schedule = {"warmup": warmup, "every": every, "until": until}

    def stored() -> dict[str, dict[str, Any]]:
        return {trial_id(r, digests): r for r in store.load()}

    done = stored()
    written = []
    versions = provenance()  # the same for every trial of this call
    victim: tuple[PoisonSet, ImageData] | None = None  # the last poison set's training set
    for trial in plan_trials(poison_dirs, defenses, seeds=seeds, config=config, setting=setting,
                             warmup=warmup, every=every, until=until, context=context):
        if trial.id in done:
            continue
        key = trial.record["key"]
        with store.claim(trial.id) as mine:
            current = stored()
            if not mine or trial.id in current:
                log.info("%s: %s in another run", key, "running" if not mine else "finished")
                continue
            if victim is None or victim[0] is not trial.poisons:
                victim = trial.poisons, (train_data if victim_for is None
                                         else victim_for(trial.poisons))
                trial.poisons.validate(victim[1])
            record = _train_trial(trial, victim[1], test_data, make_model, current,
                                  schedule=schedule, out=Path(out),
                                  progress=progress) | {"run": versions}
            store.append(record)
            written.append(record)
            log.info("%s: success %s, acc %s", key, record["attack_success"], record["test_acc"])
    return written


def _train_trial(trial: Trial, data: ImageData, test_data: ImageData,
                 make_model: Callable[[int], Classifier],
                 records: Mapping[str, Mapping[str, Any]], *, schedule: Mapping[str, int | None],
                 out: Path, progress: bool) -> dict[str, Any]:
    """Train ``trial``'s victim (a fresh model, on ``data`` with the trial's poisons) under
    its defense; its record with the outcome. ``records``: the store's, for a defense that
    replays another trial's drops; ``schedule``: the warmup, every and until overrides."""
    config, spec = trial.config, trial.record["defense"]
    run = config.run_facts(len(data), poison_eps=trial.poisons.eps)
    options = options_for(spec, dict(schedule))
    name, preset = parse_spec(spec)
    if "replay_of" in preset:
        replaying = cast(Any, DEFENSES[name])  # a class of REPLAYS: it reads the rounds
        options |= replaying.replay_options(replayed_rounds(records, trial.record,
                                                            preset["replay_of"]))
    defense = build_defense(spec, run, **options)
    model = make_model(config.seed)
    features = None
    if config.scenario == "transfer" and not config.augment and not changes_batches(defense):
        features = victim_features(model, data, trial.poisons, out / "features")
    run_dir = out / "trials" / f"{trial.record['key'].replace('/', '_')}-{trial.id[:8]}"
    start = time.perf_counter()
    result = train(copy.deepcopy(model), data, test_data, config, defense=defense,
                   poisons=trial.poisons, out=run_dir, progress=progress, features=features)
    resolved = {"lr": config.resolved_lr, "milestones": list(config.resolved_milestones),
                "defense": describe(defense)}
    return trial.record | {"wall_seconds": round(time.perf_counter() - start, 3),
                           "resolved": resolved, "run_dir": str(run_dir),
                           "device": describe_device(_device_of(model))} | result.summary


def replayed_rounds(records: Mapping[str, Mapping[str, Any]], record: Mapping[str, Any],
                    spec: str) -> list[dict[str, Any]]:
    """The rounds of the ``spec`` trial that is ``record``'s twin (the same poison set, seed,
    settings and schedule flags; :func:`trial_id`), from its run folder's ``defense.json``:
    what ``random-as-<spec>`` and ``retrain-after-<spec>`` replay.

    Args:
        records: the store's records by trial identity.

    Raises:
        ValueError: the twin is not in ``records`` (it must run first), or its rounds cannot
            be read (named by file and field).
    """
    twin = records.get(trial_id(dict(record) | {"defense": spec}))
    if twin is None:
        raise EpicError(f"{record['key']}: {record['defense']} replays the {spec} trial of the "
                        f"same poison set, seed and settings (schedule included), which this "
                        f"store does not hold: run it first (defenses {spec})",
                        options=("defenses",))
    return defense_rounds(twin["run_dir"])


def victim_features(model: Classifier, data: ImageData, poisons: PoisonSet,
                    cache: str | os.PathLike[str]) -> torch.Tensor:
    """The frozen body's features ``(N, F)`` of ``data`` with ``poisons`` in place.

    The clean images' features are the same for every poison set of one victim set: they are
    computed once per (body weights, images) and kept in ``cache`` (a file named by their
    hash); only the poisons' own are computed per call, so that a transfer victim on 50,000
    images costs one pass over its 500 poisons instead of all 50,000.
    """
    device = _device_of(model)
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not name.startswith("classifier."):
            h.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    h.update(data.images.cpu().contiguous().numpy().tobytes())
    path = Path(cache) / f"{h.hexdigest()[:16]}.pt"
    clean = load_weights(path, map_location=device) if path.is_file() else None
    if not isinstance(clean, torch.Tensor) or clean.shape[0] != len(data):
        clean = feature_embeddings(model, data)[0]  # none yet, or not ours: computed afresh
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, lambda f: torch.save(clean.cpu(), f))
    rows = poisons.indices.to(clean.device)
    features = clean.clone()
    features[rows] = feature_embeddings(model, poisons.apply(data).subset(poisons.indices)
                                        )[0].to(clean.device)
    return features


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
