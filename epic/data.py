"""Image datasets held in memory as uint8 tensors, batch augmentation on tensors, and readers.

Images stay uint8 ``(N, C, H, W)`` until a batch is drawn; a batch is float in ``[0, 1]``.
Per-channel normalization lives inside the models (see :mod:`epic.models`), so attacks and
defenses work in pixel space where an l-infinity budget of 8/255 means what it says.

Readers: scikit-learn's digits (the embedded default), CIFAR-10 and CIFAR-100 from the standard
python folders or their ``.tar.gz`` (read through a restricted unpickler), with an optional
checksum-verified download.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from epic.files import temporary_beside
from epic.safe_pickle import safe_load

__all__ = [
    "Augment",
    "ImageData",
    "augment_batch",
    "iterate_batches",
    "load_cifar",
    "load_dataset",
    "load_digits",
    "DATASETS",
]

log = logging.getLogger(__name__)

DATASETS = ("digits", "cifar10", "cifar100")


@dataclass(frozen=True)
class Augment:
    """Batch augmentation: random crop after reflect padding, then random horizontal flip."""

    crop_padding: int = 4
    flip: bool = True


@dataclass(frozen=True)
class ImageData:
    """An in-memory image classification set.

    Attributes:
        images: ``(N, C, H, W)`` uint8.
        labels: ``(N,)`` int64.
        classes: class names, ``labels`` index into it.
        mean, std: per-channel statistics of the training split in ``[0, 1]`` units.
        augment: the augmentation this dataset is usually trained with.
    """

    images: Tensor
    labels: Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Augment = Augment()

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be ({self.images.shape[0]},), got "
                             f"{tuple(self.labels.shape)}")
        if len(self.mean) != self.images.shape[1] or len(self.std) != self.images.shape[1]:
            raise ValueError("mean and std need one value per channel")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, indices: Tensor) -> ImageData:
        """The examples at ``indices`` (statistics unchanged)."""
        return replace(self, images=self.images[indices], labels=self.labels[indices])

    def select_classes(self, classes: Sequence[int]) -> ImageData:
        """The examples of ``classes`` only, relabelled ``0..len(classes)-1`` in that order.

        Builds disjoint-class tasks, e.g. a feature extractor trained on some classes and
        transferred to the others (statistics unchanged).
        """
        keep = [int(c) for c in classes]
        if len(set(keep)) != len(keep) or not all(0 <= c < self.num_classes for c in keep):
            raise ValueError(f"classes must be distinct labels in [0, {self.num_classes}), "
                             f"got {keep}")
        remap = torch.full((self.num_classes,), -1, dtype=torch.long, device=self.labels.device)
        remap[keep] = torch.arange(len(keep), device=self.labels.device)
        new = remap[self.labels]
        idx = (new >= 0).nonzero().squeeze(1)
        return replace(self, images=self.images[idx], labels=new[idx],
                       classes=tuple(self.classes[c] for c in keep))

    def to(self, device: torch.device | str) -> ImageData:
        return replace(self, images=self.images.to(device), labels=self.labels.to(device))

    @staticmethod
    def from_arrays(images: np.ndarray | Tensor, labels: np.ndarray | Tensor,
                    classes: tuple[str, ...] | None = None, *,
                    augment: Augment = Augment()) -> ImageData:
        """Build a training set from uint8 images ``(N, C, H, W)``; statistics from the images."""
        imgs = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images)
        labs = torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels)
        labs = labs.long()
        if classes is None:
            classes = tuple(str(c) for c in range(int(labs.max()) + 1))
        mean, std = _channel_stats(imgs)
        return ImageData(imgs, labs, classes, mean, std, augment)

    def with_stats_of(self, other: ImageData) -> ImageData:
        """This set with the normalization statistics (and augmentation) of ``other``."""
        return replace(self, mean=other.mean, std=other.std, augment=other.augment)


def _channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.double().div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    mean = tuple(float(v) for v in x.mean(1))
    std = tuple(max(float(v), 1e-3) for v in x.std(1))
    return mean, std


def augment_batch(x: Tensor, augment: Augment, *, generator: torch.Generator | None = None
                  ) -> Tensor:
    """Randomly crop (after reflect padding) and flip a float batch ``(B, C, H, W)``.

    Random numbers are drawn on the CPU from ``generator`` so that a seed gives the same
    augmentation on every device.

    Example:
        >>> x = torch.rand(8, 3, 32, 32)
        >>> augment_batch(x, Augment(), generator=torch.Generator().manual_seed(0)).shape
        torch.Size([8, 3, 32, 32])
    """
    b, _, h, w = x.shape
    p = augment.crop_padding
    if p > 0:
        padded = F.pad(x, (p, p, p, p), mode="reflect")
        oy = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(x.device)
        ox = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]
        batch = torch.arange(b, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    if augment.flip:
        flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x.contiguous()


def iterate_batches(
    data: ImageData,
    *,
    batch_size: int = 128,
    keep: Tensor | None = None,
    shuffle: bool = False,
    augment: Augment | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    shard: tuple[int, int] | None = None,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield ``(x, y, index)`` batches; ``x`` float in ``[0, 1]`` on ``device``.

    Args:
        keep: optional bool mask ``(N,)`` over ``data``; True = include the example.
        shuffle: draw a random order from ``generator`` (CPU) each call.
        augment: augmentation to apply (None = none).
        device: where batches go (default: where ``data`` lives).
        shard: ``(rank, world)``: only every ``world``-th example of the (shuffled) order,
            from ``rank`` on, after cutting the order to a multiple of ``world``, so that every
            rank of a data-parallel job gets as many examples (the same generator state on
            every rank gives each the same order to cut).
    """
    device = torch.device(device) if device is not None else data.images.device
    if keep is None:
        index = torch.arange(len(data))
    else:
        if keep.shape != (len(data),) or keep.dtype != torch.bool:
            raise ValueError(f"keep must be a bool mask of shape ({len(data)},)")
        index = keep.cpu().nonzero().squeeze(1)
    if shuffle:
        index = index[torch.randperm(len(index), generator=generator)]
    if shard is not None:
        rank, world = shard
        index = index[:len(index) - len(index) % world][rank::world]
    for start in range(0, len(index), batch_size):
        idx = index[start:start + batch_size]
        src = idx.to(data.images.device)
        x = data.images[src].to(device, non_blocking=True).float().div_(255)
        y = data.labels[src].to(device, non_blocking=True)
        if augment is not None:
            x = augment_batch(x, augment, generator=generator)
        yield x, y, idx


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

