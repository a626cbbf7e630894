"""Presets: every step is a valid ``epic`` command line, in the order the evidence needs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from epic.bench.presets import PRESETS, preset_steps
from epic.cli import build_parser


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_step_parses_as_an_epic_command(name: str, tmp_path: Path) -> None:
    steps = preset_steps(name, data_dir=tmp_path / "data", out=tmp_path / "out", first=3)
    parser = build_parser()
    commands, own_targets = [], []
    for step in steps:
        args = parser.parse_args(list(step.argv))
        command = args.command if args.command != "bench" else args.bench_command
        if args.command in ("craft", "bench") and name not in PATCH_STUDIES:  # setups
            if args.setups is None:  # the transfer protocol's budget study: its own test
                own_targets.append(command)
                continue
            assert args.first == 3 and args.exact_test == 1000
        commands.append(command)
    if name in PATCH_STUDIES:  # no setups: their own test below
        return
    assert bool(own_targets) == ("paper-transfer" in name)
    # the attacker's model first, then crafting, then one bench run per defense
    assert commands[0] == "train" and steps[0].done is not None
    assert commands[1] == "craft"
    if name == "cpu-scratch":  # two poison sets, defenses grouped: its own test below
        return
    build, _, defenses = PRESETS[name]
    # a victim per defense and poison set, and EPIC-0.1 once more in transfer learning with
    # its rounds' gradients from the training pass; the paper's transfer protocol runs its
    # undefended and EPIC-0.2 victims once more with crop and flip
    runs = len(defenses) + (name == "cpu-transfer") + 2 * ("paper-transfer" in name)
    assert commands.count("run") == runs * commands.count("craft")
    passes = [s.argv for s in steps if "train-pass" in s.argv]
    assert len(passes) == (2 if name == "cpu-transfer" else 0)
    assert all(a[a.index("--defenses") + 1] == "epic-0.1" for a in passes)


PATCH_STUDIES = ("cpu-coverage", "cpu-groups")


@pytest.mark.parametrize(("name", "model"), [("cpu-coverage", "convnet"),
                                             ("cpu-groups", "fastnet")])
def test_coverage_presets_craft_their_sets_and_run_every_detector_on_each(name: str, model: str
                                                                       ) -> None:
    from epic.bench.presets import COVERAGE_SETS, GROUPS_SETS

    sets = GROUPS_SETS if name == "cpu-groups" else COVERAGE_SETS
    steps = preset_steps(name, data_dir="d", out="o")
    parser = build_parser()
    crafts = [parser.parse_args(list(s.argv)) for s in steps if s.argv[0] == "craft"]
    assert [(c.attack, c.budget, c.clean_label, c.source_class, c.adversarial_class)
            for c in crafts[:9]] == [
        *(("patch", b, clean, 1, 3) for b in (40, 20, 120) for clean in (False, True)),
        *(("blend", b, False, 1, 3) for b in (40, 20, 120))]
    assert [(c.patch_size, c.alpha, c.pretrained) for c in crafts[:9]] == (
        [(4, None, None)] * 6 + [(None, 0.2, None)] * 3)
    if name == "cpu-groups":  # crafted against a clean fast net trained first
        clean = parser.parse_args(list(steps[0].argv))
        assert (clean.command, clean.model, clean.subset, clean.epochs, clean.resume) == (
            "train", "fastnet", 4000, 20, True)
        assert steps[0].done == Path("o/clean/model.pt")
        # Gradient Matching on one test automobile, Sleeper Agent on the class
        assert [(c.attack, c.budget, c.target_index, c.pretrained) for c in crafts[9:]] == [
            (attack, b, target, "o/clean/model.pt") for attack, target in (("gm", 6), ("sa", 0))
            for b in (40, 20, 120)]
    else:  # patches and patterns need no model
        assert len(crafts) == 9 and steps[0].argv[0] == "craft"
    assert [s.done for s in steps if s.argv[0] == "craft"] == [
        Path("o/poisons") / name / "poisons.json" for name, _ in sets]
    [curves] = [s for s in steps if s.argv[:2] == ("bench", "curves")]
    assert curves.done is None  # the command skips the sets it has measured
    curve_args = parser.parse_args(list(curves.argv))
    assert curve_args.poisons == [f"o/poisons/{name}" for name, _ in sets]
    assert (curve_args.model, curve_args.epochs, curve_args.at) == (model, 20, [5, 20])
    runs = [parser.parse_args(list(s.argv)) for s in steps if s.argv[:2] == ("bench", "run")]
    if name == "cpu-groups":  # last, the detector from epoch 2, then 1, on the 3% set,
        # and Gradient Matching's 0.5% set with two more seeds
        seeded = runs.pop()
        assert (seeded.poisons, seeded.defenses, seeded.seeds, seeded.warmup, seeded.every) == (
            ["o/poisons/gm-0020"], ["none", "epic-0.1", "groups-epic-0.1", "foreign-groups"],
            [1, 2], 5, 2)
        probes = [runs.pop(), runs.pop()][::-1]
        assert [(p.poisons, p.defenses, p.warmup, p.every, p.model) for p in probes] == [
            (["o/poisons/badnets-0120"], ["foreign-groups"], w, 1, "fastnet") for w in (2, 1)]
    assert all(r.poisons == [f"o/poisons/{name}" for name, _ in sets] for r in runs)
    assert all((r.subset, r.model, r.epochs) == (4000, model, 20) for r in runs)
    # the paper's 40-epoch schedule halved: EPIC-0.1/0.2/0.3 from epoch 5/10/15, every 2nd;
    # the other detectors as EPIC-0.1
    schedule = {d: (r.warmup, r.every) for r in runs for d in r.defenses}
    assert schedule == {d: ((15 if d == "epic-0.3" else 10 if d == "epic-0.2" else 5), 2)
                        for d in PRESETS[name][2]}
    first = preset_steps(name, data_dir="d", out="o", first=1)
    assert sum(s.argv[0] == "craft" for s in first) == 1  # the dirty-label 1% set alone


def test_transfer_preset_follows_the_benchmark_victim() -> None:
    steps = preset_steps("cpu-transfer", data_dir="d", out="o", defenses=["none", "epic-0.3"])
    runs = [s.argv for s in steps if s.argv[:2] == ("bench", "run")]
    args = build_parser().parse_args(list(runs[1]))
    assert (args.scenario, args.lr, args.weight_decay, args.milestones, args.epochs) == (
        "transfer", 0.01, 2e-4, [30], 40)
    assert args.defenses == ["epic-0.3"] and args.until == 31  # one round, at the milestone
    assert "--outside-victims" in steps[0].argv  # the extractor never sees a victim image


def test_scratch_preset_scales_the_papers_proxy_schedule_to_the_fast_net() -> None:
    steps = preset_steps("cpu-scratch", data_dir="d", out="o")
    parser = build_parser()
    clean = parser.parse_args(list(steps[0].argv))
    assert (clean.model, clean.subset, clean.epochs, clean.schedule, clean.milestones) == (
        "fastnet", None, 16, "step", [10, 14])  # lr x0.1 at 5/8 and 7/8 of the epochs
    recipe = ("model", "epochs", "batch_size", "lr", "schedule", "milestones",
              "label_smoothing", "crop_padding", "channels_last")
    crafts = [parser.parse_args(list(s.argv)) for s in steps if s.argv[0] == "craft"]
    assert [(c.attack, c.eps, c.restarts, c.retrain_epochs, c.first, c.victim_per_class)
            for c in crafts] == [("gm", 16, 1, None, 10, 5000), ("gm", 8, 1, None, 3, 5000),
                                 ("sa", 16, None, 8, 5, 5000)]
    for c in crafts:  # Sleeper Agent's surrogate is retrained as the clean model was trained
        assert all(getattr(c, k) == getattr(clean, k) for k in recipe)
        assert c.pretrained == str(Path("o") / "clean" / "model.pt")
    runs = [parser.parse_args(list(s.argv)) for s in steps if s.argv[:2] == ("bench", "run")]
    for r in runs:  # the victim is trained exactly as the attacker's clean model was
        assert all(getattr(r, k) == getattr(clean, k) for k in recipe)
    # EPIC-f's first round at f x 100 of 40 epochs scaled to 16, every 2nd epoch; the random
    # control beside the EPIC-0.1 it replays, setup by setup; filters as EPIC-0.1
    epic_rows = [(["none", "epic-0.1", "random-as-epic-0.1"], 4, 2), (["epic-0.2"], 8, 2),
                 (["epic-0.3"], 12, 2)]
    groups_epic = (["groups-epic-0.1"], 4, 2)  # as EPIC-0.1, under Sleeper Agent too
    assert [(r.defenses, r.warmup, r.every) for r in runs] == [
        *epic_rows, (["deep-knn", "spectral-signatures", "activation-clustering",
                       "foreign-groups", "groups-epic-0.1"], 4, 2),
        (["none"], None, None), *epic_rows, groups_epic]
    assert [Path(r.poisons[0]).parent.name for r in runs] == (
        ["gm-eps16"] * 4 + ["gm-eps8"] + ["sa-eps16"] * 4)


def test_sleeper_agent_preset_halves_the_papers_schedule_for_every_drop_defense() -> None:
    steps = preset_steps("cpu-scratch-sa", data_dir="d", out="o")
    runs = [build_parser().parse_args(list(s.argv)) for s in steps
            if s.argv[:2] == ("bench", "run")]
    # EPIC-f from epoch f x 50 of 20, a round every epoch; the group detectors as EPIC-0.1
    assert [(r.defenses, r.warmup, r.every) for r in runs] == [
        (["none"], None, None), (["epic-0.1"], 5, 1), (["epic-0.2"], 10, 1),
        (["epic-0.3"], 15, 1), (["groups-epic-0.1"], 5, 1), (["foreign-groups"], 5, 1)]
    # a second seed where the backdoor's noise matters most
    assert [r.seeds for r in runs] == [[0, 1, 2, 3], [0, 1, 2, 3], [0], [0], [0, 1, 2, 3],
                                      [0, 1, 2, 3]]


def test_unknown_preset_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown preset"):
        preset_steps("gpu-everything", data_dir="d", out="o")


def test_paper_transfer_preset_follows_the_authors_script() -> None:
    steps = preset_steps("cpu-paper-transfer", data_dir="d", out="o",
                         defenses=["none", "epic-0.2", "random", "deep-knn"])
    parser = build_parser()
    clean = parser.parse_args(list(steps[0].argv))
    # a clean model on all 50,000 training images, resumable
    assert (clean.model, clean.subset, clean.outside_victims, clean.resume) == (
        "fastnet", None, None, True)
    assert (clean.schedule, clean.label_smoothing, clean.crop_padding, clean.test_flips) == (
        "onecycle", 0.2, 2, True)
    crafts = [parser.parse_args(list(s.argv)) for s in steps if s.argv[0] == "craft"]
    studied = [c for c in crafts if c.setups is None]  # the budget study
    crafts = [c for c in crafts if c.setups is not None]
    assert [(c.attack, c.eps, c.iterations) for c in crafts] == [("bp", 8, 250),
                                                                  ("fc", 255, 250)]
    assert all(c.setups.endswith("cifar10_from_scratch.pickle") for c in crafts)
    # setup 0's target at 0.5% and 3% of the 50,000, crafted against the clean model
    assert [(c.attack, c.eps, c.iterations, c.budget, c.target_index, c.adversarial_class,
             c.scenario, c.pretrained, c.subset, Path(c.out).name) for c in studied] == [
        (attack, eps, 250, budget, 99, 3, "transfer", str(Path("o") / "clean" / "model.pt"),
         None, f"{attack}-{budget:04d}") for attack, eps in (("bp", 8), ("fc", 255))
        for budget in (250, 1500)]
    runs = [parser.parse_args(list(s.argv)) for s in steps if s.argv[:2] == ("bench", "run")]
    # those four sets undefended and under the defenses that drop examples, on all 50,000
    budgets = [r for r in runs if r.setups is None]
    runs = [r for r in runs if r.setups is not None]
    assert [r.defenses for r in budgets] == [["none"], ["epic-0.2"], ["random"], ["deep-knn"]]
    assert all((r.scenario, r.subset, r.no_augment, [Path(p).name for p in r.poisons], r.out
                ) == ("transfer", None, True, ["bp-0250", "fc-0250", "bp-1500", "fc-1500"],
                      str(Path("o") / "budgets")) for r in budgets)
    for r in runs:  # a fresh last layer on all 50,000 images, the authors' schedule
        assert (r.scenario, r.victim_per_class, r.epochs, r.lr, r.milestones) == (
            "transfer", 5000, 40, 0.1, [15, 25, 35])
        assert r.pretrained == str(Path("o") / "clean" / "model.pt")
    schedules = {(r.defenses[0], r.no_augment): (r.warmup, r.every, r.until) for r in runs}
    assert schedules == {("none", True): (None, None, None), ("epic-0.2", True): (1, 1, 10),
                         ("random", True): (1, 1, 10), ("deep-knn", True): (None, None, None),
                         ("none", False): (None, None, None), ("epic-0.2", False): (1, 1, 10)}
    # by default without crop and flip, on every setup's poisons; with them, on the first three
    augmented = [r for r in runs if not r.no_augment]
    assert len(augmented) == 4 and all(
        [Path(p).name for p in r.poisons] == ["setup-000", "setup-001", "setup-002"]
        for r in augmented)
    assert {(Path(r.poisons[0]).parent.name, Path(r.poisons[0]).name, len(r.poisons))
            for r in runs if r.no_augment} == {("bp", "setup-*", 1), ("fc", "setup-*", 1)}


def _tiny_cifar(tmp_path: Path) -> Path:
    """A 200-image stand-in for CIFAR-10 (40 a batch, random pixels) with one from-scratch
    setup whose three bases are class-5 images of the first batch."""
    import pickle

    import numpy as np

    data = tmp_path / "data"
    folder = data / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels[name] = [i % 10 for i in range(40)]
        batch = {b"data": rng.integers(0, 256, (40, 3072), dtype=np.uint8),
                 b"labels": labels[name], b"batch_label": name.encode()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps(
        {b"label_names": [f"c{i}".encode() for i in range(10)]}, protocol=2))
    (data / "poisoning-benchmark").mkdir()
    setup = {"target index": np.int64(3), "target class": 3, "base class": 5,
             "base indices": np.array([5, 15, 25], dtype=np.int64)}  # class 5 of the first batch
    (data / "poisoning-benchmark" / "cifar10_from_scratch.pickle").write_bytes(
        pickle.dumps([setup]))
    return data


def _cut_down(**small: str) -> Callable[[list[str]], int]:
    """Run a preset's command lines with the values of the flags ``small`` names replaced."""
    from epic.cli.common import run_command

    parser = build_parser()
    flags = {f"--{k.replace('_', '-')}": v for k, v in small.items()}

    def run(argv: list[str]) -> int:
        return run_command(parser, [flags.get(argv[i - 1], a) if i else a
                                    for i, a in enumerate(argv)])
    return run


