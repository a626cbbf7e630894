"""The data sets known by name: scikit-learn's digits (the embedded default), CIFAR-10 and
CIFAR-100 from the standard python folders or their ``.tar.gz`` (read through a restricted
unpickler), with an optional checksum-verified download.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from epic.data.imagedata import Augment, ImageData
from epic.errors import EpicError
from epic.io.files import open_untrusted, temporary_beside
from epic.io.safe_pickle import MAX_ARRAY_BYTES, safe_load

__all__ = ["DATASETS", "Cifar", "DataNotFoundError", "download_cifar", "load_cifar", "load_dataset",
           "load_digits"]

log = logging.getLogger("epic.data")

Cifar = Literal["cifar10", "cifar100"]
DATASETS = ("digits", *get_args(Cifar))


# ----------------------------------------------------------------------------- digits


def load_digits(*, test_fraction: float = 0.25, seed: int = 0) -> tuple[ImageData, ImageData]:
    """scikit-learn's 8x8 handwritten digits (1,797 images), split into train and test.

    The split is stratified and fixed by ``seed``. Pixels (0..16) are scaled to uint8.
    """
    from sklearn.datasets import load_digits as _sk_digits

    bunch = _sk_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test_idx: list[int] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rng.shuffle(members)
        test_idx.extend(members[: int(round(test_fraction * len(members)))].tolist())
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test_idx] = True
    classes = tuple(str(c) for c in range(10))
    aug = Augment(crop_padding=1, flip=False)
    train = ImageData.from_arrays(images[~is_test], labels[~is_test], classes, augment=aug)
    test = ImageData.from_arrays(images[is_test], labels[is_test], classes).with_stats_of(train)
    return train, test


# ----------------------------------------------------------------------------- CIFAR


class DataNotFoundError(EpicError, FileNotFoundError):
    """A data set is not where it was looked for, and downloading it was not asked for."""


@dataclass(frozen=True)
class _CifarSpec:
    folder: str
    archive: str
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str


_CIFAR = {
    "cifar10": _CifarSpec(
        "cifar-10-batches-py", "cifar-10-python.tar.gz",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta",
        "labels", "label_names"),
    "cifar100": _CifarSpec(
        "cifar-100-python", "cifar-100-python.tar.gz",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        ("train",), ("test",), "meta", "fine_labels", "fine_label_names"),
}

# The published archives hold 9 (CIFAR-10) and 5 (CIFAR-100) members.
_MAX_ARCHIVE_MEMBERS = 64

# Statistics of the CIFAR training sets, as commonly published; used so that a subset trains
# with the same normalization as the full set.
_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _md5(path: Path) -> str:
    with open_untrusted(path) as f:
        return _md5_of(f)


def _md5_of(f: IO[bytes]) -> str:
    h = hashlib.md5()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def download_cifar(name: Cifar, root: str | os.PathLike[str]) -> Path:
    """Download the CIFAR archive into ``root`` and verify its MD5; returns the archive path.

    Raises:
        RuntimeError: offline, or the checksum does not match (the file is then removed).
    """
    spec = _CIFAR[name]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / spec.archive
    if path.exists() and _md5(path) == spec.md5:
        return path
    log.info("downloading %s to %s", spec.url, path)
    try:
        with temporary_beside(path) as (out, tmp), \
                urllib.request.urlopen(spec.url, timeout=60) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
    except (urllib.error.URLError, OSError) as exc:
        raise RuntimeError(
            f"could not download {spec.url} ({exc}). Without internet, fetch the archive on "
            f"another machine and place it, or its unpacked '{spec.folder}' folder, in {root}"
        ) from exc
    digest = _md5(tmp)
    if digest != spec.md5:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"checksum mismatch for {spec.url}: got {digest}, want {spec.md5}")
    tmp.replace(path)
    return path


def _locate_cifar(name: str, spec: _CifarSpec, root: Path) -> Path | None:
    """The python folder or archive under ``root``, ``root/<folder>`` or ``root/<name>/``."""
    for base in (root, root / name):
        for cand in (base, base / spec.folder):
            if cand.name == spec.folder and (cand / spec.meta_file).exists():
                return cand
        if (base / spec.archive).exists():
            return base / spec.archive
    return None


def _read_cifar_members(source: Path, spec: _CifarSpec) -> dict[str, dict[str, object]]:
    """Every batch and the meta file of a CIFAR folder or archive, checked (see
    :func:`_checked`)."""
    wanted = (*spec.train_files, *spec.test_files, spec.meta_file)
    out: dict[str, dict[str, object]] = {}
    if source.is_dir():
        for name in wanted:
            with open_untrusted(source / name, max_bytes=MAX_ARRAY_BYTES) as f:
                where = str(source / name)
                out[name] = _checked(safe_load(f, name=where), where, spec, name)
        return out
    with open_untrusted(source) as f:
        digest = _md5_of(f)
        if digest != spec.md5:
            raise EpicError(f"{source}: not the published {spec.archive} (MD5 {digest}, not "
                            f"{spec.md5}); delete it and set download, or put the unpacked "
                            f"'{spec.folder}' folder there instead", options=("download",))
        f.seek(0)
        with tarfile.open(fileobj=f, mode="r:gz") as tar:
            for count, member in enumerate(tar, 1):  # lazily: the members are never all listed
                if count > _MAX_ARCHIVE_MEMBERS:
                    raise ValueError(f"{source}: over {_MAX_ARCHIVE_MEMBERS} members")
                base = member.name.rsplit("/", 1)[-1]
                if base not in wanted or not member.isfile():
                    continue
                where = f"{source}:{member.name}"
                if member.size > MAX_ARRAY_BYTES:
                    raise ValueError(f"{where}: {member.size:,} bytes, over the limit of "
                                     f"{MAX_ARRAY_BYTES:,}")
                member_file = tar.extractfile(member)
                if member_file is None:
                    raise ValueError(f"{source}: cannot read {member.name}")
                out[base] = _checked(safe_load(member_file, name=where), where, spec, base)
    missing = set(wanted) - set(out)
    if missing:
        raise ValueError(f"{source} lacks {sorted(missing)}")
    return out


def _checked(obj: object, where: str, spec: _CifarSpec, name: str) -> dict[str, object]:
    """A batch (``data`` uint8 (N, 3072) and N integer labels) or the meta file (a list of
    class names), with str keys; a ValueError naming ``where`` and the field otherwise."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a dict, got {type(obj).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else str(k): v for k, v in obj.items()}
    if name == spec.meta_file:
        names = batch.get(spec.names_key)
        if not isinstance(names, list) or not all(isinstance(n, (str, bytes)) for n in names):
            raise ValueError(f"{where}: '{spec.names_key}' must be a list of class names")
        return batch
    data, labels = batch.get("data"), batch.get(spec.label_key)
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
            or data.shape[1] != 3072):
        got = (f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray)
               else type(data).__name__)
        raise ValueError(f"{where}: 'data' must be a uint8 (N, 3072) array, got {got}")
    if isinstance(labels, list) and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels):
        labels = np.array(labels, dtype=np.int64)
    if (not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu"
            or labels.shape != (len(data),)):
        raise ValueError(f"{where}: '{spec.label_key}' must be {len(data)} integer labels")
    batch[spec.label_key] = labels
    return batch


