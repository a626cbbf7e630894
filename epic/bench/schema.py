"""The benchmark's trial record: its fields, the check that every writer and reader applies,
and :func:`migrate`, the one place where a record written by an older version is read as
today's.

A record is one JSON object (one line of a store, :mod:`epic.bench.store`): the outcome (attack
success, test accuracy, seconds, what was dropped) and everything that defines the trial
(poison set, defense, schedule, seed, training configuration, command line).

Versions:

- 1 (records without a ``schema`` field): the configuration holds the training settings that
  existed when the record was written; a setting added since is absent, and the retired
  batch-level ``grad_clip``/``grad_noise`` are there (off, or on for the rows that ran them).
- 2: the configuration holds every setting of today's :class:`~epic.training.TrainConfig`,
  retired settings only where they were on (such a row ran something no setting of today
  runs); ``device`` names the card (``cuda:0 (NVIDIA H200)``) where there was one.
"""

from __future__ import annotations

import math
from typing import Any

from epic.training import config_record

__all__ = ["FIELDS", "VERSION", "migrate", "problem"]

VERSION = 2

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
    "schema": ((int,), False),
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
    if record.get("schema", 1) > VERSION:
        return (f"written by a newer epic (record schema {record['schema']}; this one reads up "
                f"to {VERSION})")
    return None


def _kind(value: Any) -> str:
    return _JSON_NAMES.get(type(value), f"a {type(value).__name__}")  # the latter: from Python


def _finite(x: float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an integer beyond any float
        return False


def migrate(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` (a valid record of any version, see :func:`problem`) as version
    :data:`VERSION` reads it: the configuration completed with today's defaults for the
    settings added since, retired settings that were off left out (a copy; ``record`` is
    not changed)."""
    return record | {"config": config_record(record["config"]), "schema": VERSION}
