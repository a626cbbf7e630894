"""An append-only JSON-lines store of benchmark trials that concurrent runs can share.

What is stored: one JSON object per line, one line per finished trial, written by
:func:`epic.bench.run_trials`: the outcome (attack success, test accuracy, seconds, what was
dropped) and everything that defines the trial (poison set, defense, schedule, seed, training
configuration, command line), so that a line alone identifies, reports and reruns its trial.

Why it can be trusted after a crash and shared by two runs:

- a line is appended whole, under an exclusive lock on the store file, then flushed and fsynced;
- a last line without its newline (a writer killed mid-line) is repaired before the next append:
  ended with a newline when it is complete JSON, cut off when it is not, with a warning naming
  the store and the byte offset, so it is never glued to the next record;
- a trial being run holds a claim (:meth:`ResultStore.claim`), a lock on an empty file under
  ``<store>.claims/`` that the kernel drops when its process ends, however it ends: a second run
  skips the trials the first is running, and a killed run blocks nothing;
- reading checks every line against the record's schema (:mod:`epic.bench.schema`) and skips,
  counts and warns about (by line number) any line that is not a trial record, so neither a
  report nor a resumed run trips over a stray line; the records read are migrated to the
  schema's current version, so every reader sees one shape.

File locks are POSIX (``fcntl``): writing a store (``bench run``) needs Linux or macOS; reading it
does not, and never writes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from epic.bench.schema import migrate, problem
from epic.io.files import read_untrusted

__all__ = ["ResultStore"]

log = logging.getLogger(__name__)

class ResultStore:
    """Trial records as one JSON object per line in ``path`` (see the module docstring).

    Attributes:
        skipped: lines the last :meth:`load` skipped as not trial records.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.skipped = 0
        self._warned: set[int] = set()  # line numbers already warned about

    def load(self) -> list[dict[str, Any]]:
        """All trial records, in the order written, as the current schema reads them
        (:func:`~epic.bench.schema.migrate`). A line that is not one (not JSON, not an
        object, a field missing or of the wrong type, cut short) is skipped, counted in
        :attr:`skipped` and warned about, once per store object, with its line number."""
        if not self.path.exists():
            return []
        records: list[dict[str, Any]] = []
        self.skipped = 0
        lines = read_untrusted(self.path).split(b"\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            why: str | None
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # bad JSON or UTF-8; absurdly deep nesting
                why = ("cut short (no newline: torn, or still being written)"
                       if number == len(lines) else "not JSON")
            else:
                why = problem(record)
            if why is None:
                records.append(migrate(record))
                continue
            self.skipped += 1
            if number not in self._warned:
                self._warned.add(number)
                log.warning("%s line %d skipped: %s", self.path, number, why)
        return records

    def append(self, record: dict[str, Any]) -> None:
        """Write ``record`` as one line, under the store's lock, flushed and fsynced; a torn
        last line is repaired first (see the module docstring).

        Raises:
            ValueError: ``record`` is not a trial record (see :func:`problem`).
        """
        why = problem(record)
        if why is not None:
            raise ValueError(f"not a benchmark trial record: {why}")
        line = json.dumps(record).encode() + b"\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:  # O_APPEND: every write lands at the end
            _lock(f)  # held until the file is closed
            self._repair_tail(f)
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def _repair_tail(self, f: IO[bytes]) -> None:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        torn = f.read().rpartition(b"\n")[2]
        offset = size - len(torn)
        try:
            json.loads(torn)
        except (ValueError, RecursionError):
            f.truncate(offset)
            log.warning("%s: cut off its torn last line (%d bytes from byte %d; a writer "
                        "stopped mid-line)", self.path, len(torn), offset)
        else:
            f.write(b"\n")
            log.warning("%s: ended its last line (byte %d) with the missing newline",
                        self.path, offset)

    @contextmanager
    def claim(self, name: str) -> Iterator[bool]:
        """Claim trial ``name`` (a file name) for the ``with`` block: yields True when this
        process holds the claim, False while another process does.

        The claim is an exclusive lock on ``<store>.claims/<name>``, kept as an empty file; the
        kernel releases it when the block ends or its process dies, so a claim never outlives
        its holder.
        """
        folder = self.path.with_name(self.path.name + ".claims")
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / name, "ab") as f:
            try:
                _lock(f, wait=False)
            except BlockingIOError:
                yield False
            else:
                yield True


def _lock(f: IO[bytes], *, wait: bool = True) -> None:
    """Lock ``f`` exclusively until it is closed (raises BlockingIOError when ``wait`` is False
    and another process holds it)."""
    import fcntl  # POSIX only: imported here so that reading a store works everywhere

    fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
