"""The training set and module of the Lightning tests, shared with the DDP script."""

from __future__ import annotations

import lightning.pytorch as L
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset


class Indexed(Dataset[tuple[Tensor, Tensor, Tensor]]):
    """The training set, telling the module which example each row is."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.x[i], self.y[i], torch.tensor(i)


class Module(L.LightningModule):  # type: ignore[misc]
    """A classifier that notes which examples each epoch trained on."""

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
