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
- reading checks every line against :data:`FIELDS` and skips, counts and warns about (by line
  number) any line that is not a trial record, so neither a report nor a resumed run trips over
  a stray line.

File locks are POSIX (``fcntl``): writing a store (``bench run``) needs Linux or macOS; reading it
does not, and never writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from epic.io.files import read_untrusted

__all__ = ["FIELDS", "ResultStore", "problem"]

log = logging.getLogger(__name__)

_NUMBER = (int, float)
_NONE = type(None)
_JSON_NAMES = {dict: "an object", list: "an array", str: "a string", int: "a number",
               float: "a number", bool: "a boolean", _NONE: "null"}

# field -> (accepted JSON types, required); a number must be finite, and a bool is never one.
# attack_success and test_acc are null for a run of zero epochs (--epochs 0): nothing measured.
FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "key": ((str,), True), "scenario": ((str,), True), "attack": ((str,), True),
    "defense": ((str,), True), "seed": ((int,), True), "poisons_dir": ((str,), True),
    "schedule": ((dict,), True), "config": ((dict,), True), "run_dir": ((str,), True),
    "attack_success": ((*_NUMBER, _NONE), True), "test_acc": ((*_NUMBER, _NONE), True),
    "seconds": (_NUMBER, True), "poisons_sha256": ((str,), False), "eps": (_NUMBER, False),
    "target_class": ((int,), False), "adversarial_class": ((int,), False),
    "setup": ((dict, _NONE), False), "argv": ((list,), False), "poisons": ((int,), False),
    "poisons_dropped": ((int,), False), "examples": ((int,), False),
    "examples_dropped": ((int,), False), "patch_free_success": ((*_NUMBER, _NONE), False),
    "resolved": ((dict,), False),
    "dp_epsilon": ((*_NUMBER, _NONE), False), "dp_delta": ((*_NUMBER, _NONE), False),
}


def problem(record: Any) -> str | None:
    """Why ``record`` is not a trial record (see :data:`FIELDS`), or None when it is one."""
    if not isinstance(record, dict):
        return f"{_kind(record)}, not an object"
    for name, (types, required) in FIELDS.items():
        if name not in record:
            if required:
                return f"no {name!r}"
        elif isinstance(record[name], bool) or not isinstance(record[name], types):
            return f"{name!r} is {_kind(record[name])}"
        elif isinstance(record[name], _NUMBER) and not _finite(record[name]):
            return f"{name!r} is not a finite number"
    if not all(isinstance(s, str) and "\0" not in s
               for s in (record["poisons_dir"], *record.get("argv", []))):
        return "'argv' holds a non-string, or a path holds a NUL byte"
    return None


def _kind(value: Any) -> str:
    return _JSON_NAMES.get(type(value), f"a {type(value).__name__}")  # the latter: from Python


def _finite(x: float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an integer beyond any float
        return False


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
        """All trial records, in the order written. A line that is not one (not JSON, not an
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
                records.append(record)
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
