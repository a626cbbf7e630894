"""EPIC under torch.distributed: two gloo ranks launched by torchrun drop exactly what one
process drops, and every rank ends with the same keep-mask."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from epic import EPIC, DistributedKeepSampler

from .conftest import seeded_convnet

SCRIPT = Path(__file__).parent / "scripts" / "distributed_round.py"


def test_two_ranks_drop_what_one_process_drops(tiny_data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    train, _ = tiny_data
    model = seeded_convnet(train)
    torch.save({"images": train.images, "labels": train.labels, "model": model.state_dict(),
                "fraction": 0.5}, tmp_path / "inputs.pt")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    single = EPIC(0.5, warmup=0, every=1)
    masks = []
    for epoch in range(2):
        single.update(model, train, epoch)
        masks.append(single.keep_mask.clone())
    assert int((~masks[0]).sum()) > 0 and int((~masks[1]).sum()) > int((~masks[0]).sum())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for out in ranks:
        for got, want in zip(out["masks"], masks, strict=True):
            assert torch.equal(got, want)
        for got, record in zip(out["sizes"], single.history, strict=True):
            assert torch.equal(got, record.cluster_sizes)  # type: ignore[attr-defined]
    # the sampler's shares: equal sizes, and together every kept example
    shares = [out["share"] for out in ranks]
    assert len(shares[0]) == len(shares[1])
    assert set(shares[0]) | set(shares[1]) == set(masks[1].nonzero().squeeze(1).tolist())


def test_distributed_sampler_shards_the_kept_examples() -> None:
    defense = EPIC(0.1, warmup=0, every=1, num_examples=11)
    defense.keep_mask[[0, 5, 6]] = False
    kept = set(defense.keep_mask.nonzero().squeeze(1).tolist())
    samplers = [DistributedKeepSampler(defense, num_replicas=3, rank=r, seed=1) for r in range(3)]
    for s in samplers:
        s.set_epoch(4)
    shares = [list(s) for s in samplers]
    assert [len(s) for s in shares] == [3, 3, 3] == [len(s) for s in samplers]
    assert set().union(*shares) == kept  # 8 kept, one repeated to fill 9 places
    samplers[0].set_epoch(5)
    assert list(samplers[0]) != shares[0]  # a new order each epoch
    defense.keep_mask[:] = False
    assert list(samplers[0]) == [] and len(samplers[0]) == 0
    with pytest.raises(ValueError, match="need 0 <= rank < num_replicas"):
        DistributedKeepSampler(defense, num_replicas=2, rank=2)
