"""What a run writes to its folder and reads back: ``config.json`` with the provenance of the
run, ``metrics.json``, ``defense.json`` (the records of the defense's rounds), the
``checkpoint.pt`` of every epoch and the check that resuming continues the same run, and
``summary.json``.
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from epic.errors import EpicError
from epic.io.files import replace_atomically
from epic.poisons import PoisonSet
from epic.protocol import Defense
from epic.training.config import config_record

__all__ = ["check_same_run", "defense_records", "describe", "describe_device", "provenance",
           "run_summary", "save_checkpoint", "write_json"]

log = logging.getLogger("epic.training")


def provenance() -> dict[str, Any]:
    """Library versions and the git revision of this checkout, for the record of a run."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    return {"torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "git_revision": rev}


def describe_device(device: torch.device) -> str:
    """The device a run trained on, for its record: ``cpu``, or ``cuda:0 (NVIDIA H200)`` with
    the card's name, so that wall times are read against the hardware that made them."""
    if device.type != "cuda":
        return str(device)
    return f"{device} ({torch.cuda.get_device_name(device)})"


def write_json(path: Path, obj: Any) -> None:
    replace_atomically(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def check_same_run(checkpoint: Path, saved: dict[str, Any] | None,
                    current: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint that another configuration wrote: it would continue
    training with that run's optimizer state and keep-mask under this run's settings."""
    if saved is None:
        log.warning("%s does not record its run's settings; resuming without checking them",
                    checkpoint)
        return
    current = json.loads(json.dumps(current))  # tuples as lists, as the checkpoint has them
    # a setting newer than the checkpoint had its default there
    saved = saved | {"config": config_record(saved.get("config", {}))}
    # a batch transform was once recorded apart from the defense; it is the defense now
    transform = saved.pop("batch_transform", None)
    if transform is not None and saved.get("defense") is None:
        saved["defense"] = transform
    differences = []
    for group in sorted(saved.keys() | current.keys()):
        there, here = saved.get(group), current.get(group)
        if isinstance(there, dict) and isinstance(here, dict):
            differences += [f"{group}.{key}: {there.get(key)!r} there, {here.get(key)!r} here"
                            for key in sorted(there.keys() | here.keys())
                            if there.get(key) != here.get(key)]
        elif there != here:
            differences.append(f"{group}: {there!r} there, {here!r} here")
    if differences:
        raise EpicError(f"{checkpoint} belongs to a run with other settings ("
                        f"{'; '.join(differences[:4])}): use another out folder or do not resume",
                        options=("out", "resume"))


def describe(defense: Defense | None) -> dict[str, Any] | None:
    """The class name and the settings (:meth:`~epic.protocol.Defense.recorded_settings`) of
    ``defense``."""
    if defense is None:
        return None
    return {"name": type(defense).__name__} | defense.recorded_settings()


def defense_records(defense: Defense, poisons: PoisonSet | None = None
                    ) -> list[dict[str, Any]]:
    """JSON-ready records of a defense's rounds; with ``poisons``, how each round treated them
    (each record's ``poison_summary``: poisons dropped, and for EPIC the cluster sizes the
    poisons fell in)."""
    return [r.summary() | ({} if poisons is None else r.poison_summary(poisons.indices))
            for r in getattr(defense, "history", [])]


def save_checkpoint(outp: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler,
                generator: torch.Generator, defense: Defense | None,
                metrics: list[dict[str, Any]], epoch: int, elapsed: float,
                identity: dict[str, Any]) -> None:
    write_json(outp / "metrics.json", metrics)
    state = {"identity": json.dumps(identity), "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "generator": generator.get_state(),
             "defense": None if defense is None else defense.state_dict(),
             "metrics": json.dumps(metrics), "epoch": epoch, "seconds": elapsed}
    replace_atomically(outp / "checkpoint.pt", lambda f: torch.save(state, f))


def run_summary(metrics: list[dict[str, Any]], defense: Defense | None,
                poisons: PoisonSet | None, n: int) -> dict[str, Any]:
    """What a run's ``summary.json`` holds: the last epoch's figures, how many of the ``n``
    examples (and of the poisons) the defense dropped, and the defense's own facts."""
    last = metrics[-1] if metrics else {}
    keep = defense.keep_mask if defense is not None else None
    summary: dict[str, Any] = {
        "test_acc": last.get("test_acc"), "epochs": len(metrics),
        "seconds": last.get("seconds", 0.0),
        "examples_dropped": 0 if keep is None else int((~keep).sum()), "examples": n}
    if poisons is not None:
        summary["attack_success"] = last.get("attack_success")
        summary["poisons"] = len(poisons)
        summary["poisons_dropped"] = 0 if keep is None else int((~keep[poisons.indices]).sum())
        if poisons.trigger is not None:
            summary["patch_free_success"] = last.get("patch_free_success")
    if defense is not None:
        summary |= defense.facts()
    return summary
