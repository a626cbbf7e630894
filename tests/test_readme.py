from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from .conftest import check_epic_round, torchrun

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run(capsys) -> None:  # type: ignore[no-untyped-def]
    """The README's python blocks, in order, in one namespace (the Lightning block continues
    the first): the plain loop, Lightning, this library's own pipeline."""
    pytest.importorskip("lightning")
    plain, with_lightning, own = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    namespace: dict[str, Any] = {}
    exec(compile(plain, str(README), "exec"), namespace)  # noqa: S102
    defense = namespace["defense"]
    labels = namespace["dataset"].tensors[1]
    assert [r.epoch for r in defense.history] == [5, 7, 9, 11, 13]
    kept = _rounds_keep(defense.history, labels, 0.1)
    assert f"dropped {int((~kept).sum())} of 1797" in capsys.readouterr().out
    assert not kept.all() and torch.equal(defense.keep_mask, kept)
    exec(compile(with_lightning, str(README), "exec"), namespace)  # noqa: S102
    callback = namespace["callback"]
    assert [r.epoch for r in callback.defense.history] == [5, 7, 9, 11, 13]
    kept = _rounds_keep(callback.defense.history, labels, 0.1)
    assert not kept.all()
    assert f"tensor({int(kept.sum())}.)" in capsys.readouterr().out  # epic/remaining, printed
    exec(compile(own, str(README), "exec"), namespace)  # noqa: S102
    defense, model, test_data = namespace["defense"], namespace["model"], namespace["test_data"]
    assert [r.epoch for r in defense.history] == [10, 12, 14, 16, 18, 20, 22, 24]
    kept = _rounds_keep(defense.history, namespace["train_data"].labels, 0.1)
    accuracy, dropped = capsys.readouterr().out.strip().splitlines()[-1].split()[:2]
    with torch.no_grad():
        predicted = model.eval()(test_data.images.float() / 255).argmax(1)
    assert float(accuracy) == int((predicted == test_data.labels).sum()) / len(test_data) > 0.9
    assert int(dropped) == int((~kept).sum()) > 0


def _rounds_keep(history, labels: torch.Tensor, fraction: float) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The keep-mask after EPIC rounds ``history``, each checked against what it must be."""
    kept = torch.ones(len(labels), dtype=torch.bool)
    for r in history:
        check_epic_round(r, labels, kept, fraction)
        kept[r.dropped] = False
    return kept


def test_readme_ddp_example_runs_under_torchrun() -> None:
    run = torchrun(str(README.parent / "examples" / "ddp.py"), env={"EPOCHS": "8"})
    found = re.search(r"dropped (\d+) of 1797: (\[[\d, ]*\])", run.stdout)
    assert found, run.stdout
    indices = json.loads(found[2])
    assert int(found[1]) == len(set(indices)) > 0 and all(0 <= i < 1797 for i in indices)


def test_readme_setup_commands_come_first() -> None:
    first = README.read_text().split("```")[1]
    assert "pip install -c constraints-cpu.txt -e ." in first and "pytest" in first
