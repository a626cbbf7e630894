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


def test_every_lazily_named_submodule_exists() -> None:
    """``epic.<name>`` loads the submodules ``import epic`` leaves out on first use; a name
    left behind by a move would fail only when a user reached for it."""
    import importlib.util

    import epic

    top = {p.stem for p in (REPO / "epic").iterdir()
           if (p.suffix == ".py" or (p / "__init__.py").exists()) and p.stem != "__init__"}
    assert top >= epic._SUBMODULES
    assert all(importlib.util.find_spec(f"epic.{name}") for name in epic._SUBMODULES)
    assert epic.io.files.read_untrusted is not None  # the package, then its module


def test_the_top_level_holds_epic_and_serves_moved_names_with_a_warning() -> None:
    import epic
    import epic.training

    assert set(epic.__all__) == {
        "EPIC", "DistributedKeepSampler", "EpicError", "EpicRound", "EpicSettings",
        "KeepSampler", "Medoids", "find_isolated", "find_poisons", "gradient_embeddings",
        "select_medoids"}
    assert all(hasattr(epic, name) for name in epic.__all__)
    with pytest.warns(DeprecationWarning, match="epic.train is epic.training.train since"):
        assert epic.train is epic.training.train
    for name, package in epic._MOVED.items():
        with pytest.warns(DeprecationWarning):
            assert getattr(epic, name) is getattr(__import__(package, fromlist=[name]), name)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        epic.nothing  # noqa: B018
