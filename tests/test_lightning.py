"""EPICCallback in a real Lightning Trainer on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from epic import EPIC

from .conftest import check_epic_round, seeded_convnet

L = pytest.importorskip("lightning.pytorch")
from epic.integrations.lightning import EPICCallback  # noqa: E402


class Indexed(Dataset[tuple[Tensor, Tensor, Tensor]]):
    """The training set, telling the module which example each row is."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.x[i], self.y[i], torch.tensor(i)


class Module(L.LightningModule):  # type: ignore[misc,name-defined]
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.seen: dict[int, list[int]] = {}

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], _: int) -> Tensor:
        x, y, idx = batch
        self.seen.setdefault(self.current_epoch, []).extend(idx.tolist())
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


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
