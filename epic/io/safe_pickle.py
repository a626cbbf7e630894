"""Restricted unpickling for files that come from strangers.

Pickle runs whatever callable a file names. Data files in this field (CIFAR batches, poison sets
exchanged between labs) only ever need numpy arrays, numbers, strings and containers, so the
unpickler here admits exactly the globals those need and refuses everything else before anything
is called.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import zipfile
from typing import IO, Any

import numpy as np
import torch

from epic.errors import EpicError
from epic.io.files import MAX_UNTRUSTED_BYTES, open_untrusted

__all__ = ["MAX_ARRAY_BYTES", "MAX_WEIGHTS_BYTES", "UnsafePickleError", "load_weights",
           "safe_load", "safe_loads"]

# numpy moved its internals from numpy.core to numpy._core in 2.0; files from both eras exist.
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    # protocol 5: an array rebuilt from bytes the file holds (checked for their dtype after)
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """What protocol-2 pickles written by Python 3 call to rebuild ``bytes``."""
    if not isinstance(text, str) or encoding.lower().replace("-", "") != "latin1":
        raise UnsafePickleError("only latin-1 text may be encoded to bytes in an untrusted pickle")
    return text.encode("latin1")


class UnsafePickleError(pickle.UnpicklingError, EpicError):
    """A pickle asked for a global outside the allowlist, or is not a readable pickle; nothing
    from it was executed. The message names the file when the reader knows it."""


#: Largest array an untrusted pickle may make numpy allocate (a few bytes of pickle can ask
#: for any shape), and largest content it may hold with every shared reference counted as a
#: copy; CIFAR-100's training batch is 150 MB.
MAX_ARRAY_BYTES = 1 << 30


def _check_size(shape: Any, dtype: Any, limit: int) -> None:
    try:
        dims = [int(d) for d in (shape if isinstance(shape, (tuple, list)) else (shape,))]
        itemsize = np.dtype(dtype).itemsize
    except (TypeError, ValueError) as exc:
        raise UnsafePickleError(f"bad array shape or dtype ({exc})") from None
    if any(d < 0 for d in dims) or math.prod(dims) * itemsize > limit:
        raise UnsafePickleError(f"an array of shape {tuple(dims)} and {itemsize}-byte items is "
                                f"over the limit of {limit:,} bytes for untrusted pickles")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], extra: dict[tuple[str, str], Any],
                 max_array_bytes: int) -> None:
        super().__init__(file, encoding="latin1")
        self._extra = extra
        self._limit = max_array_bytes

    def _ndarray(self, shape: Any, dtype: Any = float, *args: Any, **kwargs: Any) -> Any:
        """``numpy.ndarray(shape, dtype, ...)`` called by the file, within the size limit."""
        _check_size(shape, dtype, self._limit)
        return np.ndarray(shape, dtype, *args, **kwargs)

    def _reconstruct(self, real: Any) -> Any:
        def reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
            _check_size(shape, dtype, self._limit)
            return real(np.ndarray if subtype == self._ndarray else subtype, shape, dtype)

        return reconstruct

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._extra:
            return self._extra[(module, name)]
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        if (module, name) == ("numpy", "ndarray"):
            return self._ndarray  # also what the file passes to _reconstruct as the subtype
        if name == "_reconstruct" and (module, name) in _NUMPY_GLOBALS:
            return self._reconstruct(super().find_class(module, name))
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refusing to load {module}.{name}: this file may only contain arrays, numbers, "
            "strings and containers (it may be malicious or not the format expected)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing persistent ids in an untrusted pickle")


# what a data file may hold: booleans, integers, floats, complex numbers, bytes and text
_PLAIN_KINDS = frozenset("biufcSU")


def _check_dtype(dtype: np.dtype) -> None:
    """Admit only plain dtypes, judged by what they are, not by the flags a file claims: the
    canonical dtype of the same type string must match in kind, size and flags."""
    canonical = np.dtype(dtype.str)
    if (canonical.kind not in _PLAIN_KINDS or dtype.kind != canonical.kind
            or dtype.names is not None or dtype.subdtype is not None
            or dtype.itemsize != canonical.itemsize or dtype.flags != canonical.flags
            or dtype.hasobject):
        raise UnsafePickleError(f"dtype {dtype.str!r} is not admitted in untrusted pickles "
                                "(only plain numbers, booleans, bytes and text)")


def _check_content(obj: Any, limit: int) -> None:
    """Check every array's dtype, and that what was unpickled stays within ``limit`` bytes
    once each shared reference counts as the copy a reader would make of it (a few bytes of
    pickle can list one array a million times). Each object is walked once (sizes are
    memoized: a small file of nested shared lists must not cost exponential time)."""
    sizes: dict[int, int] = {}

    def size(item: Any, depth: int) -> int:
        if depth > 64:
            raise UnsafePickleError("pickle nests containers too deeply")
        known = sizes.get(id(item))
        if known is not None:
            return known
        if isinstance(item, (np.ndarray, np.generic)):
            _check_dtype(item.dtype)
            n = item.nbytes
        elif isinstance(item, np.dtype):
            _check_dtype(item)
            n = 0
        elif isinstance(item, (bytes, bytearray, str)):
            n = len(item)
        elif isinstance(item, (dict, list, tuple, set, frozenset)):
            n = 8 * len(item)
            for child in (v for pair in item.items() for v in pair) if isinstance(item, dict) \
                    else item:
                n += size(child, depth + 1)
                if n > limit:
                    break
        elif isinstance(getattr(item, "__dict__", None), dict):  # a stand-in (a PIL image)
            n = 8 + size(vars(item), depth + 1)
        else:
            n = 8
        if n > limit:
            raise UnsafePickleError(f"its content takes over {limit:,} bytes once every shared "
                                    "reference is counted as a copy (the limit for untrusted "
                                    "pickles)")
        sizes[id(item)] = n
        return n

    size(obj, 0)


def safe_load(file: IO[bytes], *, extra: dict[tuple[str, str], Any] | None = None,
              name: str | None = None, max_array_bytes: int = MAX_ARRAY_BYTES) -> Any:
    """Unpickle ``file`` admitting only numpy arrays, numbers, strings and containers.

    ``extra`` maps further ``(module, name)`` globals to the object to use in their place (for
    example a harmless stand-in class for ``PIL.Image.Image``). Text in Python 2 pickles is
    decoded as latin-1, as the CIFAR batches require.

    Raises:
        UnsafePickleError: the file names any other global (nothing it names is called),
            asks for an array over ``max_array_bytes``, holds more than that many bytes
            of content counting every shared reference as a copy, or is truncated or no
            pickle at all; the message starts with ``name`` (default: the file object's own
            name, if it has one).

    Example:
        >>> import io, pickle
        >>> safe_load(io.BytesIO(pickle.dumps({"labels": [1, 2]})))
        {'labels': [1, 2]}
    """
    where = name or getattr(file, "name", None) or "pickle"
    try:
        obj = _RestrictedUnpickler(file, extra or {}, max_array_bytes).load()
        _check_content(obj, max_array_bytes)
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{where}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError,
            KeyError, AttributeError, MemoryError, UnicodeDecodeError) as exc:
        raise UnsafePickleError(f"{where}: not a readable pickle ({type(exc).__name__}: "
                                f"{exc})") from None
    return obj


def safe_loads(data: bytes, *, extra: dict[tuple[str, str], Any] | None = None) -> Any:
    """:func:`safe_load` on bytes."""
    return safe_load(io.BytesIO(data), extra=extra)


#: Largest model file read, and largest total its archive may declare once inflated.
MAX_WEIGHTS_BYTES = MAX_UNTRUSTED_BYTES


def load_weights(path: str | os.PathLike[str], *, max_bytes: int = MAX_WEIGHTS_BYTES,
                 map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` of a stranger's file, checked first.

    The file is opened by :func:`epic.io.files.open_untrusted` (a regular file of at most
    ``max_bytes``) and must be the zip archive ``torch.save`` writes (the format since torch
    1.6; the older one declares its sizes inside the pickle). torch inflates a compressed
    record with no limit of its own, so the sizes the archive declares, all records
    together, must be at most ``max_bytes`` too: a small file cannot ask for gigabytes.

    Raises:
        UnsafePickleError: not such an archive, or one declaring more than ``max_bytes``.
        OSError: as ``open`` raises it.
        Exception: whatever ``torch.load`` raises on a malformed archive.
    """
    with open_untrusted(path, max_bytes=max_bytes) as f:
        try:
            with zipfile.ZipFile(f) as zf:
                declared = sum(info.file_size for info in zf.infolist())
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
            raise UnsafePickleError(f"{path} is not a model file that torch.load reads "
                                    f"safely (not the zip archive torch.save writes: {exc})"
                                    ) from None
        if declared > max_bytes:
            raise UnsafePickleError(f"{path}: its records declare {declared:,} bytes once "
                                    f"inflated, over the limit of {max_bytes:,}")
        f.seek(0)
        return torch.load(f, map_location=map_location, weights_only=True)
