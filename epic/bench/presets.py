"""Presets: the CPU-scale evidence runs of docs/results.md as one resumable command each.

A preset is the list of ``epic`` command lines that produce one result store: build (or reuse)
the attacker's model, craft one poison set per benchmark setup, and train the victims under
every defense. Each step is skipped when its output exists, so an interrupted preset picks up
where it stopped, and the command lines are printed, so every row can be rerun by hand.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from epic.attacks import uses_model
from epic.defenses import paper_warmup, parse_spec, scheduled

__all__ = ["PRESETS", "Step", "preset_steps", "run_preset"]


@dataclass(frozen=True)
class Step:
    """One ``epic`` command line; ``done`` is a file whose existence means it already ran
    (None: the command resumes by itself, as ``bench run`` does)."""

    argv: tuple[str, ...]
    done: Path | None = None


def _transfer(data: Path, out: Path, first: int, defenses: Sequence[str]) -> list[Step]:
    setups = str(data / "poisoning-benchmark" / "cifar10_transfer_learning.pickle")
    common = ("--dataset", "cifar10", "--data-dir", str(data), "--model", "convnet-512",
              "--test-subset", "1000")
    extractor = out / "extractor"
    picked = ("--setups", setups, "--first", str(first), "--exact-test", "1000")
    victim = ("--scenario", "transfer", "--pretrained", str(extractor / "model.pt"))
    bench = ("bench", "run", *common, *picked, *victim, "--epochs", "40", "--lr", "0.01",
             "--weight-decay", "2e-4", "--milestones", "30", "--no-augment")
    steps = [Step(("train", *common, "--outside-victims", setups, "--epochs", "4",
                   "--out", str(extractor)), extractor / "model.pt")]
    # Feature Collision as the EPIC paper ran it: the l2 proximity term only, no l-infinity
    # bound (eps 255/255); Bullseye Polytope at the benchmark's eps 8/255
    for attack, eps in (("bp", "8"), ("fc", "255")):
        poisons = out / "poisons" / attack
        steps.append(Step(("craft", *common, *picked, *victim, "--attack", attack,
                           "--eps", eps, "--iterations", "400", "--out", str(poisons))))
        for spec in defenses:
            # EPIC in transfer learning: a round every epoch after its warmup, through the
            # last learning-rate milestone (epoch 30), as in the authors' schedule
            extra = ("--every", "1", "--until", "31") if spec.startswith("epic") else ()
            # EPIC-0.1 once more with its rounds' gradients from the training pass
            modes = ((), ("--round-embeddings", "train-pass")) if spec == "epic-0.1" else ((),)
            for mode in modes:
                steps.append(Step((*bench, "--poisons", str(poisons / "setup-*"),
                                   "--defenses", spec, *extra, *mode,
                                   "--out", str(out / "bench"))))
    return steps


# The clean model of the paper's transfer protocol: the fast net (epic.models.fast) on all
# 50,000 CIFAR-10 training images with a one-cycle schedule, as airbench trains it
FAST_RECIPE = ("--model", "fastnet", "--epochs", "16", "--batch-size", "512", "--lr", "0.2",
               "--schedule", "onecycle", "--label-smoothing", "0.2", "--crop-padding", "2",
               "--test-flips", "--channels-last")
# The same at paper scale, for a GPU: ResNet-18 for 200 epochs as the authors trained it
# (SGD lr 0.1, x0.1 at 100 and 150, batches of 128, crop and flip)
PAPER_RECIPE = ("--model", "resnet18", "--epochs", "200")
# The drop-based defenses that follow EPIC's schedule (the filters run once at their warmup)
SCHEDULED = ("epic", "random", "lowest-confidence", "highest-loss", "foreign-groups",
             "groups-epic")


# The budget study of the paper's transfer protocol: setup 0's target as this CIFAR-10 copy
# holds it (test image 99, a horse standing in for 7762; epic.setups.resolve_target) -> cat
BUDGET_TARGET = ("--target-index", "99", "--adversarial-class", "3")
BUDGET_STUDY = (250, 1500)


def _paper_transfer(data: Path, out: Path, first: int, defenses: Sequence[str], *,
                    recipe: Sequence[str] = FAST_RECIPE) -> list[Step]:
    """The EPIC paper's transfer rows as its authors' script ran them: a clean model trained on
    all of CIFAR-10 with ``recipe`` (its ``--model`` first), the from-scratch setup file's 500
    bases as poisons among all 50,000 images, and a fresh last layer trained 40 epochs on the
    frozen body (lr 0.1, x0.1 at 15, 25 and 35), with EPIC's rounds every epoch from epoch 1
    through epoch 9."""
    setups = str(data / "poisoning-benchmark" / "cifar10_from_scratch.pickle")
    common = ("--dataset", "cifar10", "--data-dir", str(data), "--test-subset", "1000")
    clean = out / "clean"
    picked = ("--setups", setups, "--first", str(first), "--exact-test", "1000",
              "--victim-per-class", "5000")
    victim = (*recipe[:2], "--scenario", "transfer", "--pretrained", str(clean / "model.pt"))
    steps = [Step(("train", *common, *recipe, "--out", str(clean), "--resume"),
                  clean / "model.pt")]
    # Feature Collision with the l2 proximity term only, as the paper ran it; both attacks
    # take the poisoning toolbox's 250 steps
    for attack, eps in (("bp", "8"), ("fc", "255")):
        steps.append(Step(("craft", *common, *picked, *victim, "--attack", attack, "--eps", eps,
                           "--iterations", "250", "--out", str(out / "poisons" / attack))))
    head = ("--epochs", "40", "--lr", "0.1", "--milestones", "15", "25", "35")
    bench = ("bench", "run", *common, *picked, *victim, *head)
    for spec in defenses:
        for attack in ("bp", "fc"):
            steps.append(Step((*bench, "--no-augment", "--poisons",
                               str(out / "poisons" / attack / "setup-*"), "--defenses", spec,
                               *_schedule(spec), "--out", str(out / "bench"))))
    # The protocol's 1% beside 0.5% and 3%: setup 0's target attacked again with 250 and
    # 1,500 poisons, random images of its base class, undefended and under the defenses that
    # drop examples
    studied = {(attack, eps, budget): out / "poisons" / f"{attack}-{budget:04d}"
               for budget in BUDGET_STUDY for attack, eps in (("bp", "8"), ("fc", "255"))}
    for (attack, eps, budget), poisons in sorted(studied.items()):  # bp's sets, then fc's
        steps.append(Step(("craft", *common, *victim, *BUDGET_TARGET, "--attack", attack,
                           "--eps", eps, "--iterations", "250", "--budget", str(budget),
                           "--out", str(poisons)), poisons / "poisons.json"))
    sets = [str(poisons) for poisons in studied.values()]
    for spec in defenses:  # a store of their own: the protocol's summary stays at 1%
        if spec == "none" or scheduled(spec):
            steps.append(Step(("bench", "run", *common, *victim, *head, "--no-augment",
                               "--poisons", *sets, "--defenses", spec, *_schedule(spec),
                               "--out", str(out / "budgets"))))
    # The authors' victims crop and flip, which cached features cannot: on the first three
    # setups, undefended and EPIC-0.2 victims that do (every epoch a pass of the body)
    for spec in ("none", "epic-0.2"):
        for attack in ("bp", "fc"):
            sets = [str(out / "poisons" / attack / f"setup-{i:03d}") for i in range(min(3, first))]
            steps.append(Step((*bench, "--poisons", *sets, "--defenses", spec, *_schedule(spec),
                               "--out", str(out / "bench"))))
    return steps


def _schedule(spec: str) -> tuple[str, ...]:
    """The authors' transfer schedule for the defenses that follow EPIC's: a round every epoch
    from epoch 1, the last at epoch 9 (their script stops dropping after epoch 10)."""
    return ("--warmup", "1", "--every", "1", "--until", "10") if spec.startswith(SCHEDULED) else ()


# Where an attack's outcome moves with any change to training (a few examples dropped, another
# seed), these defenses' victims run with more seeds: undefended, EPIC and the group detectors
SEEDED = ("none", "epic-0.1", "groups-epic-0.1", "foreign-groups")
# the from-scratch Sleeper Agent backdoor is that weak
SA_SEEDS = ("0", "1", "2", "3")


def _scratch_sa(data: Path, out: Path, first: int, defenses: Sequence[str]) -> list[Step]:
    setups = str(data / "poisoning-benchmark" / "cifar10_from_scratch.pickle")
    common = ("--dataset", "cifar10", "--data-dir", str(data), "--model", "convnet",
              "--test-subset", "1000")
    picked = ("--setups", setups, "--first", str(first), "--victim-per-class", "1000",
              "--exact-test", "1000")
    clean = out / "clean"
    poisons = out / "poisons" / "sa"
    epochs = 20
    steps = [Step(("train", *common, "--subset", "10000", "--epochs", str(epochs),
                   "--out", str(clean)), clean / "model.pt"),
             Step(("craft", *common, *picked, "--attack", "sa", "--pretrained",
                   str(clean / "model.pt"), "--retrain-epochs", "5", "--out", str(poisons)))]
    for spec in defenses:
        # the paper's 40-epoch schedule halved: warmup 5/10/15, every epoch
        steps.append(Step(("bench", "run", *common, *picked, "--epochs", str(epochs),
                           "--poisons", str(poisons / "setup-*"), "--defenses", spec,
                           *_scaled_schedule(spec, epochs, every=1),
                           *(("--seeds", *SA_SEEDS) if spec in SEEDED else ()),
                           "--out", str(out / "bench"))))
    return steps


# The from-scratch victim: the fast net on all 50,000 training images (the setup's 500 bases,
# 1%, as poisons) for 16 epochs, the paper's 40-epoch proxy schedule scaled to them: lr x0.1 at
# 10 and 14 (5/8 and 7/8 of the epochs); the attacker's clean model is trained the same way
SCRATCH_RECIPE = ("--model", "fastnet", "--epochs", "16", "--batch-size", "512", "--lr", "0.2",
                  "--schedule", "step", "--milestones", "10", "14", "--label-smoothing", "0.2",
                  "--crop-padding", "2", "--channels-last")


def _scratch(data: Path, out: Path, first: int, defenses: Sequence[str]) -> list[Step]:
    """Gradient Matching and Sleeper Agent from scratch at CPU scale, on the from-scratch
    setup file's setups (target or source class, adversarial class, 500 bases): crafted
    against a clean fast net (one restart), then a fresh fast net per setup and defense
    trained from scratch on the poisoned 50,000. Gradient Matching at eps 16/255 on every
    setup, then at 8/255 (the paper's proxy budget) undefended on the first three; last,
    Sleeper Agent (eps 16/255, the surrogate retrained 4 times for 8 epochs as the clean
    model was trained) under the EPIC rows on the first five."""
    setups = str(data / "poisoning-benchmark" / "cifar10_from_scratch.pickle")
    common = ("--dataset", "cifar10", "--data-dir", str(data), "--test-subset", "1000")
    clean = out / "clean"
    epochs = int(SCRATCH_RECIPE[SCRATCH_RECIPE.index("--epochs") + 1])
    steps = [Step(("train", *common, *SCRATCH_RECIPE, "--out", str(clean), "--resume"),
                  clean / "model.pt")]
    sleeper = [spec for spec in defenses if spec == "none" or "epic" in spec]
    for attack, eps, specs, count, extra in (
            ("gm", "16", defenses, first, ("--restarts", "1")),
            ("gm", "8", ("none",), min(3, first), ("--restarts", "1")),
            ("sa", "16", sleeper, min(5, first), ("--retrain-epochs", "8"))):
        picked = ("--setups", setups, "--first", str(count), "--exact-test", "1000",
                  "--victim-per-class", "5000")
        poisons = out / "poisons" / f"{attack}-eps{eps}"
        # the recipe's training options: the attacker's surrogate is retrained with them
        steps.append(Step(("craft", *common, *picked, *SCRATCH_RECIPE, "--pretrained",
                           str(clean / "model.pt"), "--attack", attack, "--eps", eps, *extra,
                           "--out", str(poisons))))
        for group, flags in _grouped(specs, epochs):
            steps.append(Step(("bench", "run", *common, *picked, *SCRATCH_RECIPE, "--poisons",
                               str(poisons / "setup-*"), "--defenses", *group, *flags,
                               "--out", str(out / "bench"))))
    return steps


def _grouped(specs: Sequence[str], epochs: int) -> list[tuple[list[str], tuple[str, ...]]]:
    """Consecutive defenses that share their schedule flags (or take none) as one bench run,
    with those flags: its trials go setup by setup, so the first setups have every defense of
    a group before later setups have any."""
    groups: list[tuple[list[str], tuple[str, ...]]] = []
    for spec in specs:
        flags = _scaled_schedule(spec, epochs)
        if groups and (not flags or not groups[-1][1] or flags == groups[-1][1]):
            groups[-1] = (groups[-1][0] + [spec], groups[-1][1] or flags)
        else:
            groups.append(([spec], flags))
    return groups


def _scaled_schedule(spec: str, epochs: int, every: int = 2) -> tuple[str, ...]:
    """The paper's 40-epoch schedule scaled to ``epochs``: EPIC-f's first round at f x 100 of
    40 epochs (10, 20, 30 for 0.1, 0.2, 0.3), a round every ``every`` epochs until the last
    milestone; a replayed control as the trial it replays; the other drop rules and filters
    as EPIC-0.1."""
    if not scheduled(spec):
        return ()
    options = parse_spec(spec)[1]
    replayed = parse_spec(options.get("replay_of", spec))[1]
    fraction = replayed.get("fraction", replayed.get("isolated", 0.1))  # groups-epic-f too
    warmup = round(paper_warmup(fraction) * epochs / 40)
    return ("--warmup", str(warmup), "--every", str(every))


# The coverage study's victim (which poisons each defense finds): the 3-conv net from scratch
# on the first 4,000 CIFAR-10 training images, 20 epochs
COVERAGE_VICTIM = ("--subset", "4000", "--test-subset", "1000", "--model", "convnet")
COVERAGE_EPOCHS = 20
# (folder, craft flags) per poison set, automobile -> cat backdoors at 1%, 0.5% and 3% of the
# 4,000: a 4x4 patch, dirty-label (BadNets: relabelled) and clean-label; then a random pattern
# blended in at alpha 0.2 (Chen et al. 2017), dirty-label
_PATCH = ("--attack", "patch", "--patch-size", "4")
_KINDS = ((("badnets", _PATCH), ("clean-label", (*_PATCH, "--clean-label"))),
          (("blend", ("--attack", "blend", "--alpha", "0.2")),))
_BUDGETS = (40, 20, 120)
COVERAGE_SETS = tuple((f"{kind}-{budget:04d}", (*flags, "--budget", str(budget)))
                      for kinds in _KINDS for budget in _BUDGETS for kind, flags in kinds)
# Poisons crafted against a clean victim trained on the same 4,000 images (the preset's
# clean/model.pt), at the same budgets, eps 16/255: Gradient Matching on the exact test
# automobile 6 (which the clean fast net classifies right) -> cat, and Sleeper Agent
# automobile -> cat, its surrogate retrained 4 times for 8 epochs
CRAFTED_SETS = tuple((f"{kind}-{budget:04d}", (*flags, "--budget", str(budget)))
                     for kind, flags in (("gm", ("--attack", "gm", "--target-index", "6",
                                                 "--restarts", "1")),
                                         ("sa", ("--attack", "sa", "--retrain-epochs", "8")))
                     for budget in _BUDGETS)


# The same poison sets against the fast net (epic.models.fast, 77% on 4,000 images in 20
# epochs), which learns the 1% backdoor that the convnet does not
GROUPS_VICTIM = ("--subset", "4000", "--test-subset", "1000", "--model", "fastnet", "--lr",
                 "0.2", "--schedule", "onecycle", "--label-smoothing", "0.2", "--crop-padding",
                 "2", "--channels-last")


_COVERAGE_TRAINING = ("--epochs", str(COVERAGE_EPOCHS))


def _coverage_common(data: Path, victim: Sequence[str]) -> tuple[str, ...]:
    """The coverage studies' data and victim options (crafting takes them too)."""
    return ("--dataset", "cifar10", "--data-dir", str(data), *victim)


def _coverage(data: Path, out: Path, first: int, defenses: Sequence[str], *,
              victim: Sequence[str] = COVERAGE_VICTIM,
              sets: Sequence[tuple[str, tuple[str, ...]]] = COVERAGE_SETS) -> list[Step]:
    """What each detector flags of each poison set of ``sets``: crafted on the first 4,000
    training images (the backdoors need no model), then per defense a fresh ``victim``
    (the convnet by default) trained from scratch on each set, its drops recorded (poisons
    and clean examples). The paper's 40-epoch schedule scaled to 20 epochs: EPIC-0.1/0.2/0.3
    from epoch 5/10/15, a round every 2nd epoch; the feature-space filters and drop rules as
    EPIC-0.1; last, every detector's curve over its threshold (``epic bench curves``).
    ``first``: how many of ``sets``, in their order. A set whose attack crafts against a
    model is crafted against a clean victim trained first (``clean/model.pt``)."""
    common, epochs = _coverage_common(data, victim), _COVERAGE_TRAINING
    poisons, clean = out / "poisons", out / "clean" / "model.pt"
    chosen = sets[:first]
    attacked = {name: uses_model(flags[flags.index("--attack") + 1]) for name, flags in chosen}
    steps = [Step(("train", *common, *epochs, "--out", str(clean.parent), "--resume"), clean)
             ] if any(attacked.values()) else []
    for name, flags in chosen:
        attacker = ("--pretrained", str(clean)) if attacked[name] else ()
        steps.append(Step(("craft", *common, *attacker, "--source-class", "1",
                           "--adversarial-class", "3", *flags, "--out", str(poisons / name)),
                          poisons / name / "poisons.json"))
    folders = [str(poisons / name) for name, _ in chosen]
    for group, flags in _grouped(defenses, COVERAGE_EPOCHS):
        steps.append(Step(("bench", "run", *common, *epochs, "--poisons", *folders,
                           "--defenses", *group, *flags, "--out", str(out / "bench"))))
    # every detector at every threshold, on the undefended victim at EPIC-0.1's first round
    # and at the end
    steps.append(Step(("bench", "curves", *common, *epochs, "--poisons", *folders,
                       "--at", str(COVERAGE_EPOCHS // 4), str(COVERAGE_EPOCHS),
                       "--out", str(out / "curves"))))
    return steps


GROUPS_SETS = COVERAGE_SETS + CRAFTED_SETS


# Gradient Matching's one target flips or not with any change to training: its 0.5% set's
# undefended, EPIC-0.1 and group-detector victims again with these seeds
GM_SEEDS = ("1", "2")


def _groups(data: Path, out: Path, first: int, defenses: Sequence[str]) -> list[Step]:
    """:func:`_coverage` with fast-net victims, on the backdoors and then the crafted sets;
    last, on the 3% dirty-label set, where the fast net learns the trigger before EPIC-0.1's
    first round, foreign-groups with a round every epoch from epoch 2, then from epoch 1;
    and the 0.5% Gradient Matching set with more seeds (:data:`GM_SEEDS`)."""
    steps = _coverage(data, out, first, defenses, victim=GROUPS_VICTIM, sets=GROUPS_SETS)
    chosen = [name for name, _ in GROUPS_SETS[:first]]
    bench = ("bench", "run", *_coverage_common(data, GROUPS_VICTIM), *_COVERAGE_TRAINING,
             "--out", str(out / "bench"))
    if "badnets-0120" in chosen and "foreign-groups" in defenses:
        steps += [Step((*bench, "--poisons", str(out / "poisons" / "badnets-0120"),
                        "--defenses", "foreign-groups", "--warmup", warmup, "--every", "1"))
                  for warmup in ("2", "1")]
    seeded = [spec for spec in SEEDED if spec in defenses]
    if "gm-0020" in chosen and seeded:
        steps.append(Step((*bench, "--poisons", str(out / "poisons" / "gm-0020"), "--defenses",
                           *seeded, *_scaled_schedule("epic-0.1", COVERAGE_EPOCHS),
                           "--seeds", *GM_SEEDS)))
    return steps


TRANSFER_DEFENSES = ("none", "epic-0.1", "epic-0.2", "epic-0.3", "deep-knn",
                     "spectral-signatures", "activation-clustering", "lowest-confidence",
                     "highest-loss", "random", "dp-sgd", "foreign-groups")

PRESETS: dict[str, tuple[Callable[[Path, Path, int, Sequence[str]], list[Step]], int,
                         tuple[str, ...]]] = {
    # name: (steps, default number of setups, default defenses)
    "cpu-transfer": (_transfer, 20, TRANSFER_DEFENSES),
    "cpu-scratch-sa": (_scratch_sa, 8, ("none", "epic-0.1", "epic-0.2", "epic-0.3",
                                         "groups-epic-0.1", "foreign-groups")),
    # random-as-epic-0.1: as many random drops as EPIC-0.1's, at its epochs, per setup
    "cpu-scratch": (_scratch, 10, ("none", "epic-0.1", "random-as-epic-0.1", "epic-0.2",
                                   "epic-0.3", "deep-knn", "spectral-signatures",
                                   "activation-clustering", "foreign-groups",
                                   "groups-epic-0.1")),
    # random-0.1: 10% of the kept examples a round on EPIC's schedule, 61% in all, about as
    # many as EPIC-0.2 drops: whether EPIC finds poisons or only removes data
    "cpu-paper-transfer": (_paper_transfer, 10, ("none", "epic-0.2", "epic-0.1", "epic-0.3",
                                                 "random", *TRANSFER_DEFENSES[4:9],
                                                 "dp-sgd", "random-0.1", "foreign-groups",
                                                 "groups-epic-0.2")),
    # which poisons each detector finds: patch backdoors at 0.5%, 1% and 3%
    "cpu-coverage": (_coverage, len(COVERAGE_SETS), ("none", "epic-0.1", "epic-0.2", "epic-0.3",
                                                     "deep-knn", "spectral-signatures",
                                                     "activation-clustering",
                                                     "lowest-confidence", "highest-loss")),
    # the foreign-groups detector against EPIC and Activation Clustering, with EPIC's drops
    # (groups-epic), and fresh models without all either dropped; fast-net victims, on the
    # backdoors and on Gradient Matching and Sleeper Agent sets
    "cpu-groups": (_groups, len(GROUPS_SETS),
                   ("none", "foreign-groups", "epic-0.1", "activation-clustering",
                    "groups-epic-0.1", "retrain-after-groups-epic-0.1",
                    "retrain-after-foreign-groups")),
    "paper-transfer": (partial(_paper_transfer, recipe=PAPER_RECIPE), 10, ("none", "epic-0.2",
                                                                          "epic-0.1",
                                                                          "epic-0.3")),
}


def preset_steps(name: str, *, data_dir: str | os.PathLike[str], out: str | os.PathLike[str],
                 first: int | None = None, defenses: Sequence[str] | None = None) -> list[Step]:
    """The command lines of preset ``name`` (see :data:`PRESETS`), in order."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    build, default_first, default_defenses = PRESETS[name]
    return build(Path(data_dir), Path(out), first or default_first,
                 tuple(defenses or default_defenses))


def run_preset(name: str, *, data_dir: str | os.PathLike[str], out: str | os.PathLike[str],
               run: Callable[[list[str]], int], first: int | None = None,
               defenses: Sequence[str] | None = None) -> None:
    """Run the steps of preset ``name`` that have not run yet, printing each command;
    ``run(argv)`` runs one ``epic`` command line (``epic.cli`` passes its own dispatch) and
    gives its exit code."""
    for step in preset_steps(name, data_dir=data_dir, out=out, first=first, defenses=defenses):
        if step.done is not None and step.done.exists():
            print(f"# done: epic {' '.join(step.argv)}", flush=True)
            continue
        print(f"epic {' '.join(step.argv)}", flush=True)
        argv: list[str] = []
        for arg in step.argv:  # expand the poison-set glob as a shell would
            argv += sorted(glob.glob(arg)) if "*" in arg else [arg]
        code = run(argv)
        if code:
            raise RuntimeError(f"preset {name}: `epic {' '.join(step.argv)}` exited with {code}")
