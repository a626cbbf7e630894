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
- 3: ``setting`` names the model and the data the trial trained on (for ``epic bench run``:
  data set, subsets, architecture, pretrained weights, setup file, victim and exact-test
  sizes; paths resolved, then written relative to the directory the command ran in, by
  :func:`setting_path`, as ``poisons_dir`` is); before, only the command line (``argv``)
  said so, and :func:`migrate` reads the setting from it. The configuration's ``head_rng``
  says where a new last layer was drawn from; records before version 3 drew it from torch's
  global RNG (``"global"``).
- 4: the configuration's ``min_batch`` says which last batches an epoch left out; records
  before version 4 trained on every last batch, down to a single example (``1``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from epic.training import config_record

__all__ = ["FIELDS", "VERSION", "migrate", "problem", "setting_path"]

VERSION = 4

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
    "schema": ((int,), False), "setting": ((dict,), False),
}


def setting_path(path: str) -> str:
    """A path of a trial's setting as its record stores it: resolved (links and ``..``
    followed, so that two spellings of one file are one trial), then relative to the current
    directory, so that a checkout that moves with its data keeps its trials' identities."""
    return os.path.relpath(os.path.realpath(path))


# The options of an `epic bench run` command line that chose the model and the data, with the
# defaults they had when records of versions 1 and 2 were written (a fact about those records,
# kept here even where a default changes) and the type their values parse to.
_V2_SETTING: dict[str, tuple[str, Any, Callable[[str], Any]]] = {
    "--dataset": ("dataset", "digits", str), "--subset": ("subset", None, int),
    "--test-subset": ("test_subset", None, int), "--model": ("model", "convnet", str),
    "--pretrained": ("pretrained", None, setting_path),
    "--setups": ("setups", None, setting_path),
    "--victim-per-class": ("victim_per_class", None, int),
    "--exact-test": ("exact_test", None, int)}


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
    settings added since, retired settings that were off left out; the setting read from the
    command line where the record predates it (a copy; ``record`` is not changed)."""
    config, setting = record["config"], record.get("setting")
    if record.get("schema", 1) < 3:
        config = {"head_rng": "global"} | config
        setting = _v2_setting(record.get("argv", [])) if setting is None else setting
    if record.get("schema", 1) < 4:
        config = {"min_batch": 1} | config
    return record | {"config": config_record(config), "setting": setting, "schema": VERSION}


def _v2_setting(argv: Sequence[str]) -> dict[str, Any]:
    """The setting of an `epic bench run` command line as it parsed when the record was
    written: the last value of each option wins, as in argparse; relative paths resolve
    against the current directory, as they did for the command that wrote them."""
    setting = {name: default for name, default, _ in _V2_SETTING.values()}
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag in _V2_SETTING and (eq or i + 1 < len(argv)):
            name, _, parse = _V2_SETTING[flag]
            value = value if eq else argv[i + 1]
            try:
                setting[name] = parse(value)
            except ValueError:  # a value that command could not have run with: kept as given
                setting[name] = value
    return setting
