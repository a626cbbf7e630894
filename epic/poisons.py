"""Poison sets: what an attack hands to a victim, saved as arrays plus JSON, never pickled.

A poison set replaces some training images (``indices``) by perturbed ones (``images``) within
an l-infinity budget ``eps``, and names what the attacker wants: ``target_images`` (test-time
images) classified as ``adversarial_class``. A backdoor set also carries a ``trigger`` patch; its
success is measured on patched test images of ``target_class`` (the source class).

On disk a set is a folder with ``poisons.npz`` (arrays, read with ``allow_pickle=False``) and
``poisons.json`` (everything else).
"""

from __future__ import annotations

import json
import math
import os
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from epic.data import ImageData, channels_last_on_cpu, inference_batch_size, iterate_batches
from epic.errors import EpicError
from epic.io.files import open_untrusted, read_json, replace_atomically, write_atomically
from epic.io.npy import array_headers, read_array
from epic.models import eval_mode

__all__ = ["PoisonSet", "PoisonSetError", "apply_trigger"]

FORMAT_VERSION = 1
_ARRAYS = ("indices", "images", "target_images", "labels", "trigger")


#: Largest ``poisons.npz`` (all arrays, uncompressed) read from a stranger's folder.
MAX_NPZ_BYTES = 1 << 30


def _read_arrays(path: Path, train_size: int | None) -> dict[str, Tensor]:
    """The known arrays of ``poisons.npz``; sizes checked from the headers before reading:
    at most :data:`MAX_NPZ_BYTES` in all, and no more poisons than training examples."""
    with open_untrusted(path) as f, zipfile.ZipFile(f) as zf:
        headers = array_headers(zf, _ARRAYS, MAX_NPZ_BYTES)
        for key in ("indices", "images", "labels"):
            shape = headers.get(key, ((0,), None))[0]
            if train_size is not None and shape and shape[0] > train_size:
                raise ValueError(f"'{key}' has {shape[0]} rows, the training set "
                                 f"{train_size} examples")
        return {k: torch.from_numpy(read_array(zf, k)) for k in headers}


def _metadata_problem(metadata: dict[str, Any]) -> str | None:
    """What is wrong with the metadata fields that are read back (before any work is done
    on the set: a benchmark trial stores ``setup``), or None."""
    setup = metadata.get("setup")
    if setup is not None and not (
            isinstance(setup, dict) and isinstance(setup.get("id"), int)
            and not isinstance(setup.get("id"), bool)):
        return "'setup' must be an object with an integer 'id'"
    if not isinstance(metadata.get("clean_label", True), bool):
        return "'clean_label' must be true or false"
    blend = metadata.get("trigger_blend")
    if blend is not None and (isinstance(blend, bool) or not isinstance(blend, (int, float))
                              or not 0 < blend <= 1):
        return "'trigger_blend' must be a number in (0, 1]"
    return None


class PoisonSetError(EpicError):
    """A poison set is malformed or breaks its own constraints."""


