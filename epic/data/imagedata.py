"""Image datasets held in memory as uint8 tensors, and batch augmentation on tensors.

Images stay uint8 ``(N, C, H, W)`` until a batch is drawn; a batch is float in ``[0, 1]``.
Per-channel normalization lives inside the models (see :mod:`epic.models`), so attacks and
defenses work in pixel space where an l-infinity budget of 8/255 means what it says.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Augment", "ImageData", "augment_batch", "batch_indices", "iterate_batches"]


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
        if labs.is_floating_point() or labs.is_complex() or labs.dtype == torch.bool:
            raise ValueError(f"labels must be integers, got {labs.dtype}")
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


def inference_batch_size(device: torch.device | str) -> int:
    """Examples per batch of an eval-mode pass on ``device``: 128 on the CPU, where a batch
    that stays in cache runs 1.5-2.6x faster than one of 1,000 (with
    :func:`channels_last_on_cpu`; ``benchmarks/epoch_profile.py --embedding-variants``), 512
    on an accelerator."""
    return 128 if torch.device(device).type == "cpu" else 512


def channels_last_on_cpu(x: Tensor) -> Tensor:
    """``x`` in channels-last memory format if it is a 4-D batch on the CPU, else ``x``.

    CPU convolutions run faster on channels-last input (eval passes 1.4-1.7x, training steps
    1.1-1.4x: ``benchmarks/epoch_profile.py``); the results agree with the default format's
    to float32 rounding, which a training run accumulates into other weights.
    """
    if x.device.type == "cpu" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def batch_indices(n: int, *, batch_size: int = 128, keep: Tensor | None = None,
                  shuffle: bool = False, generator: torch.Generator | None = None,
                  shard: tuple[int, int] | None = None, min_batch: int = 1) -> Iterator[Tensor]:
    """The CPU index batches ``(B,)`` of :func:`iterate_batches` over ``n`` examples, without
    reading any (the same order for the same generator state; arguments as there)."""
    if keep is None:
        index = torch.arange(n)
    else:
        if keep.shape != (n,) or keep.dtype != torch.bool:
            raise ValueError(f"keep must be a bool mask of shape ({n},)")
        index = keep.cpu().nonzero().squeeze(1)
    if shuffle:
        index = index[torch.randperm(len(index), generator=generator)]
    if shard is not None:
        rank, world = shard
        index = index[:len(index) - len(index) % world][rank::world]
    for start in range(0, len(index), batch_size):
        if start and len(index) - start < min_batch:
            return
        yield index[start:start + batch_size]


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
    min_batch: int = 1,
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
        min_batch: leave out a last batch of fewer examples (unless it is the only one).
    """
    device = torch.device(device) if device is not None else data.images.device
    for idx in batch_indices(len(data), batch_size=batch_size, keep=keep, shuffle=shuffle,
                             generator=generator, shard=shard, min_batch=min_batch):
        src = idx.to(data.images.device)
        x = data.images[src].to(device, non_blocking=True).float().div_(255)
        y = data.labels[src].to(device, non_blocking=True)
        if augment is not None:
            x = augment_batch(x, augment, generator=generator)
        yield x, y, idx
