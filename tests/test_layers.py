"""The package's layers are a checked contract: ``lint-imports`` with the contracts of
pyproject.toml ([tool.importlinter]): no module imports from a layer above its own or from a
sibling in its layer, and no package's modules import each other in a cycle."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_imports_keep_the_layers_and_have_no_cycles() -> None:
    lint = shutil.which("lint-imports")
    if lint is None:
        pytest.skip("lint-imports is not installed (pip install -e '.[test]' brings it)")
    done = subprocess.run([lint, "--no-cache", "--no-logo"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
