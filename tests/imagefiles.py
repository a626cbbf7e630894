"""Image files for the tests of epic.images and epic.scan: seeded, tiny, written to tmp_path."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"blue": 2, "green": 1, "red": 0}
PLANTED = {"blue/planted.png", "green/planted.png", "red/planted.png"}


def save(path: Path, array: np.ndarray, fmt: str | None = None) -> Path:
    """Write uint8 ``(H, W)`` or ``(H, W, 3)`` ``array`` to ``path`` (folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, fmt)
    return path


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` RGB pixels but holds almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def coloured(rng: np.random.Generator, channel: int, size: int = 8) -> np.ndarray:
    """A noisy ``size x size`` RGB image whose ``channel`` is bright."""
    a = rng.integers(0, 90, (size, size, 3))
    a[..., channel] += 150
    return a.astype(np.uint8)


def planted_folder(root: Path) -> Path:
    """Three colour classes of 30 noisy 8x8 PNGs each, plus in each class one image of another
    colour (``<class>/planted.png``, listed in :data:`PLANTED`): a distinctive mislabelled
    example per class, each alone in its class's gradient space."""
    rng = np.random.default_rng(0)
    for name, channel in COLOURS.items():
        for i in range(30):
            save(root / name / f"{i:02d}.png", coloured(rng, channel))
    for name, other in {"red": 2, "green": 0, "blue": 1}.items():
        save(root / name / "planted.png", coloured(rng, other))
    return root


GROUP = {f"red/group-{i:02d}.png" for i in range(12)}


def planted_group_folder(root: Path) -> Path:
    """Three colour classes of 30 noisy 8x8 PNGs each, plus in the red class 12 green images
    stamped with one white 2x2 square (:data:`GROUP`): poisons of one source class with one
    trigger, relabelled; a group that keeps together rather than an isolated example."""
    rng = np.random.default_rng(1)
    for name, channel in COLOURS.items():
        for i in range(30):
            save(root / name / f"{i:02d}.png", coloured(rng, channel))
    for name in sorted(GROUP):
        image = coloured(rng, COLOURS["green"])
        image[:2, :2] = 255
        save(root / name, image)
    return root


def planted_group_and_singles_folder(root: Path) -> Path:
    """:func:`planted_group_folder` plus, in each class, one image of another colour
    (``<class>/planted.png``, :data:`PLANTED`): a group and isolated examples in one set."""
    planted_group_folder(root)
    rng = np.random.default_rng(2)
    for name, other in {"red": 2, "green": 0, "blue": 1}.items():
        save(root / name / "planted.png", coloured(rng, other))
    return root
