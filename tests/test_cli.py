from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from epic.cli import build_parser, main
from epic.data import load_dataset, load_digits
from epic.errors import EpicError
from epic.models import Classifier, build_model
from epic.poisons import PoisonSet

from .conftest import cifar_root, requires_cifar


def _saved_convnet(path: Path) -> Classifier:
    """The digits convnet whose weights ``epic train`` saved to ``path``, in eval mode."""
    train_data, _ = load_digits()
    model = build_model("convnet", num_classes=10, in_channels=1, mean=train_data.mean,
                        std=train_data.std)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def test_help_explains_every_train_option() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    train = sub.choices["train"]  # type: ignore[union-attr]
    for action in train._actions:
        if action.dest != "help" and action.option_strings:
            assert action.help, f"{action.option_strings} has no help"


@pytest.mark.parametrize("argv", [["train", "--ep", "1"], ["bench", "run", "--epo", "1"],
                                  ["scan", "--frac", "0.2"]])
def test_flags_are_taken_only_as_spelled(argv: list[str], capsys) -> None:  # type: ignore[no-untyped-def]
    """A prefix of a flag is not that flag: a stored command line must not change meaning when
    another flag with the same prefix is added."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert f"unrecognized arguments: {argv[-2]}" in capsys.readouterr().err


def test_train_on_embedded_digits_with_epic(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    assert main(["train", "--epochs", "6", "--defense", "epic", "--warmup", "2", "--every", "2",
                 "--out", str(out), "--json", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["epochs"] == 6 and summary["test_acc"] > 0.5
    rounds = json.loads((out / "defense.json").read_text())
    assert [r["epoch"] for r in rounds] == [2, 4]  # until = last milestone (5)
    assert summary["examples_dropped"] == sum(len(r["dropped"]) for r in rounds) > 0
    # every epoch trains on the 1,347 training digits less those dropped before it
    kept, dropped_before = [], 0
    for epoch in range(6):
        dropped_before += sum(len(r["dropped"]) for r in rounds if r["epoch"] == epoch)
        kept.append(1347 - dropped_before)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["trained_on"] for m in metrics] == kept
    config = json.loads((out / "config.json").read_text())
    assert config["run"]["seed"] == 0 and config["run"]["torch"] == torch.__version__
    assert config["defense"]["fraction"] == 0.1
    assert (out / "checkpoint.pt").exists()
    # model.pt holds the final model: its accuracy, counted here, is the one reported
    _, test_data = load_digits()
    model = _saved_convnet(out / "model.pt")
    with torch.no_grad():
        predicted = model(test_data.images.float() / 255).argmax(1)
    assert int((predicted == test_data.labels).sum()) / len(test_data) == summary["test_acc"]


def test_transfer_without_pretrained_weights_is_an_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit, match="--pretrained"):
        main(["train", "--scenario", "transfer", "--out", str(tmp_path)])


def test_missing_cifar_is_a_clear_error(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exc:
        main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path)])
    assert exc.value.code == 2
    assert "no cifar-10-batches-py" in capsys.readouterr().err


@requires_cifar
def test_short_cifar10_run_drops_at_scheduled_epochs(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "cifar"
    root = cifar_root().parent.parent  # type: ignore[union-attr]
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(root), "--subset", "2000",
                 "--test-subset", "500", "--model", "convnet", "--epochs", "5", "--batch-size",
                 "128", "--defense", "epic", "--fraction", "0.2", "--warmup", "1", "--every",
                 "2", "--until", "5", "--out", str(out), "--json", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rounds = json.loads((out / "defense.json").read_text())
    assert [r["epoch"] for r in rounds] == [1, 3]
    assert all(len(r["dropped"]) > 0 for r in rounds)
    assert summary["examples_dropped"] == sum(len(r["dropped"]) for r in rounds)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics[0]["trained_on"] == 2000
    assert metrics[1]["trained_on"] == 2000 - len(rounds[0]["dropped"])
    assert summary["test_acc"] > 0.15


def test_train_with_poisons_reports_attack_success_each_epoch(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    train_data, test_data = load_digits()
    idx = torch.arange(0, 40, 4)
    # Unchanged copies as "poisons", and as targets a test 0 and two test 1s: a model that
    # learned digits (all three are recognised after the first epoch) calls 2 of the 3
    # targets the adversarial class 1, with no attack at all.
    targets = torch.tensor([14, 0, 17])
    assert test_data.labels[targets].tolist() == [0, 1, 1]
    PoisonSet(idx, train_data.images[idx], test_data.images[targets], target_class=0,
              adversarial_class=1, eps=8 / 255).save(tmp_path / "p")
    assert main(["train", "--epochs", "3", "--poisons", str(tmp_path / "p"), "--defense", "epic",
                 "--warmup", "1", "--every", "1", "--until", "3", "--out", str(tmp_path / "r"),
                 "--json", "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    per_epoch = [line for line in lines if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in per_epoch] == ["epoch 0", "epoch 1", "epoch 2"]
    assert "attack success" in per_epoch[0] and "poisons dropped" in per_epoch[1]
    summary = json.loads(lines[-1])
    assert summary["poisons"] == 10 and summary["attack_success"] == pytest.approx(2 / 3)
    assert per_epoch[-1].startswith("epoch 2: attack success 0.667, ")
    # the share the final model, as saved, assigns to class 1, counted here
    model = _saved_convnet(tmp_path / "r" / "model.pt")
    with torch.no_grad():
        flipped = model(test_data.images[targets].float() / 255).argmax(1) == 1
    assert summary["attack_success"] == int(flipped.sum()) / 3


def test_pretrained_weights_of_another_model_are_a_clear_error(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    other = build_model("vgg16-small", num_classes=10, in_channels=1, mean=[0.5], std=[0.2])
    torch.save(other.state_dict(), tmp_path / "vgg.pt")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--scenario", "transfer", "--pretrained", str(tmp_path / "vgg.pt"),
              "--out", str(tmp_path / "r")])
    assert exc.value.code == 2
    assert "is not a convnet" in capsys.readouterr().err


def test_the_librarys_words_become_flags_on_the_command_line(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("EPIC_DATA_DIR", raising=False)
    with pytest.raises(EpicError, match="cifar10 needs a data_dir") as caught:
        load_dataset("cifar10")
    assert caught.value.options == ("data_dir",)
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "cifar10", "--out", "unused"])
    assert capsys.readouterr().err.strip().endswith(
        "epic: error: cifar10 needs a --data-dir (or EPIC_DATA_DIR)")
