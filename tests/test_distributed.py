"""EPIC under torch.distributed: two gloo ranks launched by torchrun drop exactly what one
process drops, and every rank ends with the same keep-mask."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from epic import EPIC, DistributedKeepSampler
from epic.data import load_digits
from epic.models import build_model

from .conftest import seeded_convnet, torchrun

SCRIPT = Path(__file__).parent / "scripts" / "distributed_round.py"


def test_two_ranks_drop_what_one_process_drops(tiny_data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    train, _ = tiny_data
    model = seeded_convnet(train)
    torch.save({"images": train.images, "labels": train.labels, "model": model.state_dict(),
                "fraction": 0.5}, tmp_path / "inputs.pt")
    torchrun(str(SCRIPT), str(tmp_path))
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
            assert torch.equal(got, record.cluster_size_of)  # type: ignore[attr-defined]
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


@pytest.mark.parametrize("scenario", ["scratch", "transfer"])
def test_training_under_torchrun_keeps_ranks_in_step(tmp_path, scenario) -> None:  # type: ignore[no-untyped-def]
    if scenario == "transfer":  # any weights will do as the frozen body
        train, _ = load_digits()
        torch.manual_seed(1)
        body = build_model("convnet", num_classes=10, in_channels=1, mean=train.mean,
                           std=train.std)
        torch.save(body.state_dict(), tmp_path / "pretrained.pt")
    torchrun(str(SCRIPT.parent / "distributed_train.py"), str(tmp_path), scenario)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name, value in ranks[0]["model"].items():  # DDP kept the replicas identical
        assert torch.equal(value, ranks[1]["model"][name]), name
    keep = ranks[0]["keep"]
    assert torch.equal(keep, ranks[1]["keep"]) and not bool(keep.all())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    rounds = json.loads((tmp_path / "run" / "defense.json").read_text())
    assert [r["epoch"] for r in rounds] == [1, 2]
    assert metrics[0]["trained_on"] == 1346  # 1,347 cut to a multiple of 2 ranks
    remaining = rounds[-1]["remaining"]
    assert metrics[2]["trained_on"] == remaining - remaining % 2
    assert not list((tmp_path / "run").glob("rank*"))  # nothing but rank 0's run there
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["examples_dropped"] == int((~keep).sum())


def test_epic_train_takes_the_distributed_path_under_torchrun(tmp_path) -> None:  # type: ignore[no-untyped-def]
    run = torchrun("-m", "epic.cli", "train", "--epochs", "3", "--defense", "epic",
                   "--fraction", "0.2", "--warmup", "1", "--every", "1", "--batch-size", "64",
                   "--out", str(tmp_path), "--json")
    lines = run.stdout.splitlines()
    assert len([line for line in lines if line.startswith("test accuracy")]) == 1  # rank 0 only
    summary = json.loads(lines[-1])
    config = json.loads((tmp_path / "config.json").read_text())
    rounds = json.loads((tmp_path / "defense.json").read_text())
    assert [r["epoch"] for r in rounds] == [1]  # until the last milestone (2)
    assert summary["epochs"] == 3
    assert summary["examples_dropped"] == sum(len(r["dropped"]) for r in rounds) > 0
    assert rounds[-1]["remaining"] == 1347 - summary["examples_dropped"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    remaining = rounds[-1]["remaining"]
    assert metrics[2]["trained_on"] == remaining - remaining % 2  # both ranks' shares
    assert config["config"]["batch_size"] == 64
