"""The HTML pages the library writes (the scan's and the benchmark report), one way.

A page is self-contained (its images are ``data:`` URIs) and carries a Content-Security-Policy
that loads nothing from elsewhere and runs no script but its own, so text taken from strangers'
files (file names, class names, a store's fields) can at worst show as text. It is written
atomically, replacing any link planted at its name.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re

from epic.io.files import replace_atomically

__all__ = ["encode_text", "write_page"]


def encode_text(text: str) -> bytes:
    """UTF-8; a file name's undecodable bytes (surrogate escapes) are written as ``\\xNN``."""
    return _SURROGATE_ESCAPE.sub(lambda m: f"\\x{ord(m.group()) - 0xDC00:02x}", text).encode(
        "utf-8", "backslashreplace")


_SURROGATE_ESCAPE = re.compile("[\udc80-\udcff]")


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


def write_page(path: str | os.PathLike[str], title: str, body: str, *, style: str,
               script: str | None = None) -> None:
    """Write ``<!doctype html>`` with ``title`` (HTML-escaped by the caller), ``style``,
    ``body`` and ``script`` (at the end of the body) to ``path``. The policy allows
    ``data:`` images, this ``style`` and this ``script`` (by their hashes), nothing else."""
    csp = f"default-src 'none'; img-src data:; style-src {_csp_hash(style)}"
    if script is not None:
        csp += f"; script-src {_csp_hash(script)}"
    tail = "" if script is None else f"<script>{script}</script>\n"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<title>{title}</title>
<style>{style}</style></head>
<body>
{body}
{tail}</body></html>
"""
    replace_atomically(path, lambda f: f.write(encode_text(page)))
