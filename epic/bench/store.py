"""An append-only JSON-lines store of benchmark trials, safe to resume after a crash."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["REQUIRED", "ResultStore"]


# the fields every trial record must carry, and their types (bools are not numbers here)
REQUIRED: dict[str, type | tuple[type, ...]] = {
    "key": str, "scenario": str, "attack": str, "defense": str,
    "attack_success": (int, float), "test_acc": (int, float), "seconds": (int, float)}


def _complete(record: Any) -> bool:
    return isinstance(record, dict) and all(
        isinstance(record.get(k), t) and not isinstance(record.get(k), bool)
        for k, t in REQUIRED.items())


class ResultStore:
    """Trials as one JSON object per line in ``path``; each has a unique ``key``.

    A line cut short by a crash, or one that is not a complete trial record (see
    :data:`REQUIRED`), is ignored on reading and counted in :attr:`skipped`, so a rerun picks up
    where the last one stopped and a report never trips over a stray line.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.skipped = 0

    def load(self) -> list[dict[str, Any]]:
        """All complete records, in the order written."""
        if not self.path.exists():
            return []
        records, self.skipped = [], 0
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if _complete(record):
                records.append(record)
            else:
                self.skipped += 1
        return records

    def keys(self) -> set[str]:
        return {r["key"] for r in self.load() if "key" in r}

    def append(self, record: dict[str, Any]) -> None:
        """Write one record (must carry a ``key``) and flush it to disk."""
        if "key" not in record:
            raise ValueError("a benchmark record needs a 'key'")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