# Statistics of the CIFAR training sets, as commonly published; used so that a subset trains
# with the same normalization as the full set.
_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_cifar(name: Literal["cifar10", "cifar100"], root: str | os.PathLike[str]) -> Path:
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
    wanted = (*spec.train_files, *spec.test_files, spec.meta_file)
    out: dict[str, dict[str, object]] = {}
    if source.is_dir():
        for name in wanted:
            with open(source / name, "rb") as f:
                out[name] = _as_batch(safe_load(f), name)
        return out
    with tarfile.open(source, "r:gz") as tar:
        for member in tar.getmembers():
            base = member.name.rsplit("/", 1)[-1]
            if base in wanted and member.isfile():
                member_file = tar.extractfile(member)
                if member_file is None:
                    raise ValueError(f"{source}: cannot read {member.name}")
                out[base] = _as_batch(safe_load(member_file, name=f"{source}:{member.name}"),
                                      base)
    missing = set(wanted) - set(out)
    if missing:
        raise ValueError(f"{source} lacks {sorted(missing)}")
    return out


def _as_batch(obj: object, name: str) -> dict[str, object]:
    if not isinstance(obj, dict):
        raise ValueError(f"{name}: expected a dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _stack(batches: list[dict[str, object]], label_key: str, name: str) -> tuple[Tensor, Tensor]:
    images, labels = [], []
    for b in batches:
        data = np.asarray(b["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"{name}: 'data' must be uint8 (N, 3072), got {data.dtype} "
                             f"{data.shape}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(b[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def load_cifar(
    name: Literal["cifar10", "cifar100"], root: str | os.PathLike[str], *, download: bool = False
) -> tuple[ImageData, ImageData]:
    """Read CIFAR-10/100 from ``root``: the python folder, a parent of it, or the ``.tar.gz``.

    The batches are unpickled with :func:`epic.safe_pickle.safe_load`: a file that asks to run
    code raises :class:`~epic.safe_pickle.UnsafePickleError` and nothing is executed.

    Example:
        >>> train, test = load_cifar("cifar10", "data/")  # doctest: +SKIP
    """
    spec = _CIFAR[name]
    rootp = Path(root)
    source = _locate_cifar(name, spec, rootp)
    if source is None:
        if not download:
            raise FileNotFoundError(
                f"no {spec.folder} folder or {spec.archive} under {rootp}; pass download=True "
                f"(--download) to fetch it from {spec.url}")
        source = download_cifar(name, rootp)
    batches = _read_cifar_members(source, spec)
    meta = batches[spec.meta_file]
    classes = tuple(
        n.decode() if isinstance(n, bytes) else str(n) for n in meta[spec.names_key]  # type: ignore[attr-defined]
    )
    mean, std = _CIFAR_STATS[name]
    train_x, train_y = _stack([batches[f] for f in spec.train_files], spec.label_key, name)
    test_x, test_y = _stack([batches[f] for f in spec.test_files], spec.label_key, name)
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
            raise ValueError(f"{name} needs --data-dir (or EPIC_DATA_DIR)")
        return load_cifar(name, root, download=download)  # type: ignore[arg-type]
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
