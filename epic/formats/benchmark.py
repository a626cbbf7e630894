"""The benchmark layout (see :mod:`epic.formats`)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from epic.data import ImageData
from epic.formats.untrusted import (
    dump,
    eps_value,
    integer,
    integers,
    kind,
    read_untrusted_pickle,
    stack_images,
)
from epic.io.files import read_json, write_atomically
from epic.io.safe_pickle import UnsafePickleError
from epic.poisons import PoisonSet, PoisonSetError

__all__ = ["export_benchmark", "import_benchmark"]


def _to_pil_or_array(chw: Tensor, pil: bool) -> Any:
    hwc = chw.cpu().numpy().transpose(1, 2, 0)
    if not pil:
        return np.ascontiguousarray(hwc)
    from PIL import Image

    return Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else np.ascontiguousarray(hwc))


def _have_pil() -> bool:
    try:
        import PIL  # noqa: F401
    except ImportError:
        return False
    return True


def export_benchmark(poisons: PoisonSet, folder: str | os.PathLike[str], *,
                     pil: bool | None = None) -> Path:
    """Write ``poisons`` in the benchmark layout (see the module docstring).

    Args:
        pil: store PIL images (default: when Pillow is installed) or uint8 arrays.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    use_pil = _have_pil() if pil is None else pil
    labels = poisons.labels
    if labels is None:
        # Clean-label sets keep base labels; benchmark readers expect them in the file, and
        # all poisons of these attacks come from the adversarial class.
        labels = torch.full((len(poisons),), poisons.adversarial_class)
    dump([(_to_pil_or_array(img, use_pil), int(lab))
           for img, lab in zip(poisons.images, labels, strict=True)], out / "poisons.pickle")
    dump([int(i) for i in poisons.indices], out / "base_indices.pickle")
    targets = [(_to_pil_or_array(t, use_pil), poisons.target_class)
               for t in poisons.target_images]
    if len(targets) == 1:
        dump(targets[0], out / "target.pickle")
    elif targets:
        dump(targets, out / "target.pickle")
    if poisons.trigger is not None:
        dump((_to_pil_or_array(poisons.trigger, use_pil), poisons.target_class),
              out / "source.pickle")
    sidecar = {"format": "epic-benchmark-sidecar", "version": 1, "eps": poisons.eps,
               "target_class": poisons.target_class,
               "adversarial_class": poisons.adversarial_class,
               "relabelled": poisons.labels is not None, "metadata": poisons.metadata}
    write_atomically(out / "epic.json", json.dumps(sidecar, indent=2))
    return out


def import_benchmark(folder: str | os.PathLike[str], train: ImageData | None = None, *,
                     eps: float | None = None) -> PoisonSet:
    """Read a benchmark-layout folder into a validated :class:`PoisonSet`.

    ``eps`` and the classes come from an ``epic.json`` sidecar when present. Otherwise
    ``eps`` must be given or is measured against ``train`` (the largest distance of a poison
    from its base, rounded up to a whole pixel step), the adversarial class is the poisons'
    most common label, and labels count as unchanged when they equal ``train``'s.

    Raises:
        UnsafePickleError: a pickle names anything beyond images, arrays, numbers, containers.
        PoisonSetError: missing files, malformed content, or a set that fails validation.
    """
    src = Path(folder)
    try:
        raw = read_untrusted_pickle(src / "poisons.pickle")
        idx = read_untrusted_pickle(src / "base_indices.pickle")
        target = (read_untrusted_pickle(src / "target.pickle")
                  if (src / "target.pickle").exists() else None)
        source = (read_untrusted_pickle(src / "source.pickle")
                  if (src / "source.pickle").exists() else None)
        side = read_json(src / "epic.json") if (src / "epic.json").exists() else None
    except OSError as exc:
        raise PoisonSetError(f"cannot read a benchmark poison folder at {src}: {exc}") from exc
    except UnsafePickleError:
        raise
    except ValueError as exc:
        raise PoisonSetError(str(exc)) from None
    try:
        poisons = _benchmark_set(raw, idx, target, source, side, train, eps)
    except PoisonSetError as exc:
        raise PoisonSetError(f"{src}: {exc}") from None
    return poisons


def _pairs(obj: Any, field: str) -> list[tuple[Any, Any]]:
    """The ``(image, label)`` pairs of a list of them."""
    if not isinstance(obj, (list, tuple)) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 for p in obj):
        raise PoisonSetError(f"{field} must hold a list of (image, label)")
    return [(p[0], p[1]) for p in obj]


