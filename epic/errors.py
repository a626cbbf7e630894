"""The library's error for input it refuses: :class:`EpicError`."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

__all__ = ["EpicError"]


class EpicError(ValueError):
    """Input the library refuses (a setting out of range, a file it will not read), said in
    the library's words. ``options`` names the parameters the message speaks of, so that a
    front end can spell them its own way: the command line says ``--data-dir`` where the
    library says ``data_dir`` (:meth:`worded`).

    Every error class of the library for refused input derives from it (and from
    ``ValueError``, as before): ``except epic.EpicError`` catches them all.
    """

    def __init__(self, message: str, *, options: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.options = tuple(options)

    def worded(self, spell: Callable[[str], str]) -> str:
        """The message with each of :attr:`options` spelled by ``spell`` (whole words only)."""
        text = str(self)
        for name in self.options:
            text = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", spell(name), text)
        return text
