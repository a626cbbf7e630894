"""Presets: every step is a valid ``epic`` command line, in the order the evidence needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from epic.bench.presets import PRESETS, preset_steps
from epic.cli import build_parser


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_step_parses_as_an_epic_command(name: str, tmp_path: Path) -> None:
    steps = preset_steps(name, data_dir=tmp_path / "data", out=tmp_path / "out", first=3)
    parser = build_parser()
    commands = []
    for step in steps:
        args = parser.parse_args(list(step.argv))
        commands.append(args.command if args.command != "bench" else args.bench_command)
        if args.command in ("craft", "bench"):
            assert args.first == 3 and args.exact_test == 1000
    # the attacker's model first, then crafting, then one bench run per defense
    assert commands[0] == "train" and steps[0].done is not None
    assert commands[1] == "craft"
    build, _, defenses = PRESETS[name]
    # a victim per defense and poison set, and EPIC-0.1 once more in transfer learning with
    # its rounds' gradients from the training pass
    runs = len(defenses) + (name == "cpu-transfer")
    assert commands.count("run") == runs * commands.count("craft")
    passes = [s.argv for s in steps if "train-pass" in s.argv]
    assert len(passes) == (2 if name == "cpu-transfer" else 0)
    assert all(a[a.index("--defenses") + 1] == "epic-0.1" for a in passes)


def test_transfer_preset_follows_the_benchmark_victim() -> None:
    steps = preset_steps("cpu-transfer", data_dir="d", out="o", defenses=["none", "epic-0.3"])
    runs = [s.argv for s in steps if s.argv[:2] == ("bench", "run")]
    args = build_parser().parse_args(list(runs[1]))
    assert (args.scenario, args.lr, args.weight_decay, args.milestones, args.epochs) == (
        "transfer", 0.01, 2e-4, [30], 40)
    assert args.defenses == ["epic-0.3"] and args.until == 31  # one round, at the milestone
    assert "--outside-victims" in steps[0].argv  # the extractor never sees a victim image


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
    assert [(c.attack, c.eps, c.iterations) for c in crafts] == [("bp", 8, 250),
                                                                  ("fc", 255, 250)]
    assert all(c.setups.endswith("cifar10_from_scratch.pickle") for c in crafts)
    runs = [parser.parse_args(list(s.argv)) for s in steps if s.argv[:2] == ("bench", "run")]
    for r in runs:  # a fresh last layer on all 50,000 images, the authors' schedule
        assert (r.scenario, r.victim_per_class, r.epochs, r.lr, r.milestones, r.no_augment) == (
            "transfer", 5000, 40, 0.1, [15, 25, 35], True)
        assert r.pretrained == str(Path("o") / "clean" / "model.pt")
    schedules = {r.defenses[0]: (r.warmup, r.every, r.until) for r in runs}
    assert schedules == {"none": (None, None, None), "epic-0.2": (1, 1, 10),
                         "random": (1, 1, 10), "deep-knn": (None, None, None)}