@pytest.mark.slow
def test_paper_scale_transfer_preset_runs_end_to_end_at_tiny_size(tmp_path: Path) -> None:
    """The paper-scale preset's every step (ResNet-18 clean model, crafting, victims under
    EPIC) on a 200-image stand-in for CIFAR-10, with epochs, steps and set sizes cut down."""
    import json

    from epic.bench.presets import run_preset

    data = _tiny_cifar(tmp_path)
    out = tmp_path / "out"
    run_preset("paper-transfer", data_dir=data, out=out, first=1, defenses=["none", "epic-0.2"],
               run=_cut_down(epochs="2", iterations="2", victim_per_class="20"))
    clean = json.loads((out / "clean" / "config.json").read_text())
    assert clean["run"]["model"] == "resnet18" and clean["config"]["epochs"] == 2
    assert clean["run"]["argv"][:2] == ["train", "--dataset"]  # the step's own command line
    rows = [json.loads(line) for line in (out / "bench" / "results.jsonl").read_text()
            .splitlines()]
    # each defense on cached features, then once more with crop and flip
    assert sorted((r["attack"], r["defense"], r["config"]["augment"]) for r in rows) == [
        (attack, defense, augment) for attack in ("bullseye_polytope", "feature_collision")
        for defense in ("epic-0.2", "none") for augment in (False, True)]
    assert all(r["examples"] == 200 and r["poisons"] == 3 for r in rows)
    # the command line's default device, named in the record
    assert all(r["device"].startswith("cuda:0 (" if torch.cuda.is_available() else "cpu")
               for r in rows)


