"""ResNet-18 in its CIFAR form (He et al. 2016, as commonly used for 32x32 images, e.g.
kuangliu/pytorch-cifar): the architecture ``model.arch: resnet18_cifar`` builds.

Like every architecture here it is split into ``features`` (up to the pooled 512-dim
penultimate activations) and ``head`` (the final linear layer), so detection methods read
``model.features(x)`` without hooks.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut (a 1x1 conv-BN projection where the
    stride or width changes), ReLU after the sum."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        # No conv biases: each conv feeds a BatchNorm, whose shift makes a bias redundant.
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            # The identity cannot be added across a shape change; project it (option B of the paper).
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """3x3 conv stem (64 channels, stride 1, no max-pool) → BasicBlock stages [2, 2, 2, 2] of
    64/128/256/512 channels with strides 1/2/2/2 → global average pool → linear.
    About 11.17M parameters for 10 classes."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        channels = shape[0]
        # A 3x3 stride-1 stem without max-pool instead of ImageNet's 7x7/2 + pool: at 32x32 the
        # ImageNet stem would shrink the image 4x before the first block.
        layers: list[nn.Module] = [nn.Conv2d(channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                                   nn.ReLU(inplace=True)]
        in_channels = 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(in_channels, width, stride), BasicBlock(width, width, 1)]
            in_channels = width
        # Adaptive pooling (4x4 → 1x1 on CIFAR) so other image sizes (e.g. 28x28) work too.
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
