"""A small convolutional network that trains in seconds on a CPU."""

from __future__ import annotations

from torch import nn


def convnet_body(in_channels: int, *, width: int = 32, features: int | None = None
                 ) -> tuple[nn.Module, int]:
    """Three conv-BN-ReLU stages (the last two halve the resolution), global average pool.

    ``features`` adds a 1x1 conv-BN-ReLU to that many channels before the pool: a wide
    penultimate layer (512, as ResNet-18's) at a small fraction of ResNet-18's cost.
    """
    w = width
    body = nn.Sequential(
        nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(True),
        nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w),
        nn.ReLU(True),
        nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4 * w),
        nn.ReLU(True),
    )
    if features is not None:
        body.extend([nn.Conv2d(4 * w, features, 1, bias=False), nn.BatchNorm2d(features),
                     nn.ReLU(True)])
    body.append(nn.AdaptiveAvgPool2d(1))
    return body, features or 4 * w
