"""Poison exchange formats besides our own (:meth:`epic.poisons.PoisonSet.save`).

* **Benchmark layout**, the folder the public poisoning benchmark (Schwarzschild et al. 2021)
  and the Witches' Brew code (Geiping et al. 2021) exchange:

  - ``poisons.pickle``: list of ``(image, label)``, one per poison, in base-index order;
  - ``base_indices.pickle``: the training indices the poisons replace;
  - ``target.pickle``: ``(image, true label)`` of the target (a list of them for several);
  - ``source.pickle`` (backdoors): ``(trigger patch image, source class)``.

  Images are PIL images (what those codes write) or ``(H, W[, C])`` uint8 arrays. We add an
  ``epic.json`` sidecar (eps, classes, metadata), which other readers ignore, so that a set
  exported and imported again is identical.

* **MetaPoison-style single pickle**: one dict with the whole poisoned training set,
  ``xtrain`` ``(N, H, W, C)`` uint8 and ``ytrain``, the targets ``xtarget``, their labels
  ``ytarget`` and adversarial labels ``ytargetadv``, plus ``poison_indices``, ``eps`` and,
  for backdoors, ``trigger`` ``(h, w, C)``.

Every pickle here is read with :func:`epic.safe_pickle.safe_load`: only arrays, numbers,
strings, containers and a stand-in for ``PIL.Image.Image`` that copies mode, size and bytes
(no PIL code runs, no callable named by the file is ever called). A crafted pickle raises
:class:`~epic.safe_pickle.UnsafePickleError`.
"""

from __future__ import annotations

import json
import os
import pickle
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from epic.data import ImageData
from epic.poisons import PoisonSet, PoisonSetError
from epic.safe_pickle import UnsafePickleError, safe_load

__all__ = ["PilStandIn", "export_benchmark", "export_metapoison", "import_benchmark",
           "import_metapoison", "read_untrusted_pickle"]

_MODES = {"L": 1, "RGB": 3}


class PilStandIn:
    """What a pickled ``PIL.Image.Image`` becomes here: its mode, size and raw bytes.

    Only the state PIL writes (``[info, mode, size, palette, data]``, or the older
    ``[info, mode, size, data]``) is accepted, and only modes ``L`` and ``RGB``.
    """

    mode: str
    size: tuple[int, int]
    data: bytes

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, (list, tuple)) or len(state) not in (4, 5):
            raise UnsafePickleError("unexpected PIL image state")
        mode, size, data = state[1], state[2], state[-1]
        if mode not in _MODES:
            raise UnsafePickleError(f"PIL image mode {mode!r} is not supported (L or RGB)")
        if (not isinstance(size, (list, tuple)) or len(size) != 2
                or not all(isinstance(s, int) and 0 < s < 1 << 16 for s in size)):
            raise UnsafePickleError("bad PIL image size")
        if not isinstance(data, (bytes, bytearray)):
            raise UnsafePickleError("PIL image data must be bytes")
        w, h = size
        if len(data) != w * h * _MODES[mode]:
            raise UnsafePickleError("PIL image data does not match its size")
        self.mode, self.size, self.data = mode, (w, h), bytes(data)

    def to_array(self) -> np.ndarray:
        """``(H, W, C)`` uint8."""
        w, h = self.size
        return np.frombuffer(self.data, dtype=np.uint8).reshape(h, w, _MODES[self.mode]).copy()


class _ObjectSentinel:
    """Stands in for ``builtins.object`` (protocol 0/1 pickles name it); calls nothing."""


def _reconstructor(cls: Any, base: Any, state: Any = None) -> PilStandIn:
    if cls is not PilStandIn or base is not _ObjectSentinel or state is not None:
        raise UnsafePickleError("refusing to reconstruct anything but a PIL image")
    return PilStandIn.__new__(PilStandIn)


_EXTRA: dict[tuple[str, str], Any] = {
    ("PIL.Image", "Image"): PilStandIn,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("builtins", "object"): _ObjectSentinel,
    ("__builtin__", "object"): _ObjectSentinel,
}


def read_untrusted_pickle(path: str | os.PathLike[str]) -> Any:
    """Unpickle ``path`` admitting arrays, numbers, strings, containers and PIL images
    (as :class:`PilStandIn`); raises :class:`UnsafePickleError` on anything else."""
    with open(path, "rb") as f:
        return safe_load(f, extra=_EXTRA)


def _to_chw(image: Any) -> Tensor:
    if isinstance(image, PilStandIn):
        arr = image.to_array()
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3):
            raise PoisonSetError(f"image arrays must be (H, W[, C]), got {arr.shape}")
        if arr.dtype != np.uint8:
            if arr.dtype.kind == "f" and arr.size and float(arr.max()) <= 1.0:
                arr = np.round(arr * 255)
            arr = np.clip(arr, 0, 255).astype(np.uint8)
    else:
        raise PoisonSetError(f"expected an image, got {type(image).__name__}")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


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


