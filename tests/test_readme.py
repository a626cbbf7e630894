from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102
    defense = namespace["defense"]
    assert defense.history and all(r.epoch < 25 for r in defense.history)  # type: ignore[attr-defined]


def test_readme_setup_commands_come_first() -> None:
    first = README.read_text().split("```")[1]
    assert "pip install -e ." in first and "pytest" in first
