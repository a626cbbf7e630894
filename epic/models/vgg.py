"""VGG-16 with batch normalization (Simonyan & Zisserman 2014), CIFAR variant: one linear head."""

from __future__ import annotations

from torch import nn

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg_body(in_channels: int, *, width: int = 64) -> tuple[nn.Module, int]:
    """Feature extractor of VGG-16-BN scaled so its first stage has ``width`` channels."""
    layers: list[nn.Module] = []
    c = in_channels
    for v in VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            c_out = int(v) * width // 64
            layers += [nn.Conv2d(c, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
            c = c_out
    # Inputs smaller than 32x32 (digits) would pool to nothing: pool adaptively at the end.
    layers.append(nn.AdaptiveAvgPool2d(1))
    return nn.Sequential(*layers), c
