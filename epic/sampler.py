"""Samplers that apply a defense's keep-mask inside a plain ``torch.utils.data.DataLoader``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor
from torch.utils.data import Sampler

__all__ = ["KeepSampler"]


class _HasKeepMask(Protocol):
    keep_mask: Tensor | None


class KeepSampler(Sampler[int]):
    """Dataset indices that ``defense`` still keeps, reread at the start of every epoch.

    Pass it as ``DataLoader(dataset, sampler=KeepSampler(defense, num_examples=len(dataset)))``:
    each ``iter()`` (each epoch) reads ``defense.keep_mask`` afresh, so examples a round drops
    leave the next epoch. ``keep_mask`` None means all examples. With ``shuffle`` the order is
    drawn from ``generator`` (seed it for reproducible runs).

    Example:
        >>> from epic.defense import EPIC
        >>> defense = EPIC(fraction=0.1, warmup=1, every=1, num_examples=6)
        >>> defense.keep_mask[[1, 4]] = False
        >>> list(KeepSampler(defense, num_examples=6, shuffle=False))
        [0, 2, 3, 5]
    """

    def __init__(self, defense: _HasKeepMask, *, num_examples: int, shuffle: bool = True,
                 generator: torch.Generator | None = None) -> None:
        if num_examples < 0:
            raise ValueError(f"num_examples must be >= 0, got {num_examples}")
        self.defense = defense
        self.num_examples = num_examples
        self.shuffle = shuffle
        self.generator = generator

    def _kept(self) -> Tensor:
        keep = self.defense.keep_mask
        if keep is None:
            return torch.arange(self.num_examples)
        if keep.shape != (self.num_examples,):
            raise ValueError(f"the defense's keep_mask covers {keep.numel()} examples, the "
                             f"sampler {self.num_examples}")
        return keep.cpu().nonzero().squeeze(1)

    def __iter__(self) -> Iterator[int]:
        kept = self._kept()
        if self.shuffle:
            kept = kept[torch.randperm(len(kept), generator=self.generator)]
        return iter(kept.tolist())

    def __len__(self) -> int:
        return len(self._kept())
