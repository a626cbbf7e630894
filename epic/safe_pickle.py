"""Restricted unpickling for files that come from strangers.

Pickle runs whatever callable a file names. Data files in this field (CIFAR batches, poison sets
exchanged between labs) only ever need numpy arrays, numbers, strings and containers, so the
unpickler here admits exactly the globals those need and refuses everything else before anything
is called.
"""

from __future__ import annotations

import io
import math
import pickle
from typing import IO, Any

import numpy as np

__all__ = ["MAX_ARRAY_BYTES", "UnsafePickleError", "safe_load", "safe_loads"]

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


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle asked for a global outside the allowlist, or is not a readable pickle; nothing
    from it was executed. The message names the file when the reader knows it."""


#: Largest array an untrusted pickle may make numpy allocate (a few bytes of pickle can ask
#: for any shape); CIFAR-100's training batch is 150 MB.
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


def _check_no_objects(obj: Any) -> None:
    """Walk what was unpickled once per object (shared references are not re-walked: a small
    file of nested shared lists must not cost exponential time) and check every array."""
    seen: set[int] = set()
    stack = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > 64:
            raise UnsafePickleError("pickle nests containers too deeply")
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, (np.ndarray, np.generic)):
            _check_dtype(item.dtype)
        elif isinstance(item, np.dtype):
            _check_dtype(item)
        elif isinstance(item, dict):
            stack.extend((v, depth + 1) for pair in item.items() for v in pair)
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend((v, depth + 1) for v in item)


def safe_load(file: IO[bytes], *, extra: dict[tuple[str, str], Any] | None = None,
              name: str | None = None, max_array_bytes: int = MAX_ARRAY_BYTES) -> Any:
    """Unpickle ``file`` admitting only numpy arrays, numbers, strings and containers.

    ``extra`` maps further ``(module, name)`` globals to the object to use in their place (for
    example a harmless stand-in class for ``PIL.Image.Image``). Text in Python 2 pickles is
    decoded as latin-1, as the CIFAR batches require.

    Raises:
        UnsafePickleError: the file names any other global (nothing it names is called),
            asks for an array over ``max_array_bytes``, or is truncated or no pickle at
            all; the message starts with ``name`` (default: the file object's own name, if
            it has one).

    Example:
        >>> import io, pickle
        >>> safe_load(io.BytesIO(pickle.dumps({"labels": [1, 2]})))
        {'labels': [1, 2]}
    """
    where = name or getattr(file, "name", None) or "pickle"
    try:
        obj = _RestrictedUnpickler(file, extra or {}, max_array_bytes).load()
        _check_no_objects(obj)
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
