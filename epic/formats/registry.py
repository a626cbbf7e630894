"""Poison-file formats by name: how ``--poisons`` reads any of them and ``--export`` writes them.

:data:`FORMATS` maps each name to a :class:`PoisonFormat`: how to recognize a path in that
format, read it into a validated :class:`~epic.poisons.PoisonSet`, and (optionally) write one.
:func:`read_poisons` tries the formats in registration order; adding a format is a
:func:`register_format` call in its own module (docs/attacks.md, "Adding a file format").
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from epic.data import ImageData
from epic.formats.benchmark import export_benchmark, import_benchmark
from epic.formats.metapoison import export_metapoison, import_metapoison
from epic.poisons import PoisonSet, PoisonSetError

__all__ = ["FORMATS", "PoisonFormat", "read_poisons", "register_format", "write_poisons"]


@dataclass(frozen=True)
class PoisonFormat:
    """A poison-file format.

    Attributes:
        name: what ``--export`` and ``read_poisons(format=...)`` call it.
        summary: one line for help texts.
        recognizes: whether a path (a folder or a file) is in this format, from its names
            alone (cheap; nothing is parsed).
        read: the path's set, validated against the clean training set it poisons; raises
            :class:`~epic.poisons.PoisonSetError` (or ``UnsafePickleError``) on bad content.
        write: writes a set to a path and returns what it wrote; None: read-only.
        export_name: the name ``epic craft --export`` gives its output in ``--out``.
        blends: whether it keeps a blended trigger's weight (``trigger_blend``); a format
            that does not would read one back as a patch pasted over the whole image, so
            :func:`write_poisons` refuses such a set.
    """

    name: str
    summary: str
    recognizes: Callable[[Path], bool]
    read: Callable[[Path, ImageData], PoisonSet]
    write: Callable[[PoisonSet, ImageData, Path], Path] | None = None
    export_name: str = ""
    blends: bool = False


FORMATS: dict[str, PoisonFormat] = {}


def register_format(fmt: PoisonFormat) -> PoisonFormat:
    """Make ``fmt`` readable by :func:`read_poisons` (and by ``--poisons``) and, if it
    writes, a choice of ``epic craft --export``; returns it."""
    if fmt.name in FORMATS:
        raise ValueError(f"poison format {fmt.name!r} is taken")
    FORMATS[fmt.name] = fmt
    return fmt


def read_poisons(path: str | os.PathLike[str], train: ImageData, *,
                 format: str | None = None) -> PoisonSet:
    """The poison set at ``path``, in ``format`` or in the first registered format that
    recognizes it, validated against ``train``.

    Raises:
        PoisonSetError: no format recognizes the path (the message lists them), or the
            format's reader refused the content.
    """
    where = Path(path)
    if format is not None:
        if format not in FORMATS:
            raise PoisonSetError(f"unknown poison format {format!r}; choose from "
                                 f"{', '.join(FORMATS)}")
        return FORMATS[format].read(where, train)
    for fmt in FORMATS.values():
        if fmt.recognizes(where):
            return fmt.read(where, train)
    known = "; ".join(f"{f.name}: {f.summary}" for f in FORMATS.values())
    raise PoisonSetError(f"{where} is not a poison set in any known format ({known})")


def write_poisons(poisons: PoisonSet, train: ImageData, path: str | os.PathLike[str],
                  format: str) -> Path:
    """Write ``poisons`` (a set on ``train``) to ``path`` in ``format``; returns what it
    wrote."""
    fmt = FORMATS.get(format)
    if fmt is None or fmt.write is None:
        writable = ", ".join(name for name, f in FORMATS.items() if f.write is not None)
        raise ValueError(f"cannot write poison format {format!r}; choose from {writable}")
    if poisons.trigger_blend is not None and not fmt.blends:
        raise PoisonSetError(f"the {format} format keeps a trigger as a patch to paste, not "
                             f"the weight of a blended one: it would read back as another "
                             f"attack; write this set as epic")
    return fmt.write(poisons, train, Path(path))


register_format(PoisonFormat(
    "epic", "a folder with poisons.json and poisons.npz (no pickle)",
    lambda p: (p / "poisons.json").is_file(),
    lambda p, train: PoisonSet.load(p, train),
    lambda poisons, _, p: poisons.save(p), blends=True))
register_format(PoisonFormat(
    "benchmark", "a folder with poisons.pickle and base_indices.pickle (Schwarzschild et al.)",
    lambda p: (p / "poisons.pickle").is_file() and (p / "base_indices.pickle").is_file(),
    lambda p, train: import_benchmark(p, train),
    lambda poisons, _, p: export_benchmark(poisons, p), "benchmark"))
register_format(PoisonFormat(
    "metapoison", "one .pickle with xtrain and ytrain (MetaPoison)",
    lambda p: p.is_file() and p.suffix in (".pickle", ".pkl"),
    lambda p, train: import_metapoison(p, train),
    lambda poisons, train, p: export_metapoison(poisons, train, p),
    "poisons_metapoison.pickle"))