def _dump(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


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
    _dump([(_to_pil_or_array(img, use_pil), int(lab))
           for img, lab in zip(poisons.images, labels, strict=True)], out / "poisons.pickle")
    _dump([int(i) for i in poisons.indices], out / "base_indices.pickle")
    targets = [(_to_pil_or_array(t, use_pil), poisons.target_class)
               for t in poisons.target_images]
    if len(targets) == 1:
        _dump(targets[0], out / "target.pickle")
    elif targets:
        _dump(targets, out / "target.pickle")
    if poisons.trigger is not None:
        _dump((_to_pil_or_array(poisons.trigger, use_pil), poisons.target_class),
              out / "source.pickle")
    sidecar = {"format": "epic-benchmark-sidecar", "version": 1, "eps": poisons.eps,
               "target_class": poisons.target_class,
               "adversarial_class": poisons.adversarial_class,
               "relabelled": poisons.labels is not None, "metadata": poisons.metadata}
    (out / "epic.json").write_text(json.dumps(sidecar, indent=2))
    return out


def _stack(images: list[Any]) -> Tensor:
    return torch.stack([_to_chw(im) for im in images]) if images else torch.zeros(
        (0, 0, 0, 0), dtype=torch.uint8)


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
        side = (json.loads((src / "epic.json").read_text())
                if (src / "epic.json").exists() else None)
    except OSError as exc:
        raise PoisonSetError(f"cannot read a benchmark poison folder at {src}: {exc}") from exc
    if not isinstance(raw, (list, tuple)) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 for p in raw):
        raise PoisonSetError("poisons.pickle must hold a list of (image, label)")
    images = _stack([p[0] for p in raw])
    labels = torch.tensor([int(p[1]) for p in raw], dtype=torch.long)
    indices = torch.as_tensor(np.asarray(idx, dtype=np.int64).reshape(-1))
    pairs = [] if target is None else (
        [target] if isinstance(target, tuple) and len(target) == 2
        and not isinstance(target[0], tuple) else list(target))
    target_images = _stack([t[0] for t in pairs])
    if len(pairs) == 0:
        target_images = torch.zeros((0, *images.shape[1:]), dtype=torch.uint8)
    trigger = None
    target_class: int | None = int(pairs[0][1]) if pairs else None
    if source is not None:
        trigger = _to_chw(source[0])
        target_class = int(source[1])
    metadata: dict[str, Any] = {}
    relabelled: bool | None = None
    adversarial: int | None = None
    if side is not None:
        eps = float(side["eps"]) if eps is None else eps
        target_class = int(side["target_class"])
        adversarial = int(side["adversarial_class"])
        relabelled = bool(side["relabelled"])
        metadata = dict(side.get("metadata", {}))
    if adversarial is None:
        adversarial = Counter(labels.tolist()).most_common(1)[0][0] if len(labels) else -1
    if target_class is None:
        raise PoisonSetError("no target.pickle or source.pickle: the attack's goal is unknown")
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
    _dump(record, out)
    return out


def import_metapoison(path: str | os.PathLike[str], train: ImageData, *,
                      eps: float | None = None) -> PoisonSet:
    """Read a MetaPoison-style pickle against the clean ``train`` set it poisons.

    Poisons are the ``poison_indices`` entries of ``xtrain`` or, when that key is absent, the
    images that differ from ``train``. ``eps`` defaults to the file's, else to the largest
    measured distance.
    """
    record = read_untrusted_pickle(path)
    if not isinstance(record, dict) or not {"xtrain", "ytrain"} <= set(record):
        raise PoisonSetError("a MetaPoison-style pickle is a dict with xtrain and ytrain")
    xtrain = torch.from_numpy(np.ascontiguousarray(
        np.asarray(record["xtrain"], dtype=np.uint8).transpose(0, 3, 1, 2)))
    ytrain = torch.as_tensor(np.asarray(record["ytrain"], dtype=np.int64))
    if tuple(xtrain.shape) != tuple(train.images.shape):
        raise PoisonSetError(f"xtrain is {tuple(xtrain.shape)}, the training set "
                             f"{tuple(train.images.shape)}")
    clean = train.images.cpu()
    if "poison_indices" in record:
        indices = torch.as_tensor(np.asarray(record["poison_indices"], dtype=np.int64))
    else:
        indices = ((xtrain != clean).flatten(1).any(1)
                   | (ytrain != train.labels.cpu())).nonzero().squeeze(1)
    labels = ytrain[indices]
    relabelled = not torch.equal(labels, train.labels.cpu()[indices])
    xt = np.asarray(record.get("xtarget", np.zeros((0, *xtrain.shape[2:], xtrain.shape[1]))),
                    dtype=np.uint8)
    target_images = torch.from_numpy(np.ascontiguousarray(xt.transpose(0, 3, 1, 2)))
    yt = np.asarray(record.get("ytarget", []), dtype=np.int64).reshape(-1)
    ya = np.asarray(record.get("ytargetadv", []), dtype=np.int64).reshape(-1)
    target_class = int(record.get("target_class", yt[0] if len(yt) else -1))
    adversarial = int(record.get("adversarial_class", ya[0] if len(ya) else
                                 Counter(labels.tolist()).most_common(1)[0][0]))
    trigger = None
    if "trigger" in record:
        trigger = torch.from_numpy(np.ascontiguousarray(
            np.asarray(record["trigger"], dtype=np.uint8).transpose(2, 0, 1)))
    if eps is None:
        eps = float(record["eps"]) if "eps" in record else max(
            int((xtrain[indices].short() - clean[indices].short()).abs().max()), 1) / 255
    meta = record.get("metadata")
    metadata = json.loads(meta) if isinstance(meta, str) else {}
    poisons = PoisonSet(indices=indices.long(), images=xtrain[indices].clone(),
                        target_images=target_images, target_class=target_class,
                        adversarial_class=adversarial, eps=eps,
                        labels=labels if relabelled else None, trigger=trigger,
                        metadata=metadata)
    poisons.validate(train)
    return poisons