def _stack(batches: list[dict[str, object]], label_key: str) -> tuple[Tensor, Tensor]:
    images = [np.asarray(b["data"]).reshape(-1, 3, 32, 32) for b in batches]
    labels = [np.asarray(b[label_key], dtype=np.int64) for b in batches]
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def load_cifar(
    name: Cifar, root: str | os.PathLike[str], *, download: bool = False
) -> tuple[ImageData, ImageData]:
    """Read CIFAR-10/100 from ``root``: the python folder, a parent of it, or the ``.tar.gz``.

    The batches are unpickled with :func:`epic.io.safe_pickle.safe_load`: a file that asks to run
    code raises :class:`~epic.io.safe_pickle.UnsafePickleError` and nothing is executed.

    Example:
        >>> train, test = load_cifar("cifar10", "data/")  # doctest: +SKIP
    """
    spec = _CIFAR[name]
    rootp = Path(root)
    source = _locate_cifar(name, spec, rootp)
    if source is None:
        if not download:
            raise DataNotFoundError(
                f"no {spec.folder} folder or {spec.archive} under {rootp}; set download to "
                f"fetch it from {spec.url}", options=("download",))
        source = download_cifar(name, rootp)
    batches = _read_cifar_members(source, spec)
    meta = batches[spec.meta_file]
    classes = tuple(n.decode() if isinstance(n, bytes) else n
                    for n in meta[spec.names_key])  # type: ignore[attr-defined]
    mean, std = _CIFAR_STATS[name]
    train_x, train_y = _stack([batches[f] for f in spec.train_files], spec.label_key)
    test_x, test_y = _stack([batches[f] for f in spec.test_files], spec.label_key)
    return (ImageData(train_x, train_y, classes, mean, std),
            ImageData(test_x, test_y, classes, mean, std))


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None, *,
                 download: bool = False) -> tuple[ImageData, ImageData]:
    """``(train, test)`` for a dataset name in :data:`DATASETS`.

    ``data_dir`` defaults to ``$EPIC_DATA_DIR`` (not needed for ``digits``).
    """
    if name == "digits":
        return load_digits()
    if name in _CIFAR:
        root = data_dir if data_dir is not None else os.environ.get("EPIC_DATA_DIR")
        if root is None:
            raise EpicError(f"{name} needs a data_dir (or EPIC_DATA_DIR)",
                            options=("data_dir",))
        return load_cifar(name, root, download=download)  # type: ignore[arg-type]
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
