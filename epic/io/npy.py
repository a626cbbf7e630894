"""Arrays from ``.npz`` files that strangers made: shape and dtype come from each array's
header, so a size can be refused before its data is read (a few MB of zeros compress a
header's worth of gigabytes), and object arrays are never unpickled."""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterable
from typing import IO

import numpy as np

__all__ = ["array_header", "array_headers", "read_array"]


def array_header(zf: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """``(shape, dtype)`` of array ``key`` of an open ``.npz``, read from its header only.

    Raises:
        ValueError: an unsupported ``.npy`` version or an array of Python objects.
    """
    with zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"{key}: unsupported .npy version {version}")
        shape, _, dtype = read_header(f)
    if dtype.hasobject:
        raise ValueError(f"{key} holds Python objects, which are not read")
    return tuple(int(s) for s in shape), dtype


def array_headers(zf: zipfile.ZipFile, keys: Iterable[str], max_bytes: int
                  ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """:func:`array_header` of each of ``keys`` that the ``.npz`` holds, after checking that
    all of them together declare at most ``max_bytes`` (every array counts: a file of
    zero-byte images can still declare gigabytes of labels).

    Raises:
        ValueError: over ``max_bytes``, or as :func:`array_header`.
    """
    names = set(zf.namelist())
    headers = {k: array_header(zf, k) for k in keys if f"{k}.npy" in names}
    total = sum(math.prod(shape) * dtype.itemsize for shape, dtype in headers.values())
    if total > max_bytes:
        sizes = ", ".join(f"{k} {shape}" for k, (shape, _) in headers.items())
        raise ValueError(f"its arrays ({sizes}) declare {total:,} bytes, over the limit of "
                         f"{max_bytes:,} bytes")
    return headers


def read_array(zf: zipfile.ZipFile, key: str) -> np.ndarray:
    """Array ``key`` of an open ``.npz`` (never unpickling); check :func:`array_header` first."""
    f: IO[bytes]
    with zf.open(f"{key}.npy") as f:
        return np.lib.format.read_array(f, allow_pickle=False)
