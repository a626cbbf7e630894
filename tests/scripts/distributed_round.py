"""Run under ``torchrun --nproc_per_node=2``: two EPIC rounds with DDP on gloo, from the
inputs the test wrote to DIR; each rank writes its keep-masks and sampler shares to DIR."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from epic import EPIC, DistributedKeepSampler
from epic.data import ImageData
from epic.models import build_model


def main(folder: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    inputs = torch.load(folder / "inputs.pt", weights_only=True)
    data = ImageData.from_arrays(inputs["images"], inputs["labels"], ("r", "g", "b"))
    model = build_model("convnet", num_classes=3, in_channels=3, mean=data.mean, std=data.std)
    model.load_state_dict(inputs["model"])
    ddp = DistributedDataParallel(model)
    defense = EPIC(inputs["fraction"], warmup=0, every=1)
    masks = []
    for epoch in range(2):
        defense.update(ddp, data, epoch)
        masks.append(defense.keep_mask.clone())
    sampler = DistributedKeepSampler(defense, seed=3)
    sampler.set_epoch(1)
    torch.save({"masks": masks, "share": list(sampler),
                "sizes": [r.cluster_size_of for r in defense.history]},
               folder / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
