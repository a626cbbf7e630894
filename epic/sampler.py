"""Samplers that apply a defense's keep-mask inside a plain ``torch.utils.data.DataLoader``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor
from torch.utils.data import Sampler

__all__ = ["DistributedKeepSampler", "KeepSampler"]


class _HasKeepMask(Protocol):
    keep_mask: Tensor | None


def _size(defense: _HasKeepMask, num_examples: int | None) -> int:
    if num_examples is None:
        if defense.keep_mask is None:
            raise ValueError("the defense has no keep_mask yet: pass num_examples= (the size of "
                             "the dataset) to the sampler or to the defense")
        return len(defense.keep_mask)
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    return num_examples


def _kept(defense: _HasKeepMask, num_examples: int) -> Tensor:
    keep = defense.keep_mask
    if keep is None:
        return torch.arange(num_examples)
    if keep.shape != (num_examples,):
        raise ValueError(f"the defense's keep_mask covers {keep.numel()} examples, the "
                         f"sampler {num_examples}")
    return keep.cpu().nonzero().squeeze(1)


class KeepSampler(Sampler[int]):
    """Dataset indices that ``defense`` still keeps, reread at the start of every epoch.

    Pass it as ``DataLoader(dataset, sampler=KeepSampler(defense))``: each ``iter()`` (each
    epoch) reads ``defense.keep_mask`` afresh, so examples a round drops leave the next epoch.
    ``keep_mask`` None means all examples; ``num_examples`` (default: the length of the
    defense's keep-mask, which then must exist) is the size of the dataset. With ``shuffle``
    the order is drawn from ``generator`` (seed it for reproducible runs).

    Example:
        >>> from epic.defenses import EPIC
        >>> defense = EPIC(fraction=0.1, warmup=1, every=1, num_examples=6)
        >>> defense.keep_mask[[1, 4]] = False
        >>> list(KeepSampler(defense, num_examples=6, shuffle=False))
        [0, 2, 3, 5]
    """

    def __init__(self, defense: _HasKeepMask, *, num_examples: int | None = None,
                 shuffle: bool = True, generator: torch.Generator | None = None) -> None:
        self.defense = defense
        self.num_examples = _size(defense, num_examples)
        self.shuffle = shuffle
        self.generator = generator

    def __iter__(self) -> Iterator[int]:
        kept = _kept(self.defense, self.num_examples)
        if self.shuffle:
            kept = kept[torch.randperm(len(kept), generator=self.generator)]
        return iter(kept.tolist())

    def __len__(self) -> int:
        return len(_kept(self.defense, self.num_examples))


class DistributedKeepSampler(Sampler[int]):
    """This rank's share of the examples ``defense`` keeps, for DDP; reread every epoch.

    The distributed counterpart of :class:`KeepSampler`, shaped like
    ``torch.utils.data.DistributedSampler``: call :meth:`set_epoch` before each epoch. All
    ranks draw the same order (from ``seed`` and the epoch), pad it by repeating its start to a
    multiple of ``num_replicas`` and take every ``num_replicas``-th index from ``rank`` on, so
    every rank gets the same number of examples and the ranks' shares cover the kept set. The
    keep-mask must be the same on every rank, as :meth:`epic.EPIC.update` leaves it under
    ``torch.distributed``.

    Example:
        >>> from epic.defenses import EPIC
        >>> defense = EPIC(fraction=0.1, warmup=1, every=1, num_examples=7)
        >>> defense.keep_mask[[1, 4]] = False
        >>> [list(DistributedKeepSampler(defense, num_replicas=2, rank=r, shuffle=False))
        ...  for r in (0, 1)]
        [[0, 3, 6], [2, 5, 0]]
    """

    def __init__(self, defense: _HasKeepMask, *, num_examples: int | None = None,
                 num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0) -> None:
        from epic.distributed import world

        own_rank, size = world()
        self.num_replicas = size if num_replicas is None else num_replicas
        self.rank = own_rank if rank is None else rank
        if self.num_replicas < 1 or not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank {self.rank} of "
                             f"{self.num_replicas}")
        self.defense = defense
        self.num_examples = _size(defense, num_examples)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the order of epoch ``epoch`` (the same on every rank)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        kept = _kept(self.defense, self.num_examples)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            kept = kept[torch.randperm(len(kept), generator=g)]
        if len(kept) == 0:
            return iter([])
        total = -(-len(kept) // self.num_replicas) * self.num_replicas  # len(self) per rank
        padded = kept.repeat(-(-total // len(kept)))[:total]
        return iter(padded[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return -(-len(_kept(self.defense, self.num_examples)) // self.num_replicas)