def apply_trigger(images: Tensor, trigger: Tensor, *, blend: float | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """Paste ``trigger`` ``(C, h, w)`` uint8 at a random position of each image ``(B, C, H, W)``;
    with ``blend``, mix a whole-image trigger ``(C, H, W)`` into every pixel instead:
    ``(1 - blend) * image + blend * trigger``, rounded.

    Positions come from ``generator`` (CPU); the result is a new uint8 tensor.
    """
    if blend is not None:
        if trigger.shape != images.shape[1:]:
            raise PoisonSetError(f"a blended trigger covers the image: {tuple(trigger.shape)} "
                                 f"is not {tuple(images.shape[1:])}")
        mixed = (1 - blend) * images.float() + blend * trigger.to(images.device).float()
        return mixed.round().clamp(0, 255).to(torch.uint8)
    b, _, hh, ww = images.shape
    _, h, w = trigger.shape
    out = images.clone()
    rows = torch.randint(0, hh - h + 1, (b,), generator=generator).tolist()
    cols = torch.randint(0, ww - w + 1, (b,), generator=generator).tolist()
    for i, (r, c) in enumerate(zip(rows, cols, strict=True)):
        out[i, :, r:r + h, c:c + w] = trigger.to(out.device)
    return out


@dataclass(frozen=True)
class PoisonSet:
    """Poisoned replacements for some training images, and the attacker's goal.

    Attributes:
        indices: ``(P,)`` int64, distinct training-set indices of the base images.
        images: ``(P, C, H, W)`` uint8 poisoned images, within ``eps`` of their bases.
        target_images: ``(T, C, H, W)`` uint8 test-time targets (may be empty for backdoors).
        target_class: true class of the targets; for a backdoor, the source class.
        adversarial_class: class the attacker wants the targets predicted as.
        eps: l-infinity budget in ``[0, 1]`` pixel units (8/255, 16/255, or 1 for unbounded).
        labels: ``(P,)`` labels the poisons carry, or None when they keep their base labels
            (clean-label attacks).
        trigger: ``(C, h, w)`` uint8 backdoor patch, or None.
        metadata: attack name, hyperparameters, seed, model, seconds, anything JSON-ready.
    """

    indices: Tensor
    images: Tensor
    target_images: Tensor
    target_class: int
    adversarial_class: int
    eps: float
    labels: Tensor | None = None
    trigger: Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        p = self.indices.shape[0] if self.indices.dim() == 1 else -1
        if p < 0 or self.indices.dtype != torch.long:
            raise PoisonSetError("indices must be an int64 vector")
        if len(torch.unique(self.indices)) != p:
            raise PoisonSetError("indices must be distinct")
        for name in ("images", "target_images"):
            t = getattr(self, name)
            if t.dtype != torch.uint8 or t.dim() != 4:
                raise PoisonSetError(f"{name} must be uint8 (N, C, H, W), got {t.dtype} "
                                     f"{tuple(t.shape)}")
        if self.images.shape[0] != p:
            raise PoisonSetError(f"{p} indices but {self.images.shape[0]} images")
        if self.labels is not None and self.labels.shape != (p,):
            raise PoisonSetError(f"labels must be ({p},)")
        if self.trigger is not None and (self.trigger.dtype != torch.uint8
                                         or self.trigger.dim() != 3):
            raise PoisonSetError("trigger must be uint8 (C, h, w)")
        if not 0 < self.eps <= 1:
            raise PoisonSetError(f"eps must be in (0, 1], got {self.eps}")

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def eps_pixels(self) -> int:
        """The budget in 0..255 pixel steps."""
        return math.floor(self.eps * 255 + 1e-6)

    def validate(self, train: ImageData) -> None:
        """Check the set against the training set it poisons.

        Raises:
            PoisonSetError: an index is out of range, an image's shape differs, a poison leaves
                the eps-ball of its base image, or a clean-label poison changes its label.
        """
        n = len(train)
        if len(self) and (int(self.indices.min()) < 0 or int(self.indices.max()) >= n):
            raise PoisonSetError(f"indices must lie in [0, {n})")
        classes = train.num_classes
        for name in ("target_class", "adversarial_class"):
            if not 0 <= getattr(self, name) < classes:
                raise PoisonSetError(f"{name} is {getattr(self, name)}, outside the "
                                     f"{classes} classes 0..{classes - 1}")
        if self.labels is not None and len(self) and (
                int(self.labels.min()) < 0 or int(self.labels.max()) >= classes):
            raise PoisonSetError(f"labels must lie in 0..{classes - 1}")
        if len(self.target_images) and tuple(self.target_images.shape[1:]) != train.shape:
            raise PoisonSetError(f"target images are {tuple(self.target_images.shape[1:])}, "
                                 f"training images {train.shape}")
        if self.trigger is not None and (self.trigger.shape[0] != train.shape[0]
                                         or self.trigger.shape[1] > train.shape[1]
                                         or self.trigger.shape[2] > train.shape[2]):
            raise PoisonSetError(f"trigger {tuple(self.trigger.shape)} does not fit images "
                                 f"{train.shape}")
        if self.trigger_blend is not None and (self.trigger is None
                                               or tuple(self.trigger.shape) != train.shape):
            has = "none" if self.trigger is None else tuple(self.trigger.shape)
            raise PoisonSetError(f"a blended trigger covers the image {train.shape}; this set "
                                 f"has {has}")
        if tuple(self.images.shape[1:]) != train.shape:
            raise PoisonSetError(f"poison images are {tuple(self.images.shape[1:])}, training "
                                 f"images {train.shape}")
        base = train.images[self.indices.to(train.images.device)].cpu()
        dist = (self.images.short() - base.short()).abs().amax(dim=(1, 2, 3))
        bad = (dist > self.eps_pixels).nonzero().squeeze(1)
        if len(bad):
            raise PoisonSetError(
                f"{len(bad)} poisons exceed eps={self.eps_pixels}/255 (first: index "
                f"{int(self.indices[bad[0]])}, distance {int(dist[bad[0]])}/255)")
        if self.labels is None:
            return
        base_labels = train.labels[self.indices.to(train.labels.device)].cpu()
        if self.metadata.get("clean_label", True) and not torch.equal(self.labels, base_labels):
            raise PoisonSetError("a clean-label poison set changes labels")

    def select(self, rows: Tensor) -> PoisonSet:
        """The poisons at ``rows`` (positions in this set, or a bool mask ``(P,)``)."""
        return replace(self, indices=self.indices[rows], images=self.images[rows],
                       labels=None if self.labels is None else self.labels[rows])

    def apply(self, train: ImageData) -> ImageData:
        """The training set with the poisons in place (validated first)."""
        self.validate(train)
        images = train.images.clone()
        images[self.indices.to(images.device)] = self.images.to(images.device)
        labels = train.labels
        if self.labels is not None:
            labels = labels.clone()
            labels[self.indices.to(labels.device)] = self.labels.to(labels.device)
        return replace(train, images=images, labels=labels)

    def evaluation_images(self, test: ImageData, *, limit: int = 1000, seed: int = 0,
                          patched: bool = True) -> Tensor:
        """uint8 images the attack should flip: the targets, or patched source-class test images.

        For a backdoor, up to ``limit`` test images of ``target_class`` get the trigger at a
        random place (fixed by ``seed``), as in Sleeper Agent's evaluation; ``patched=False``
        gives the same images without it (the patch-free baseline).
        """
        if self.trigger is None:
            return self.target_images
        source = test.images[test.labels == self.target_class][:limit].cpu()
        if not patched:
            return source
        return apply_trigger(source, self.trigger, blend=self.trigger_blend,
                             generator=torch.Generator().manual_seed(seed))

    @property
    def trigger_blend(self) -> float | None:
        """The weight a blended trigger is mixed into images with (``metadata``'s
        ``trigger_blend``); None for a patch pasted on them."""
        blend = self.metadata.get("trigger_blend")
        return None if blend is None else float(blend)

    @torch.no_grad()
    def success(self, model: nn.Module, test: ImageData, *, patched: bool = True) -> float:
        """Share of :meth:`evaluation_images` the model assigns to ``adversarial_class``
        (for a backdoor with ``patched=False``: the same source images without the trigger)."""
        images = self.evaluation_images(test, patched=patched)
        if len(images) == 0:
            raise PoisonSetError("nothing to evaluate: no targets and no source-class images")
        probe = replace(test, images=images,
                        labels=torch.full((len(images),), self.adversarial_class))
        device = next(model.parameters()).device
        hits = 0
        with eval_mode(model):
            for x, y, _ in iterate_batches(probe, batch_size=inference_batch_size(device),
                                           device=device):
                hits += int((model(channels_last_on_cpu(x)).argmax(1) == y).sum())
        return hits / len(images)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path/poisons.npz`` and ``path/poisons.json``; returns the folder."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {k: getattr(self, k).cpu().numpy() for k in _ARRAYS
                  if getattr(self, k) is not None}
        replace_atomically(folder / "poisons.npz", lambda f: np.savez_compressed(f, **arrays))
        meta = {"format": "epic-poisons", "version": FORMAT_VERSION,
                "target_class": self.target_class, "adversarial_class": self.adversarial_class,
                "eps": self.eps, "metadata": self.metadata}
        write_atomically(folder / "poisons.json", json.dumps(meta, indent=2))
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike[str], train: ImageData | None = None) -> PoisonSet:
        """Read a set written by :meth:`save`, without pickle; validated against ``train``.

        Raises:
            PoisonSetError: missing files, unknown format, or a set that fails validation.
        """
        folder = Path(path)
        try:
            meta = read_json(folder / "poisons.json")
            arrays = _read_arrays(folder / "poisons.npz", None if train is None else len(train))
        except (OSError, ValueError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise PoisonSetError(f"cannot read a poison set at {folder}: {exc}") from exc
        if (not isinstance(meta, dict) or meta.get("format") != "epic-poisons"
                or meta.get("version") != FORMAT_VERSION):
            raise PoisonSetError(f"{folder}: not an epic poison set (version {FORMAT_VERSION})")
        missing = {"indices", "images", "target_images"} - set(arrays)
        if missing:
            raise PoisonSetError(f"{folder}: poisons.npz lacks {sorted(missing)}")
        for key in ("indices", "labels"):
            if key in arrays and (arrays[key].is_floating_point() or arrays[key].is_complex()
                                  or arrays[key].dtype == torch.bool):
                raise PoisonSetError(f"{folder}: poisons.npz '{key}' must be integers, got "
                                     f"{arrays[key].dtype}")
        for key in ("target_class", "adversarial_class"):
            if isinstance(meta.get(key), bool) or not isinstance(meta.get(key), int):
                raise PoisonSetError(f"{folder}: poisons.json '{key}' must be an integer")
        if isinstance(meta.get("eps"), bool) or not isinstance(meta.get("eps"), (int, float)):
            raise PoisonSetError(f"{folder}: poisons.json 'eps' must be a number")
        if not isinstance(meta.get("metadata", {}), dict):
            raise PoisonSetError(f"{folder}: poisons.json 'metadata' must be an object")
        problem = _metadata_problem(meta.get("metadata", {}))
        if problem:
            raise PoisonSetError(f"{folder}: poisons.json 'metadata' {problem}")
        arrays["indices"] = arrays["indices"].long()
        if "labels" in arrays:
            arrays["labels"] = arrays["labels"].long()
        poisons = cls(target_class=int(meta["target_class"]),
                      adversarial_class=int(meta["adversarial_class"]), eps=float(meta["eps"]),
                      metadata=dict(meta.get("metadata", {})), **arrays)
        if train is not None:
            poisons.validate(train)
        return poisons
