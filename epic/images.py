"""Reading image sets that come from strangers: a folder of image files, or an ``.npz``.

A folder holds one sub-folder per class (class names: the sorted sub-folder names, labels
their positions), with image files at any depth below it, as torchvision's ``ImageFolder``
expects (folders nested over :data:`MAX_DEPTH` deep are skipped). Every file is checked
before it is decoded: it must be a regular file (links are not followed), not empty, at
most ``max_file_bytes`` long, one of :data:`FORMATS` (only those decoders of Pillow are
tried), and its header may declare at most ``max_pixels`` pixels (a decompression bomb is
refused before any pixel is decoded; Pillow's own ``DecompressionBombWarning`` and
``DecompressionBombError`` become a skip too). The work of decoding is bounded too: a
progressive JPEG decodes every scan over the whole image, so its scans times its pixels may
be at most :data:`MAX_SCAN_PIXELS` (a few bytes repeat a scan). A file that fails a check
or does not decode is skipped with a warning naming it and the reason, and is listed in
:attr:`ImageFolder.skipped`; only a folder without two classes of readable images is an
error.

An ``.npz`` holds ``images`` (uint8 ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)``, C 1
or 3), ``labels`` (integers ``(N,)``) and optionally ``classes`` (strings ``(K,)``); shapes
and types are read from the array headers and checked before anything is allocated, and
nothing is unpickled.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from epic.data import ImageData
from epic.errors import EpicError
from epic.io.files import UntrustedFileError, open_untrusted, read_untrusted
from epic.io.npy import array_headers, read_array

__all__ = ["FORMATS", "MAX_DEPTH", "MAX_FILE_BYTES", "MAX_PIXELS", "MAX_SCAN_PIXELS",
           "MAX_TOTAL_BYTES", "ImageFolder", "Skipped", "read_image_folder", "read_npz"]

log = logging.getLogger(__name__)

FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
"""The image formats read (Pillow's names); files in any other format are skipped."""

MAX_FILE_BYTES = 20 * 2**20
"""Default largest image file read, in bytes (20 MiB)."""

MAX_PIXELS = 40_000_000
"""Default largest image read, in pixels as its header declares them (e.g. 8000 x 5000)."""

MAX_SCAN_PIXELS = 20 * MAX_PIXELS
"""Largest decoding work accepted for one JPEG, in scans times pixels (the scan markers in
the file, so an embedded thumbnail counts too): a progressive JPEG has about 10 scans; one
that repeats a scan 3,000 times costs minutes. At about 2 ns per pixel and scan, decoding
one image is bounded to about 2 s."""

MAX_TOTAL_BYTES = 2**30
"""Default largest set held in memory, uint8 ``N * C * H * W`` bytes (1 GiB)."""

_WIDE_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L")  # 16-bit grayscale PNGs open as these
_GRAY_MODES = ("1", "L", "LA", "F", *_WIDE_GRAY_MODES)


@dataclass(frozen=True)
class Skipped:
    """A file that was not read: its path relative to the folder, and why."""

    file: str
    reason: str


@dataclass(frozen=True)
class ImageFolder:
    """What :func:`read_image_folder` read.

    Attributes:
        data: the images, uint8 ``(N, C, H, W)``, and labels ``(N,)``, classes in sorted
            sub-folder order.
        files: ``(N,)`` paths relative to the folder (``/``-separated), in dataset order:
            ``files[i]`` is the file of ``data.images[i]``.
        skipped: the files not read, in path order.
    """

    data: ImageData
    files: tuple[str, ...]
    skipped: tuple[Skipped, ...]


class _Unreadable(Exception):
    """A file the reader skips; the message is the reason."""


@dataclass(frozen=True)
class _Limits:
    max_file_bytes: int
    max_pixels: int
    formats: tuple[str, ...]


class _Header(NamedTuple):
    name: str
    path: Path
    label: int
    size: tuple[int, int]
    mode: str


def _walk(rootp: Path) -> tuple[list[str], list[tuple[str, Path, int]], list[Skipped]]:
    """The class sub-folders of ``rootp`` in name order, the files under them as (name
    relative to ``rootp``, path, label), and what was passed over (files outside a class
    sub-folder, folders nested too deep)."""
    class_dirs: list[str] = []
    candidates: list[tuple[str, Path, int]] = []
    skipped: list[Skipped] = []
    for entry in sorted(os.scandir(rootp), key=lambda e: e.name):
        if entry.is_dir(follow_symlinks=False):
            label = len(class_dirs)
            class_dirs.append(entry.name)
            found, too_deep = _entries(Path(entry.path))
            candidates += [(_relative(p, rootp), p, label) for p in found]
            skipped += [Skipped(_relative(p, rootp), reason) for p, reason in too_deep]
        else:
            skipped.append(Skipped(entry.name, "not in a class sub-folder"))
    return class_dirs, candidates, skipped


def _read_headers(candidates: Sequence[tuple[str, Path, int]], limits: _Limits,
                  skipped: list[Skipped]) -> list[_Header]:
    """The headers of the files that open within ``limits``; the others join ``skipped``."""
    headers: list[_Header] = []
    for name, path, label in candidates:
        try:
            with _open(path, limits) as img:
                headers.append(_Header(name, path, label, img.size, img.mode))
        except _Unreadable as exc:
            skipped.append(Skipped(name, str(exc)))
    return headers


def _target_size(image_size: int | tuple[int, int] | None,
                 headers: Sequence[_Header]) -> tuple[int, int]:
    """(height, width) to resize to: ``image_size``, or the most common size of ``headers``
    (the first in path order on a tie)."""
    if image_size is None:
        width, height = Counter(h.size for h in headers).most_common(1)[0][0]
    elif isinstance(image_size, int):
        height = width = image_size
    else:
        height, width = image_size
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be positive, got {height} x {width}")
    return height, width


def read_image_folder(
    root: str | os.PathLike[str],
    *,
    image_size: int | tuple[int, int] | None = None,
    max_file_bytes: int = MAX_FILE_BYTES,
    max_pixels: int = MAX_PIXELS,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    formats: Sequence[str] = FORMATS,
) -> ImageFolder:
    """Read ``root/<class>/**/<image>`` into memory, skipping files that fail the checks.

    Images are converted to RGB, or to grayscale (L) when every image is grayscale, and
    resized (bilinear) to ``image_size``: ``S`` for ``S x S`` or ``(height, width)``; by
    default the most common size among the files (the first in path order on a tie).

    Args:
        root: the folder; each sub-folder is a class, files directly in it are skipped.
        max_file_bytes, max_pixels: per-file limits (see the module docs).
        max_total_bytes: the largest ``N * C * H * W`` accepted, checked before allocating.
        formats: Pillow format names to accept, a subset of :data:`FORMATS`.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: ``root`` is not a folder, has fewer than two class sub-folders holding a
            readable image, or its images would need more than ``max_total_bytes``.

    Example:
        >>> folder = read_image_folder("photos/", image_size=32)  # doctest: +SKIP
        >>> folder.data.images.shape, folder.files[0], folder.skipped
        (torch.Size([600, 3, 32, 32]), 'cat/0001.jpg', ())
    """
    rootp = Path(root)
    class_dirs, candidates, skipped = _classes_of(rootp, formats)
    limits = _Limits(max_file_bytes, max_pixels, tuple(formats))
    headers = _read_headers(candidates, limits, skipped)
    if not headers:
        raise ValueError(f"{rootp} holds no readable image ({len(skipped)} files skipped"
                         + (f"; first: {skipped[0].file}: {skipped[0].reason})" if skipped
                            else ")"))
    height, width = _target_size(image_size, headers)
    mode = "L" if all(h.mode in _GRAY_MODES for h in headers) else "RGB"
    channels = 1 if mode == "L" else 3
    need = len(headers) * channels * height * width
    if need > max_total_bytes:
        raise EpicError(f"{rootp}: {len(headers):,} images of {width} x {height} {mode} need "
                        f"{need:,} bytes in memory, over the limit of {max_total_bytes:,}; "
                        f"choose a smaller image_size", options=("image_size",))
    images, read = _decode_all(headers, mode, channels, (width, height), limits, skipped)
    skipped.sort(key=lambda s: s.file)
    for s in skipped:
        log.warning("skipped %s: %s", s.file, s.reason)
    labels = np.array([headers[i].label for i in read], dtype=np.int64)
    present = np.unique(labels)
    if len(present) < 2:
        raise ValueError(f"{rootp} has readable images in {len(present)} class sub-folder"
                         f"{'' if len(present) == 1 else 's'}; a scan needs two or more")
    data = ImageData.from_arrays(images[:len(read)], labels, tuple(class_dirs))
    return ImageFolder(data, tuple(headers[i].name for i in read), tuple(skipped))


def _classes_of(rootp: Path, formats: Sequence[str]
                ) -> tuple[list[str], list[tuple[str, Path, int]], list[Skipped]]:
    """:func:`_walk` of ``rootp`` after checking it and ``formats``; two classes or more."""
    if not rootp.exists():
        raise FileNotFoundError(f"{rootp} does not exist")
    if not rootp.is_dir():
        raise ValueError(f"{rootp} is not a folder")
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"formats must be among {', '.join(FORMATS)}, got {sorted(unknown)}")
    class_dirs, candidates, skipped = _walk(rootp)
    if len(class_dirs) < 2:
        raise ValueError(f"{rootp} has {len(class_dirs)} class sub-folder"
                         f"{'' if len(class_dirs) == 1 else 's'}; a scan needs two or more "
                         f"({rootp}/<class>/<image>)")
    return class_dirs, candidates, skipped


