"""Run under ``torchrun --nproc_per_node=2``: a Lightning DDP fit on the CPU with EPICCallback;
every rank writes the examples it trained on per epoch and its defense's keep-mask to DIR."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning_parts import Indexed, Module
from torch.utils.data import DataLoader, TensorDataset

from epic import EPIC
from epic.integrations.lightning import EPICCallback
from epic.models import build_model


def main(folder: Path) -> None:
    inputs = torch.load(folder / "inputs.pt", weights_only=True)
    x, y = inputs["x"], inputs["y"]
    torch.manual_seed(0)
    net = build_model("convnet", num_classes=3, in_channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    module = Module(net)
    callback = EPICCallback(EPIC(0.5, warmup=1, every=1, until=3), TensorDataset(x, y))
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", devices=2, strategy="ddp",
                        logger=False, callbacks=[callback], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(Indexed(x, y), batch_size=8, shuffle=True))
    torch.save({"seen": module.seen, "keep": callback.defense.keep_mask,
                "rounds": [r.epoch for r in callback.defense.history]},
               folder / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
