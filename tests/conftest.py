from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from epic.data import ImageData
from epic.models import Classifier, build_model


def seeded_convnet(data: ImageData, seed: int = 0) -> Classifier:
    """A ``convnet`` for ``data``, initialized from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return build_model("convnet", num_classes=data.num_classes, in_channels=data.shape[0],
                       mean=data.mean, std=data.std)


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