@pytest.mark.slow
def test_scratch_preset_runs_end_to_end_at_tiny_size(tmp_path: Path) -> None:
    """The from-scratch preset's every step (clean fast net, Gradient Matching at both
    budgets, Sleeper Agent with its surrogate retrained by the recipe, victims under EPIC-0.1
    and its replayed random control) on the 200-image stand-in, cut down."""
    import json

    from epic.bench.presets import run_preset

    out = tmp_path / "out"
    run_preset("cpu-scratch", data_dir=_tiny_cifar(tmp_path), out=out, first=1,
               defenses=["none", "epic-0.1", "random-as-epic-0.1"],
               run=_cut_down(epochs="5", iterations="2", retrain_epochs="1",
                             victim_per_class="20"))
    rows = [json.loads(line) for line in (out / "bench" / "results.jsonl").read_text()
            .splitlines()]
    assert sorted((Path(r["poisons_dir"]).parent.name, r["defense"]) for r in rows) == [
        ("gm-eps16", "epic-0.1"), ("gm-eps16", "none"), ("gm-eps16", "random-as-epic-0.1"),
        ("gm-eps8", "none"), ("sa-eps16", "epic-0.1"), ("sa-eps16", "none"),
        ("sa-eps16", "random-as-epic-0.1")]
    for attack in ("gm-eps16", "sa-eps16"):  # the control drops as many, at the same epochs
        by = {r["defense"]: r for r in rows if Path(r["poisons_dir"]).parent.name == attack}
        assert by["random-as-epic-0.1"]["examples_dropped"] == by["epic-0.1"][
            "examples_dropped"]
    sleeper = json.loads((out / "poisons" / "sa-eps16" / "setup-000" / "poisons.json")
                         .read_text())
    assert sleeper["metadata"]["hyperparameters"]["retrain_config"]["batch_size"] == 512



