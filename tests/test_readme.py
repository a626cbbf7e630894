from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run(capsys) -> None:  # type: ignore[no-untyped-def]
    """The README's python blocks, in order, in one namespace (the Lightning block continues
    the first): the plain loop, Lightning, this library's own pipeline."""
    pytest.importorskip("lightning")
    plain, with_lightning, own = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    namespace: dict[str, Any] = {}
    exec(compile(plain, str(README), "exec"), namespace)  # noqa: S102
    defense = namespace["defense"]
    assert [r.epoch for r in defense.history] == [5, 7, 9, 11, 13]
    assert f"dropped {len(defense.dropped)} of 1797" in capsys.readouterr().out
    assert len(defense.dropped) > 0
    exec(compile(with_lightning, str(README), "exec"), namespace)  # noqa: S102
    callback = namespace["callback"]
    assert [r.epoch for r in callback.defense.history] == [5, 7, 9, 11, 13]
    assert callback.defense.history[-1].remaining < 1797
    exec(compile(own, str(README), "exec"), namespace)  # noqa: S102
    defense = namespace["defense"]
    assert defense.history and all(r.epoch < 25 for r in defense.history)


def test_readme_ddp_example_runs_under_torchrun() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(README.parent / "examples" / "ddp.py")], capture_output=True, text=True,
        timeout=300, env=os.environ | {"EPOCHS": "8"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"dropped \d+ of 1797", run.stdout), run.stdout


def test_readme_setup_commands_come_first() -> None:
    first = README.read_text().split("```")[1]
    assert "pip install -c constraints-cpu.txt -e ." in first and "pytest" in first
