"""Arrays from ``.npz`` files that strangers made: shape and dtype come from each array's
header, so a size can be refused before its data is read (a few MB of zeros compress a
header's worth of gigabytes), and object arrays are never unpickled."""

from __future__ import annotations

import zipfile
from typing import IO

import numpy as np

__all__ = ["array_header", "read_array"]


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


def read_array(zf: zipfile.ZipFile, key: str) -> np.ndarray:
    """Array ``key`` of an open ``.npz`` (never unpickling); check :func:`array_header` first."""
    f: IO[bytes]
    with zf.open(f"{key}.npy") as f:
        return np.lib.format.read_array(f, allow_pickle=False)
