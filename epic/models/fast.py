"""A fast CIFAR net: the layout of airbench (Jordan 2024), which reaches 93% in minutes.

A 2x2 convolution without padding, then three conv groups (3x3 conv, 2x2 max-pool, batch
norm, GELU, 3x3 conv, batch norm, GELU) of widths 64, 128, 128, and a global max-pool:
0.57 M parameters. airbench's whitened first layer and lookahead are left out; trained with
:data:`epic.bench.presets.FAST_RECIPE` it reaches 92% on CIFAR-10 in about half an hour of
two CPU cores (docs/results.md).
"""

from __future__ import annotations

from torch import nn


def _group(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2),
            nn.BatchNorm2d(c_out), nn.GELU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]


def fast_body(in_channels: int, *, widths: tuple[int, int, int] = (64, 128, 128),
              stem: int = 24) -> tuple[nn.Module, int]:
    """Feature extractor of the fast net and its output width (``widths[-1]``)."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, stem, 2), nn.GELU()]
    c = stem
    for w in widths:
        layers += _group(c, w)
        c = w
    layers.append(nn.AdaptiveMaxPool2d(1))
    return nn.Sequential(*layers), c