def _side_file(side: Any, eps: float | None) -> tuple[float, int, int, bool, dict[str, Any]]:
    """The checked facts of ``epic.json``: eps (``eps`` when given), target and adversarial
    class, whether the poisons are relabelled, and the metadata."""
    if not isinstance(side, dict):
        raise PoisonSetError(f"epic.json must hold an object, got {kind(side)}")
    for key in ("eps", "target_class", "adversarial_class", "relabelled"):
        if key not in side:
            raise PoisonSetError(f"epic.json lacks '{key}'")
    eps = eps_value(side["eps"], "epic.json 'eps'") if eps is None else eps
    target_class = integer(side["target_class"], "epic.json 'target_class'")
    adversarial = integer(side["adversarial_class"], "epic.json 'adversarial_class'")
    if not isinstance(side["relabelled"], bool):
        raise PoisonSetError("epic.json 'relabelled' must be true or false")
    if not isinstance(side.get("metadata", {}), dict):
        raise PoisonSetError("epic.json 'metadata' must be an object")
    return eps, target_class, adversarial, side["relabelled"], dict(side.get("metadata", {}))


def _benchmark_set(raw: Any, idx: Any, target: Any, source: Any, side: Any,
                   train: ImageData | None, eps: float | None) -> PoisonSet:
    """The checked content of a benchmark folder as a :class:`PoisonSet`."""
    pairs = _pairs(raw, "poisons.pickle")
    indices = integers(idx, "base_indices.pickle")
    if len(indices) != len(pairs):  # before any image is copied
        raise PoisonSetError(f"{len(pairs)} poisons but {len(indices)} base indices")
    if train is not None and len(pairs) > len(train):
        raise PoisonSetError(f"{len(pairs)} poisons, more than the {len(train)} training "
                             f"images")
    images = stack_images([p[0] for p in pairs], "poisons.pickle")
    labels = torch.tensor([integer(p[1], "a poisons.pickle label") for p in pairs],
                          dtype=torch.long)
    bare = (isinstance(target, (list, tuple)) and len(target) == 2
            and not isinstance(target[0], (list, tuple)))
    targets = [] if target is None else _pairs([target] if bare else target, "target.pickle")
    target_images = stack_images([t[0] for t in targets], "target.pickle")
    if not targets:
        target_images = torch.zeros((0, *images.shape[1:]), dtype=torch.uint8)
    trigger = None
    target_class = integer(targets[0][1], "a target.pickle label") if targets else None
    if source is not None:
        trigger, source_class = _pairs([source], "source.pickle")[0]
        trigger = stack_images([trigger], "source.pickle")[0]
        target_class = integer(source_class, "the source.pickle class")
    metadata: dict[str, Any] = {}
    relabelled: bool | None = None
    adversarial: int | None = None
    if side is not None:
        eps, target_class, adversarial, relabelled, metadata = _side_file(side, eps)
    if adversarial is None:
        adversarial = Counter(labels.tolist()).most_common(1)[0][0] if len(labels) else -1
    if target_class is None:
        raise PoisonSetError("no target.pickle or source.pickle: the attack's goal is unknown")
    if train is not None and len(indices) and not (
            int(indices.min()) >= 0 and int(indices.max()) < len(train)):
        raise PoisonSetError(f"base_indices.pickle holds indices outside the training set "
                             f"of {len(train)}")
    if relabelled is None:
        relabelled = train is not None and not torch.equal(labels, train.labels[indices].cpu())
        metadata.setdefault("clean_label", not relabelled)
    if eps is None:
        if train is None:
            raise PoisonSetError("eps unknown: pass eps or the training set")
        dist = (images.short() - train.images[indices].cpu().short()).abs().max()
        eps = max(int(dist), 1) / 255
    poisons = PoisonSet(indices=indices, images=images, target_images=target_images,
                        target_class=target_class, adversarial_class=adversarial, eps=eps,
                        labels=labels if relabelled else None, trigger=trigger,
                        metadata=metadata)
    if train is not None:
        if not relabelled and not torch.equal(labels, train.labels[indices].cpu()):
            raise PoisonSetError("poisons.pickle labels differ from the base images' labels")
        poisons.validate(train)
    return poisons
