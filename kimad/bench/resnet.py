"""ResNet-18 for small (32x32) images, written out plainly (torchvision is not a dependency).

He et al., "Deep Residual Learning for Image Recognition" (2016), in the CIFAR-style form common in
gradient-compression papers: a 3x3 stride-1 stem without max-pooling, four stages of two basic blocks
(64, 128, 256, 512 channels; stride 2 from the second stage on, with a 1x1 projection shortcut), global
average pooling and one linear layer. 11,173,962 parameters at 10 classes, in 62 tensors.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv + batchnorm layers with an identity (or 1x1 conv projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            # The projection matches the residual's shape when a stage halves the resolution.
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for ``(N, in_channels, 32, 32)`` images (any size >= 8 works: pooling is adaptive).

    Args:
        num_classes: outputs of the final linear layer.
        in_channels: channels of the input images (3 for RGB).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, channels = [], 64
        for out_channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(channels, out_channels, stride),
                                        BasicBlock(out_channels, out_channels)))
            channels = out_channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = nn.functional.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def synthetic_images(batch_size: int, step: int, rank: int, num_classes: int = 10,
                     size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A reproducible random batch: images ``(batch_size, 3, size, size)`` N(0, 1), labels ``(batch_size,)``."""
    g = torch.Generator().manual_seed(1_000_003 * step + rank)
    images = torch.randn(batch_size, 3, size, size, generator=g)
    return images, torch.randint(0, num_classes, (batch_size,), generator=g)
