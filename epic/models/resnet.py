"""ResNet-18 with the CIFAR stem (3x3 first convolution, no max-pool), He et al. 2016."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def resnet_body(in_channels: int, *, width: int = 64, blocks: tuple[int, ...] = (2, 2, 2, 2)
                ) -> tuple[nn.Module, int]:
    """Feature extractor of a CIFAR ResNet and its output width (ResNet-18: defaults)."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                               nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    c = width
    for stage, n in enumerate(blocks):
        c_out = width * 2**stage
        for i in range(n):
            layers.append(BasicBlock(c, c_out, 2 if (i == 0 and stage > 0) else 1))
            c = c_out
    layers.append(nn.AdaptiveAvgPool2d(1))
    return nn.Sequential(*layers), c
