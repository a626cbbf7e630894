"""EPICCallback in a real Lightning Trainer on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from epic import EPIC

from .conftest import check_epic_round, seeded_convnet, torchrun

L = pytest.importorskip("lightning.pytorch")
from epic.integrations.lightning import EPICCallback  # noqa: E402

from .scripts.lightning_parts import Indexed, Module  # noqa: E402


def test_callback_runs_rounds_on_schedule_and_trains_on_the_kept_examples(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train, _ = tiny_data
    x = train.images.float() / 255
    module = Module(seeded_convnet(train))
    callback = EPICCallback(EPIC(0.5, warmup=1, every=1, until=3), TensorDataset(x, train.labels))
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", logger=False, callbacks=[callback],
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, DataLoader(Indexed(x, train.labels), batch_size=16, shuffle=True))
    defense = callback.defense
    assert [r.epoch for r in defense.history] == [1, 2]
    keep = torch.ones(len(train), dtype=torch.bool)
    for r in defense.history:
        check_epic_round(r, train.labels, keep, 0.5)
        keep[r.dropped] = False
    assert len(defense.history[0].dropped) > 0
    assert torch.equal(defense.dropped, (~keep).nonzero().squeeze(1))
    after = {1: defense.history[0].dropped, 2: defense.dropped, 3: defense.dropped}
    assert sorted(module.seen[0]) == list(range(len(train)))  # warmup: everything
    for epoch, gone in after.items():
        kept = sorted(set(range(len(train))) - set(gone.tolist()))
        assert sorted(module.seen[epoch]) == kept, epoch
    assert trainer.callback_metrics["epic/remaining"] == int(keep.sum())
    assert trainer.callback_metrics["epic/dropped_total"] == int((~keep).sum())


def test_callback_checks_the_sizes(tiny_data) -> None:  # type: ignore[no-untyped-def]
    train, _ = tiny_data
    with pytest.raises(ValueError, match="covers 5 examples, data has 60"):
        EPICCallback(EPIC(0.5, num_examples=5), TensorDataset(train.images, train.labels))


def test_a_resumed_fit_goes_on_from_the_checkpointed_rounds(tiny_data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    train, _ = tiny_data
    x = train.images.float() / 255

    def fit(epochs: int, resume: str | None = None) -> tuple[EPICCallback, Module]:
        module = Module(seeded_convnet(train))
        callback = EPICCallback(EPIC(0.5, warmup=1, every=1, until=3),
                                TensorDataset(x, train.labels))
        checkpoints = L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                            callbacks=[callback, checkpoints], enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.fit(module, DataLoader(Indexed(x, train.labels), batch_size=16, shuffle=True),
                    ckpt_path=resume)
        return callback, module

    first, _ = fit(2)  # the round before epoch 1, then a checkpoint
    assert [r.epoch for r in first.defense.history] == [1]
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    assert first.state_key in state and "EPIC" in first.state_key
    second, module = fit(4, resume=str(tmp_path / "last.ckpt"))
    history = second.defense.history
    assert [r.epoch for r in history] == [1, 2]  # the first from the checkpoint, not redone
    assert torch.equal(history[0].dropped, first.defense.history[0].dropped)
    kept = sorted(set(range(len(train))) - set(second.defense.dropped.tolist()))
    assert sorted(module.seen[3]) == kept  # after the resume, only what both rounds kept
    assert set(module.seen) == {2, 3}


def test_callback_under_ddp_trains_each_rank_on_its_share_of_one_kept_set(
        tiny_data, tmp_path) -> None:  # type: ignore[no-untyped-def]
    train, _ = tiny_data
    torch.save({"x": train.images.float() / 255, "y": train.labels}, tmp_path / "inputs.pt")
    torchrun(str(Path(__file__).parent / "scripts" / "distributed_lightning.py"), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["rounds"] == ranks[1]["rounds"] == [1, 2]
    keep = ranks[0]["keep"]
    assert torch.equal(keep, ranks[1]["keep"]) and not bool(keep.all())
    for epoch in (0, 3):  # all of the data, then what the two rounds kept, split in two
        shares = [set(r["seen"][epoch]) for r in ranks]
        want = set(range(len(train))) if epoch == 0 else set(keep.nonzero().squeeze(1).tolist())
        assert not shares[0] & shares[1] and shares[0] | shares[1] <= want
        assert len(shares[0] | shares[1]) >= len(want) - 1  # an odd remainder is cut

