"""Writing files so that a crash never leaves half a file and a planted link is never followed;
reading JSON from strangers so that any failure is a ValueError naming the file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["read_json", "replace_atomically", "temporary_beside"]


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


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON document in ``path``; a ValueError naming the file if it is not one (also for
    nesting too deep to decode, or bytes that are not UTF-8). OSError as ``open`` raises it."""
    try:
        return json.loads(Path(path).read_bytes())
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise ValueError(f"{path}: not readable JSON ({type(exc).__name__}: "
                         f"{str(exc)[:160]})") from None
