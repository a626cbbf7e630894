"""Writing files so that a crash never leaves half a file and a planted link is never followed;
opening strangers' files so that a FIFO, a device or an oversized file is refused before a
byte is read; reading JSON from strangers so that any failure is a ValueError naming the file."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from epic.errors import EpicError

__all__ = ["MAX_JSON_BYTES", "MAX_UNTRUSTED_BYTES", "UntrustedFileError", "open_untrusted",
           "read_json", "read_untrusted", "replace_atomically", "temporary_beside",
           "write_atomically"]

MAX_UNTRUSTED_BYTES = 2 << 30
"""Default largest stranger's file opened, in bytes (2 GiB; CIFAR-100's archive is 161 MB)."""

MAX_JSON_BYTES = 64 << 20
"""Largest JSON document read from a stranger (64 MiB)."""


class UntrustedFileError(EpicError):
    """A stranger's file refused before reading: not a regular file (a FIFO, a device, a
    folder), or over the size limit. The message is ``"<path>: <reason>"``."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path, self.reason = os.fspath(path), reason


def open_untrusted(path: str | os.PathLike[str], *, max_bytes: int = MAX_UNTRUSTED_BYTES
                   ) -> IO[bytes]:
    """``path`` opened for reading in binary, after checking what it is.

    The one opener for files that come from strangers. A link is followed, but what it leads
    to must be a regular file of at most ``max_bytes`` bytes: the type is read from the open
    file (``fstat``), so a FIFO does not block the open and a link swapped after the check
    cannot lead elsewhere, and a device such as ``/dev/zero`` is never read.

    Raises:
        UntrustedFileError: not a regular file, or over ``max_bytes``.
        OSError: as ``open`` raises it (FileNotFoundError for a missing file).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
                 | getattr(os, "O_BINARY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedFileError(path, f"not a regular file ({_file_kind(st.st_mode)})")
        if st.st_size > max_bytes:
            raise UntrustedFileError(path, f"{st.st_size:,} bytes, over the limit of "
                                           f"{max_bytes:,}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    f.raw.name = os.fspath(path)  # type: ignore[attr-defined]  # what error messages name
    return f


def read_untrusted(path: str | os.PathLike[str], *, max_bytes: int = MAX_UNTRUSTED_BYTES
                   ) -> bytes:
    """The bytes of a stranger's file, opened by :func:`open_untrusted`; at most
    ``max_bytes`` are read even if the file grows after the check."""
    with open_untrusted(path, max_bytes=max_bytes) as f:
        expected = os.fstat(f.fileno()).st_size
        data = f.read(expected + 1)  # one byte more: a file that grew is not cut short
        if len(data) > expected:
            data += f.read(max_bytes + 1 - len(data))
    if len(data) > max_bytes:
        raise UntrustedFileError(path, f"grew over the limit of {max_bytes:,} bytes")
    return data


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"


@contextmanager
def temporary_beside(path: str | os.PathLike[str]) -> Iterator[tuple[IO[bytes], Path]]:
    """A new temporary file in ``path``'s folder, opened for writing: ``(file, its path)``.

    The name is random and the file is created exclusively (``O_EXCL``), so a link planted at
    a predictable name is never followed; on an error inside the block the file is removed.
    The file gets the permissions ``open`` would give a new file (0666 less the umask), not
    ``mkstemp``'s owner-only ones, so a result renamed into place reads like any other file.
    """
    target = Path(path)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.chmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            yield f, Path(name)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: set it straight back
    os.umask(mask)
    return mask


def replace_atomically(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]
                       ) -> None:
    """Write ``path`` through ``write(file)`` into a fresh temporary file, then rename it over
    ``path``: readers see the old file or the new one, never a torn one."""
    with temporary_beside(path) as (f, tmp):
        write(f)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomically(path: str | os.PathLike[str], content: str | bytes) -> None:
    """``content`` (text as UTF-8) as the new file ``path``, by :func:`replace_atomically`:
    a link planted at ``path`` is replaced, never written through."""
    data = content.encode() if isinstance(content, str) else content
    replace_atomically(path, lambda f: f.write(data))


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON document in ``path``, opened by :func:`open_untrusted` (at most
    :data:`MAX_JSON_BYTES`); a ValueError naming the file if it is not one (also for nesting
    too deep to decode, or bytes that are not UTF-8). OSError as ``open`` raises it."""
    data = read_untrusted(path, max_bytes=MAX_JSON_BYTES)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise ValueError(f"{path}: not readable JSON ({type(exc).__name__}: "
                         f"{str(exc)[:160]})") from None
