"""An append-only JSON-lines store of benchmark trials, safe to resume after a crash."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["ResultStore"]


class ResultStore:
    """Trials as one JSON object per line in ``path``; each has a unique ``key``.

    A line cut short by a crash is ignored on reading (and reported by :meth:`skipped`), so a
    rerun picks up where the last one stopped.
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
                records.append(json.loads(line))
            except json.JSONDecodeError:
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
