"""A small convolutional network that trains in seconds on a CPU."""

from __future__ import annotations

from torch import nn


def convnet_body(in_channels: int, *, width: int = 32) -> tuple[nn.Module, int]:
    """Three conv-BN-ReLU stages (the last two halve the resolution), global average pool."""
    w = width
    body = nn.Sequential(
        nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(True),
        nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w),
        nn.ReLU(True),
        nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4 * w),
        nn.ReLU(True),
        nn.AdaptiveAvgPool2d(1),
    )
    return body, 4 * w
