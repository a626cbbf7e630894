"""KeepSampler: a DataLoader trains on what the defense keeps, reread every epoch."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from epic.defenses import EPIC
from epic.sampler import KeepSampler


def test_loader_follows_the_keep_mask_from_epoch_to_epoch() -> None:
    data = TensorDataset(torch.arange(10).float(), torch.arange(10) % 2)
    defense = EPIC(fraction=0.1, warmup=0, every=1)  # no mask yet: everything
    sampler = KeepSampler(defense, num_examples=10, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(data, batch_size=4, sampler=sampler)
    assert sorted(int(x) for xb, _ in loader for x in xb) == list(range(10))
    defense.keep_mask = torch.ones(10, dtype=torch.bool)
    defense.keep_mask[[3, 7]] = False  # a round dropped two examples
    seen = [int(x) for xb, _ in loader for x in xb]
    assert sorted(seen) == [0, 1, 2, 4, 5, 6, 8, 9] and len(loader) == 2
    again = [int(x) for xb, _ in loader for x in xb]
    assert again != seen  # a new order each epoch


def test_sampler_refuses_a_mask_of_another_size() -> None:
    defense = EPIC(fraction=0.1, warmup=0, every=1, num_examples=5)
    with pytest.raises(ValueError, match="covers 5 examples, the sampler 4"):
        list(KeepSampler(defense, num_examples=4))


def test_sampler_takes_its_size_from_the_defense() -> None:
    defense = EPIC(fraction=0.1, warmup=0, every=1, num_examples=5)
    defense.keep_mask[2] = False
    assert sorted(KeepSampler(defense)) == [0, 1, 3, 4]
    with pytest.raises(ValueError, match="no keep_mask yet: pass num_examples="):
        KeepSampler(EPIC(fraction=0.1, warmup=0, every=1))
