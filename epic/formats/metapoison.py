"""The MetaPoison-style single pickle (see :mod:`epic.formats`)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from epic.data import ImageData
from epic.formats.untrusted import (
    dump,
    eps_value,
    images_hwc,
    integer,
    integers,
    read_untrusted_pickle,
)
from epic.poisons import PoisonSet, PoisonSetError

__all__ = ["export_metapoison", "import_metapoison"]


def export_metapoison(poisons: PoisonSet, train: ImageData,
                      path: str | os.PathLike[str]) -> Path:
    """Write the MetaPoison-style single pickle (see the module docstring)."""
    poisoned = poisons.apply(train)
    n_t = len(poisons.target_images)
    record: dict[str, Any] = {
        "xtrain": poisoned.images.cpu().numpy().transpose(0, 2, 3, 1).copy(),
        "ytrain": poisoned.labels.cpu().numpy().astype(np.int64),
        "xtarget": poisons.target_images.cpu().numpy().transpose(0, 2, 3, 1).copy(),
        "ytarget": np.full(n_t, poisons.target_class, dtype=np.int64),
        "ytargetadv": np.full(n_t, poisons.adversarial_class, dtype=np.int64),
        "poison_indices": poisons.indices.cpu().numpy().astype(np.int64),
        "eps": float(poisons.eps), "target_class": poisons.target_class,
        "adversarial_class": poisons.adversarial_class,
        "metadata": json.dumps(poisons.metadata),
    }
    if poisons.trigger is not None:
        record["trigger"] = poisons.trigger.cpu().numpy().transpose(1, 2, 0).copy()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    dump(record, out)
    return out


def import_metapoison(path: str | os.PathLike[str], train: ImageData, *,
                      eps: float | None = None) -> PoisonSet:
    """Read a MetaPoison-style pickle against the clean ``train`` set it poisons.

    Poisons are the ``poison_indices`` entries of ``xtrain`` or, when that key is absent, the
    images that differ from ``train``. ``eps`` defaults to the file's, else to the largest
    measured distance.
    """
    record = read_untrusted_pickle(path)
    try:
        return _metapoison_set(record, train, eps)
    except PoisonSetError as exc:
        raise PoisonSetError(f"{path}: {exc}") from None


def _metapoison_set(record: Any, train: ImageData, eps: float | None) -> PoisonSet:
    """The checked content of a MetaPoison-style record as a :class:`PoisonSet`."""
    if not isinstance(record, dict) or not {"xtrain", "ytrain"} <= set(record):
        raise PoisonSetError("a MetaPoison-style pickle is a dict with xtrain and ytrain")
    xtrain = images_hwc(record["xtrain"], "'xtrain'", 4)
    ytrain = integers(record["ytrain"], "'ytrain'")
    if tuple(xtrain.shape) != tuple(train.images.shape) or len(ytrain) != len(train):
        raise PoisonSetError(f"xtrain is {tuple(xtrain.shape)} with {len(ytrain)} labels, the "
                             f"training set {tuple(train.images.shape)}")
    clean = train.images.cpu()
    if "poison_indices" in record:
        indices = integers(record["poison_indices"], "'poison_indices'")
        if len(indices) and not (int(indices.min()) >= 0 and int(indices.max()) < len(train)):
            raise PoisonSetError(f"'poison_indices' outside the training set of {len(train)}")
    else:
        indices = ((xtrain != clean).flatten(1).any(1)
                   | (ytrain != train.labels.cpu())).nonzero().squeeze(1)
    labels = ytrain[indices]
    relabelled = not torch.equal(labels, train.labels.cpu()[indices])
    target_images = (images_hwc(record["xtarget"], "'xtarget'", 4) if "xtarget" in record
                     else torch.zeros((0, *xtrain.shape[1:]), dtype=torch.uint8))
    yt = integers(record.get("ytarget", []), "'ytarget'")
    ya = integers(record.get("ytargetadv", []), "'ytargetadv'")
    target_class = (integer(record["target_class"], "'target_class'")
                    if "target_class" in record else int(yt[0]) if len(yt) else -1)
    adversarial = (integer(record["adversarial_class"], "'adversarial_class'")
                   if "adversarial_class" in record else int(ya[0]) if len(ya)
                   else Counter(labels.tolist()).most_common(1)[0][0])
    trigger = images_hwc(record["trigger"], "'trigger'", 3) if "trigger" in record else None
    if eps is None:
        eps = eps_value(record["eps"], "'eps'") if "eps" in record else max(
            int((xtrain[indices].short() - clean[indices].short()).abs().max()), 1) / 255
    meta = record.get("metadata")
    try:
        metadata = json.loads(meta) if isinstance(meta, str) else {}
    except (ValueError, RecursionError):
        raise PoisonSetError("'metadata' is not readable JSON") from None
    if not isinstance(metadata, dict):
        raise PoisonSetError("'metadata' must hold a JSON object")
    poisons = PoisonSet(indices=indices.long(), images=xtrain[indices].clone(),
                        target_images=target_images, target_class=target_class,
                        adversarial_class=adversarial, eps=eps,
                        labels=labels if relabelled else None, trigger=trigger,
                        metadata=metadata)
    poisons.validate(train)
    return poisons
