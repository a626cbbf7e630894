"""Run under ``torchrun --nproc_per_node=2``: ``epic.training.train`` with EPIC on digits with
DDP on gloo; rank 0 writes the run to DIR, every rank its final weights and keep-mask."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from epic import EPIC
from epic.data import load_digits
from epic.models import build_model
from epic.training import TrainConfig, train


def main(folder: Path, scenario: str) -> None:
    dist.init_process_group("gloo")
    train_data, test_data = load_digits()
    torch.manual_seed(0)
    model = build_model("convnet", num_classes=10, in_channels=1, mean=train_data.mean,
                        std=train_data.std)
    if scenario == "transfer":
        model.load_state_dict(torch.load(folder / "pretrained.pt", weights_only=True))
    defense = EPIC(0.2, warmup=1, every=1, num_examples=len(train_data))
    config = TrainConfig(epochs=3, scenario=scenario, lr=0.05, batch_size=64,  # type: ignore[arg-type]
                         augment=scenario != "transfer")
    train(model, train_data, test_data, config, defense=defense, out=folder / "run")
    torch.save({"model": model.state_dict(), "keep": defense.keep_mask},
               folder / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