def _decode_all(headers: Sequence[_Header], mode: str, channels: int, size: tuple[int, int],
                limits: _Limits, skipped: list[Skipped]) -> tuple[np.ndarray, list[int]]:
    """Every image of ``headers`` decoded to ``mode`` (``channels`` of them) at ``size``
    (width, height), stacked; and the positions of those that decoded (the others are added to
    ``skipped``)."""
    images = np.empty((len(headers), channels, size[1], size[0]), dtype=np.uint8)
    read: list[int] = []
    for i, h in enumerate(headers):
        try:
            images[len(read)] = _decode(h.path, mode, size, limits)
            read.append(i)
        except _Unreadable as exc:
            skipped.append(Skipped(h.name, str(exc)))
    return images, read


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


MAX_DEPTH = 32
"""Folders nested deeper than this below a class folder are skipped, not read."""


def _entries(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Every entry below ``folder`` that is not a real folder (links are listed, never
    followed), in path order; and the folders not read, with why (nested over
    :data:`MAX_DEPTH` deep, or unreadable)."""
    found: list[Path] = []
    unread: list[tuple[Path, str]] = []
    stack = [(folder, 0)]
    while stack:
        base, depth = stack.pop()
        try:
            with os.scandir(base) as it:
                entries = list(it)
        except OSError as exc:
            unread.append((base, f"a folder that cannot be listed ({exc.strerror or exc})"))
            continue
        for e in entries:
            path = Path(e.path)
            if not e.is_dir(follow_symlinks=False):
                found.append(path)
            elif depth == MAX_DEPTH:
                unread.append((path, f"a folder nested over {MAX_DEPTH} deep: not read"))
            else:
                stack.append((path, depth + 1))
    return sorted(found, key=lambda p: p.as_posix()), unread


@contextmanager
def _open(path: Path, limits: _Limits) -> Iterator[Image.Image]:
    """Pillow's lazy image of ``path`` (only the header read), after the file checks.

    Raises:
        _Unreadable: the reason the file is skipped.
    """
    if path.is_symlink():
        raise _Unreadable("a symbolic link (links are not followed)")
    try:
        data = read_untrusted(path, max_bytes=limits.max_file_bytes)
    except UntrustedFileError as exc:
        raise _Unreadable(exc.reason) from exc
    except OSError as exc:
        raise _Unreadable(f"cannot be read ({exc.strerror or exc})") from exc
    if not data:
        raise _Unreadable("an empty file")
    formats = limits.formats
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=formats)
    except UnidentifiedImageError as exc:
        raise _Unreadable(f"not a {', '.join(formats[:-1])} or {formats[-1]} image") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _Unreadable(f"refused as a decompression bomb ({exc})") from exc
    except Exception as exc:  # Pillow's header parsers raise many types on malformed input
        raise _Unreadable(f"corrupt or truncated header ({type(exc).__name__}: {exc})") from exc
    with img:
        width, height = img.size
        if width * height > limits.max_pixels:
            raise _Unreadable(f"{width} x {height} = {width * height:,} pixels, over the limit "
                              f"of {limits.max_pixels:,}")
        if width < 1 or height < 1:
            raise _Unreadable(f"{width} x {height} pixels")
        if img.format == "JPEG":
            scans = data.count(b"\xff\xda")  # a start-of-scan marker: never in coded data
            if scans * width * height > MAX_SCAN_PIXELS:
                raise _Unreadable(f"{scans:,} JPEG scans of {width} x {height} pixels, over "
                                  f"the limit of {MAX_SCAN_PIXELS:,} scans x pixels")
        yield img


def _decode(path: Path, mode: str, size: tuple[int, int], limits: _Limits) -> np.ndarray:
    """The image at ``path`` as uint8 ``(C, H, W)``, converted to ``mode`` and resized to
    ``size`` (width, height).

    Raises:
        _Unreadable: a check failed, or the pixel data is truncated or corrupt.
    """
    with _open(path, limits) as img:
        try:
            img.load()
            pixels = _eight_bit(img).convert(mode)
            if pixels.size != size:
                pixels = pixels.resize(size, Image.Resampling.BILINEAR)
            array = np.asarray(pixels, dtype=np.uint8)
        except Exception as exc:  # Pillow's decoders raise many types on corrupt data
            raise _Unreadable(f"corrupt or truncated pixel data ({type(exc).__name__}: "
                              f"{exc})") from exc
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _eight_bit(img: Image.Image) -> Image.Image:
    """``img``, with 16-bit grayscale scaled to 8 bits (Pillow's conversion would clip
    every value over 255 to white)."""
    if img.mode not in _WIDE_GRAY_MODES:
        return img
    wide = np.asarray(img).astype(np.float64)
    return Image.fromarray(np.clip(np.round(wide / 257), 0, 255).astype(np.uint8), "L")


# ----------------------------------------------------------------------------- npz


def _npz_arrays(zf: zipfile.ZipFile, max_total_bytes: int
                ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    """``images``, ``labels`` (int64) and ``classes`` (None when absent) of an open
    ``.npz``, each checked from its header before it is read (see :func:`read_npz`)."""
    headers = array_headers(zf, ("images", "labels", "classes"), max_total_bytes)
    missing = [k for k in ("images", "labels") if k not in headers]
    if missing:
        raise ValueError(f"lacks {' and '.join(missing)}")
    shape, dtype = headers["images"]
    if dtype != np.uint8 or len(shape) not in (3, 4) or 0 in shape[1:]:
        raise ValueError(f"images must be uint8 (N, H, W[, C]) or (N, C, H, W) "
                         f"with at least one pixel, got {dtype} {shape}")
    n = shape[0]
    lshape, ldtype = headers["labels"]
    if lshape != (n,) or ldtype.kind not in "iu":
        raise ValueError(f"labels must be integers ({n},), got {ldtype} {lshape}")
    classes = None
    if "classes" in headers:
        cshape, cdtype = headers["classes"]
        if (len(cshape) != 1 or cdtype.kind != "U" or cshape[0] > n
                or cdtype.itemsize > 4 * 1024):
            raise ValueError(f"classes must be at most {n} strings (K,) of at most "
                             f"1024 characters, got {cdtype} {cshape}")
        classes = tuple(str(c) for c in read_array(zf, "classes"))
    images = read_array(zf, "images")
    labels = read_array(zf, "labels").astype(np.int64)
    return images, labels, classes


def read_npz(path: str | os.PathLike[str], *, max_total_bytes: int = MAX_TOTAL_BYTES
             ) -> ImageData:
    """An image set from an ``.npz`` of ``images``, ``labels`` and optional ``classes``.

    ``images`` is uint8 ``(N, H, W)`` (grayscale), ``(N, H, W, C)`` or ``(N, C, H, W)`` with C
    1 or 3 (channels last when the last axis is 1 or 3); ``labels`` integers ``(N,)`` in
    ``0..K-1``; ``classes`` strings ``(K,)``, by default ``"0".."K-1"`` with K the largest
    label + 1 (at most N). Shapes, types and the size (at most ``max_total_bytes``) are
    checked from the array headers before any array is read; pickled objects are refused.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a regular file, not an ``.npz``, a missing or malformed array, arrays
            (all of them together) over ``max_total_bytes``, or a set under two classes; the
            message names the file.

    Example:
        >>> data = read_npz("poisoned.npz")  # doctest: +SKIP
        >>> data.images.shape
        torch.Size([5000, 3, 32, 32])
    """
    p = Path(path)
    with open_untrusted(p, max_bytes=max_total_bytes) as f:
        if not zipfile.is_zipfile(f):
            raise ValueError(f"{p} is not an .npz (zip) file")
        f.seek(0)
        try:
            with zipfile.ZipFile(f) as zf:
                images, labels, classes = _npz_arrays(zf, max_total_bytes)
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as exc:
            raise ValueError(f"{p}: {exc}") from exc
    n = len(labels)
    if images.ndim == 3:
        images = images[:, None]
    elif images.shape[3] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    elif images.shape[1] not in (1, 3):
        raise ValueError(f"{p}: images {images.shape} have neither 1 nor 3 channels first or "
                         f"last")
    k = len(classes) if classes is not None else int(labels.max(initial=-1)) + 1
    if n and (labels.min() < 0 or labels.max() >= min(k, n)):
        raise ValueError(f"{p}: labels must lie in 0..{min(k, n) - 1}")
    if len(np.unique(labels)) < 2:
        raise ValueError(f"{p}: the set holds {len(np.unique(labels))} classes; a scan needs "
                         f"two or more")
    return ImageData.from_arrays(np.ascontiguousarray(images), labels, classes)
