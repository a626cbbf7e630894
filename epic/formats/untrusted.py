"""Reading pickles and records from strangers: the restricted unpickler with a stand-in for
PIL images, and checks that turn every field of an untrusted record into a tensor or a
:class:`~epic.poisons.PoisonSetError` naming the field."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from epic.io.files import open_untrusted, replace_atomically
from epic.io.safe_pickle import UnsafePickleError, safe_load
from epic.poisons import PoisonSetError

__all__ = ["PilStandIn", "dump", "eps_value", "images_hwc", "integer", "integers", "kind",
           "read_untrusted_pickle", "stack_images", "to_chw"]


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
    with open_untrusted(path) as f:
        return safe_load(f, extra=_EXTRA)


def dump(obj: Any, path: Path) -> None:
    """Pickle ``obj`` (our own data) into ``path``, atomically and never through a link."""
    replace_atomically(path, lambda f: pickle.dump(obj, f, protocol=4))


def to_chw(image: Any) -> Tensor:
    if isinstance(image, PilStandIn):
        arr = image.to_array()
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3):
            raise PoisonSetError(f"image arrays must be (H, W[, C]), got {arr.shape}")
        if arr.dtype != np.uint8:
            if arr.dtype.kind not in "iuf" or arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise PoisonSetError(f"image arrays must hold finite numbers, got "
                                     f"{kind(arr)}" + (" with NaN or infinity"
                                                       if arr.dtype.kind == "f" else ""))
            if arr.dtype.kind == "f" and arr.size and float(arr.max()) <= 1.0:
                arr = np.round(arr * 255)
            arr = np.clip(arr, 0, 255).astype(np.uint8)
    else:
        raise PoisonSetError(f"expected an image, got {type(image).__name__}")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def stack_images(images: list[Any], field: str) -> Tensor:
    try:
        chw = [to_chw(im) for im in images]
    except PoisonSetError as exc:
        raise PoisonSetError(f"{field}: {exc}") from None
    if len({tuple(c.shape) for c in chw}) > 1:
        raise PoisonSetError(f"{field}: images of different sizes")
    return torch.stack(chw) if chw else torch.zeros((0, 0, 0, 0), dtype=torch.uint8)


def kind(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    return f"a {type(value).__name__}"


def _is_int(value: Any) -> bool:
    return (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
            and -(1 << 63) <= int(value) < 1 << 63)


def integers(value: Any, field: str) -> Tensor:
    """A 1-D int64 tensor from an integer array, a list of integers or one integer; floats,
    booleans and anything else are refused rather than truncated."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "iu":
        return torch.from_numpy(value.astype(np.int64).reshape(-1))
    if _is_int(value):
        return torch.tensor([int(value)])
    if isinstance(value, (list, tuple)) and all(_is_int(v) for v in value):
        return torch.tensor([int(v) for v in value], dtype=torch.long)
    raise PoisonSetError(f"{field} must be integers, got {kind(value)}")


def integer(value: Any, field: str) -> int:
    if not _is_int(value):
        raise PoisonSetError(f"{field} must be an integer, got {kind(value)}")
    return int(value)


def images_hwc(value: Any, field: str, ndim: int) -> Tensor:
    """A uint8 ``(..., H, W, C)`` array of ``ndim`` dimensions as ``(..., C, H, W)``."""
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != ndim:
        raise PoisonSetError(f"{field} must be a {ndim}-d uint8 array (..., H, W, C), got "
                             f"{kind(value)}")
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(value, -1, -3)))


def eps_value(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not 0 < float(value) <= 1:
        raise PoisonSetError(f"{field} must be a number in (0, 1], got {value!r:.40}")
    return float(value)
