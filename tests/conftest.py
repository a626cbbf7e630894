from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import torch

from epic.data import ImageData
from epic.models import Classifier, build_model

# what a benchmark's trials in the tests train: the setting part of each trial's identity
SETTING = {"dataset": "tiny", "model": "convnet"}


def seeded_convnet(data: ImageData, seed: int = 0) -> Classifier:
    """A ``convnet`` for ``data``, initialized from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return build_model("convnet", num_classes=data.num_classes, in_channels=data.shape[0],
                       mean=data.mean, std=data.std)


def check_epic_round(r, labels: torch.Tensor, kept: torch.Tensor, fraction: float) -> None:  # type: ignore[no-untyped-def]
    """What must hold of an EPIC round ``r`` (``max_cluster_size`` 1) on the examples ``kept``
    before it: ``ceil(fraction * n)`` clusters in a class of ``n`` kept examples, every kept
    example in one cluster, and dropped exactly the examples alone in theirs."""
    assert torch.equal(r.cluster_size_of > 0, kept)
    sizes = r.cluster_size_of[kept].tolist()
    clusters = 0
    for size in set(sizes):
        assert sizes.count(size) % size == 0  # a cluster of `size` has `size` members
        clusters += sizes.count(size) // size
    per_class = [int((labels[kept] == c).sum()) for c in labels[kept].unique()]
    assert clusters == sum(math.ceil(Fraction(str(fraction)) * n) for n in per_class)
    every = r.cluster_size_of.tolist()
    assert r.dropped.tolist() == [i for i, size in enumerate(every) if size == 1]
    assert r.remaining == int(kept.sum()) - len(r.dropped)


def cifar_root() -> Path | None:
    """The CIFAR-10 python folder under $EPIC_DATA_DIR, or None."""
    root = os.environ.get("EPIC_DATA_DIR")
    if not root:
        return None
    folder = Path(root) / "cifar10" / "cifar-10-batches-py"
    return folder if (folder / "batches.meta").exists() else None


requires_cifar = pytest.mark.skipif(cifar_root() is None,
                                    reason="real CIFAR-10 not found under $EPIC_DATA_DIR")


@pytest.fixture
def registries() -> Iterator[None]:
    """Whatever a test registers (an attack, a defense, a file format) is gone after it."""
    from epic.attacks import ATTACKS
    from epic.defenses import DEFENSES
    from epic.formats import FORMATS

    saved: list[tuple[dict[str, Any], dict[str, Any]]] = [
        (r, dict(r)) for r in (ATTACKS, DEFENSES, FORMATS)]
    yield
    for registry, before in saved:
        registry.clear()
        registry.update(before)


@pytest.fixture
def tiny_data() -> tuple[ImageData, ImageData]:
    """A seeded 3-class colour set whose classes differ in mean brightness per channel."""
    g = torch.Generator().manual_seed(0)
    n, c = 90, 3
    labels = torch.arange(n) % c
    base = torch.rand(n, 3, 8, 8, generator=g) * 80
    shift = torch.eye(3)[labels][:, :, None, None] * 150
    images = (base + shift).clamp(0, 255).to(torch.uint8)
    train = ImageData.from_arrays(images[:60], labels[:60], ("r", "g", "b"))
    test = ImageData.from_arrays(images[60:], labels[60:], ("r", "g", "b")).with_stats_of(train)
    return train, test


TEARDOWN_ABORT = "terminate called without an active exception"


def torchrun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Two CPU ranks under torchrun, done; the run passes when every rank exits 0.

    A gloo rank of torch 2.13 now and then aborts at interpreter exit, after its last line of
    work and ``destroy_process_group()``, with ``TEARDOWN_ABORT`` (about 1 run in 5 on two busy
    cores, none when idle; a barrier before the teardown or releasing the DDP model first does
    not change that). Only that abort is launched again, at most twice; any other failure fails.
    """
    for _ in range(3):
        run = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             *args], capture_output=True, text=True, timeout=300,
            env=None if env is None else os.environ | env)
        if run.returncode == 0 or TEARDOWN_ABORT not in run.stderr:
            break
    assert run.returncode == 0, run.stderr[-3000:]
    return run