@pytest.mark.slow
def test_coverage_preset_runs_end_to_end_at_tiny_size(tmp_path: Path) -> None:
    """The coverage preset's steps (patch sets crafted without a model, victims under EPIC and
    a feature-space filter) on the 200-image stand-in, cut down: every row records how many
    poisons and how many examples its defense dropped."""
    import json

    from epic.bench.presets import run_preset

    data = _tiny_cifar(tmp_path)
    out = tmp_path / "out"
    run_preset("cpu-coverage", data_dir=data, out=out, first=2,
               defenses=["none", "epic-0.1", "deep-knn"],
               run=_cut_down(epochs="3", budget="3", warmup="1"))
    assert not any(out.rglob("clean_model"))  # a patch needs no attacker's model
    rows = [json.loads(line) for line in (out / "bench" / "results.jsonl").read_text()
            .splitlines()]
    assert sorted((r["attack"], r["defense"]) for r in rows) == [
        (attack, defense) for attack in ("badnets", "patch_clean_label")
        for defense in ("deep-knn", "epic-0.1", "none")]
    assert all(r["poisons"] == 3 and r["examples"] == 200 for r in rows)
    assert all(0 <= r["poisons_dropped"] <= r["examples_dropped"] for r in rows)
    assert all(r["examples_dropped"] == 0 for r in rows if r["defense"] == "none")
