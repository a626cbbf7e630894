"""Restricted unpickling for files that come from strangers.

Pickle runs whatever callable a file names. Data files in this field (CIFAR batches, poison sets
exchanged between labs) only ever need numpy arrays, numbers, strings and containers, so the
unpickler here admits exactly the globals those need and refuses everything else before anything
is called.
"""

from __future__ import annotations

import io
import pickle
from typing import IO, Any

import numpy as np

__all__ = ["UnsafePickleError", "safe_load", "safe_loads"]

# numpy moved its internals from numpy.core to numpy._core in 2.0; files from both eras exist.
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """What protocol-2 pickles written by Python 3 call to rebuild ``bytes``."""
    if not isinstance(text, str) or encoding.lower().replace("-", "") != "latin1":
        raise UnsafePickleError("only latin-1 text may be encoded to bytes in an untrusted pickle")
    return text.encode("latin1")


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global outside the allowlist; nothing from it was executed."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], extra: dict[tuple[str, str], Any]) -> None:
        super().__init__(file, encoding="latin1")
        self._extra = extra

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._extra:
            return self._extra[(module, name)]
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refusing to load {module}.{name}: this file may only contain arrays, numbers, "
            "strings and containers (it may be malicious or not the format expected)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing persistent ids in an untrusted pickle")


def _check_no_objects(obj: Any, depth: int = 0) -> None:
    if depth > 64:
        raise UnsafePickleError("pickle nests containers too deeply")
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        raise UnsafePickleError("object arrays are not admitted in untrusted pickles")
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_no_objects(key, depth + 1)
            _check_no_objects(value, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for item in obj:
            _check_no_objects(item, depth + 1)


def safe_load(file: IO[bytes], *, extra: dict[tuple[str, str], Any] | None = None) -> Any:
    """Unpickle ``file`` admitting only numpy arrays, numbers, strings and containers.

    ``extra`` maps further ``(module, name)`` globals to the object to use in their place (for
    example a harmless stand-in class for ``PIL.Image.Image``). Text in Python 2 pickles is
    decoded as latin-1, as the CIFAR batches require.

    Raises:
        UnsafePickleError: the file names any other global; nothing it names is called.

    Example:
        >>> import io, pickle
        >>> safe_load(io.BytesIO(pickle.dumps({"labels": [1, 2]})))
        {'labels': [1, 2]}
    """
    obj = _RestrictedUnpickler(file, extra or {}).load()
    _check_no_objects(obj)
    return obj


def safe_loads(data: bytes, *, extra: dict[tuple[str, str], Any] | None = None) -> Any:
    """:func:`safe_load` on bytes."""
    return safe_load(io.BytesIO(data), extra=extra)
