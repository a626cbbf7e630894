"""The one defense interface: the hooks the trainer calls, the registry that builds defenses by
name, the worked example of docs/defenses.md, and resuming checkpoints of older runs."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from epic.cli import main
from epic.defenses import (
    DEFENSES,
    EPIC,
    AdversarialPoisoning,
    Defense,
    RandomDrop,
    RunFacts,
    build_defense,
    defense_options,
    options_for,
    parse_spec,
    register_defense,
)
from epic.training import TrainConfig, train
from epic.training.records import check_same_run

from .conftest import seeded_convnet

DOC = Path(__file__).resolve().parent.parent / "docs" / "defenses.md"


class _Recorder(Defense):
    """Writes down every hook call; drops example 0 before epoch 1."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.keep_mask = None
        self.batches = 0

    def setup(self, model: nn.Module, trained: nn.Module, optimizer: torch.optim.Optimizer, *,
              num_examples: int, batch_size: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        self.calls.append(f"setup {num_examples} {batch_size}")
        return trained, optimizer

    def due(self, epoch: int) -> bool:
        return epoch == 1

    def update(self, model: nn.Module, data: Any, epoch: int, *,
               features: Tensor | None = None) -> None:
        self.calls.append(f"update {epoch}")
        self.keep_mask = torch.ones(len(data), dtype=torch.bool)
        self.keep_mask[0] = False

    def on_batch(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        self.batches += 1
        return x, y

    def after_backward(self, params: Any) -> None:
        assert all(p.grad is not None for p in params)
        self.calls.append("after_backward")

    def facts(self) -> dict[str, Any]:
        return {"batches_seen": self.batches}

    def teardown(self) -> None:
        self.calls.append("teardown")


def test_the_trainer_calls_every_hook_in_order(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train_data, test_data = tiny_data
    defense = _Recorder()
    result = train(seeded_convnet(train_data), train_data, test_data,
                   TrainConfig(epochs=2, batch_size=20), defense=defense)
    backward = ["after_backward"] * 3  # 60 examples in batches of 20; then 59
    assert defense.calls == ["setup 60 20", *backward, "update 1", *backward, "teardown"]
    assert [m["batches_seen"] for m in result.metrics] == [3, 6]
    assert result.summary["batches_seen"] == 6
    assert [m["trained_on"] for m in result.metrics] == [60, 59]


def test_teardown_runs_when_training_stops_on_an_error(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train_data, test_data = tiny_data
    defense = _Recorder()

    def stop(epoch: int, record: dict[str, Any]) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(seeded_convnet(train_data), train_data, test_data,
              TrainConfig(epochs=2, batch_size=20), defense=defense, on_epoch_end=stop)
    assert defense.calls[-1] == "teardown"


def test_the_registry_builds_by_name_with_the_options_each_defense_takes() -> None:
    run = RunFacts(num_examples=100, epochs=40, milestones=(25, 35), seed=4, poison_eps=8 / 255)
    epic = build_defense("epic-0.2", run)
    assert isinstance(epic, EPIC) and epic.fraction == 0.2 and epic.warmup == 20
    assert [e for e in range(40) if epic.due(e)] == list(range(20, 35, 2))
    ap = build_defense("ap-0.25", run)
    assert isinstance(ap, AdversarialPoisoning) and (ap.share, ap.eps) == (0.25, 8 / 255)
    assert build_defense("none", run) is None
    random = build_defense("random-0.1", run)  # a control as large as EPIC's drops
    assert isinstance(random, RandomDrop) and random.drop_fraction == 0.1 and random.warmup == 10
    assert parse_spec("dp-sgd") == ("dp-sgd", {})
    assert set(defense_options("dp-sgd")) == {"clip", "noise", "delta"}
    # shared settings: each defense takes its own, not-given (None) ones are left out
    shared = {"fraction": 0.3, "budget": 0.05, "noise": None, "warmup": 2}
    assert options_for("deep-knn", shared) == {"budget": 0.05, "warmup": 2}
    assert options_for("dp-sgd", shared) == {}
    with pytest.raises(ValueError, match="deep-knn takes no option fraction"):
        build_defense("deep-knn", run, fraction=0.3)
    with pytest.raises(ValueError, match="unknown defense"):
        parse_spec("magic")


@pytest.mark.usefixtures("registries")
def test_the_worked_example_needs_nothing_but_its_file(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    # the Cutout file of docs/defenses.md, imported: registered by its decorator
    source = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)[0]
    namespace: dict[str, Any] = {"__name__": "cutout"}
    exec(compile(source, str(DOC), "exec"), namespace)  # noqa: S102
    assert DEFENSES["cutout"] is namespace["Cutout"]
    with pytest.raises(ValueError, match="'cutout' is taken"):
        register_defense("cutout")
    argv = ["train", "--defense", "cutout", "--defense-option", "size=3", "--subset", "200",
            "--test-subset", "50", "--epochs", "2", "--no-progress", "--json"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["defense"] == {"name": "Cutout", "size": 3, "seed": 0}
    # what it trains on is changed: the same run without it ends elsewhere
    assert main(["train", "--subset", "200", "--test-subset", "50", "--epochs", "2",
                 "--no-progress", "--out", str(tmp_path / "b")]) == 0
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert not torch.equal(a["classifier.weight"], b["classifier.weight"])
    with pytest.raises(SystemExit):  # an option it does not take: a one-line error
        main([*argv[:3], "--defense-option", "side=3", "--out", str(tmp_path / "c")])
    assert "cutout takes no option side" in capsys.readouterr().err


def test_resume_reads_checkpoints_of_runs_from_before_the_one_interface() -> None:
    config = dataclasses.asdict(TrainConfig(epochs=2))
    ap = {"name": "AdversarialPoisoning", "share": 0.5}
    current = {"config": config, "defense": ap}
    # then: DP-SGD-style shaping settings (off) and Adversarial Poisoning as a batch transform
    before = {"config": config | {"grad_clip": None, "grad_noise": 0.0}, "defense": None,
              "batch_transform": ap}
    check_same_run(Path("checkpoint.pt"), before, current)  # the same run: no error
    clipped = before | {"config": before["config"] | {"grad_clip": 1.0, "grad_noise": 0.01}}
    with pytest.raises(ValueError, match="config.grad_clip: 1.0 there, None here"):
        check_same_run(Path("checkpoint.pt"), clipped, current)
