"""What a defense round needs from ``torch.distributed``: this process's share of the kept
examples, gathering every share's embeddings, and one rank's decision sent to all.

A round under a process group (DDP launched by ``torchrun``; gloo on CPUs, NCCL on GPUs) runs
as: every rank embeds every ``world``-th kept example starting at its rank, the embeddings are
gathered onto every rank in dataset order, rank 0 alone chooses what to drop, and that choice
is broadcast, so that every rank ends with the identical keep-mask (choosing on every rank
could differ at near ties).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["broadcast_from_first", "gather_shares", "init_from_env", "share_of", "world"]


def init_from_env() -> torch.device | None:
    """Join the process group ``torchrun`` describes in the environment (NCCL with one GPU per
    local rank where CUDA is available, else gloo) and return this rank's device; None when
    the process was not launched as one of several ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if not cuda:
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share_of(keep: Tensor, rank: int, size: int) -> Tensor:
    """Bool mask of rank ``rank``'s share of the kept examples: kept positions ``rank::size``."""
    share = torch.zeros_like(keep)
    share[keep.nonzero().squeeze(1)[rank::size]] = True
    return share


def gather_shares(rows: Tensor, labels: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """All ranks' ``(rows, labels)`` in dataset order: row ``j`` of the result is the kept
    example at position ``j``, which rank ``j % world`` embedded. ``total`` = kept examples."""
    _, size = world()
    longest = -(-total // size)
    width = torch.tensor([rows.shape[1] if rows.dim() == 2 else 0], device=rows.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    padded = torch.zeros(longest, int(width), dtype=torch.float32, device=rows.device)
    padded[:len(rows)] = rows.reshape(len(rows), -1).float()
    tags = torch.zeros(longest, dtype=torch.long, device=rows.device)
    tags[:len(labels)] = labels
    all_rows = [torch.empty_like(padded) for _ in range(size)]
    all_tags = [torch.empty_like(tags) for _ in range(size)]
    dist.all_gather(all_rows, padded)
    dist.all_gather(all_tags, tags)
    out = torch.empty(total, int(width), dtype=torch.float32, device=rows.device)
    out_labels = torch.empty(total, dtype=torch.long, device=rows.device)
    for r in range(size):
        count = len(range(r, total, size))
        out[r::size] = all_rows[r][:count]
        out_labels[r::size] = all_tags[r][:count]
    return out, out_labels


def broadcast_from_first(value: Any) -> Any:
    """``value`` as rank 0 has it, on every rank (tensors come back on the CPU)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
