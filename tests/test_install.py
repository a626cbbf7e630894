"""Installing keeps the user's torch; the constraints file pins the CPU build for fresh machines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_installing_over_an_existing_torch_installs_only_this_package(tmp_path) -> None:  # type: ignore[no-untyped-def]
    report = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index",
         "--no-build-isolation", "--quiet", "--report", str(report), "-e", str(ROOT)],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    planned = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert planned == ["epic-defense"]  # torch (and the rest) stay as installed


def test_the_cpu_constraints_pin_torch() -> None:
    pins = [line for line in (ROOT / "constraints-cpu.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert pins == ["torch==2.13.0"]
    assert "constraints-cpu.txt" in (ROOT / ".ci" / "run").read_text()
