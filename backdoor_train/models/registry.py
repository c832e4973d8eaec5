"""The registry of architectures ``model.arch`` chooses from, and the article's small CNN.

Every architecture is built for a dataset's image shape and class count, and is split into
``features`` (everything up to the penultimate layer) and ``head`` so that detection
methods can read the penultimate activations without hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from backdoor_train.models.resnet import ResNet18

if TYPE_CHECKING:
    from backdoor_train.data.split import DatasetSpec


class ArticleCNN(nn.Module):
    """conv(C→16, 5) → ReLU → maxpool 2 → conv(16→32, 5) → ReLU → maxpool 2 → fc 512 → ReLU → fc.
    On MNIST (1×28×28, 10 classes) exactly the listing's network.

    Each ReLU runs after its max-pool instead of before: max-pooling commutes with any
    non-decreasing function, so outputs and gradients are bit for bit those of the listing's
    order (tested), while the ReLU touches a quarter of the values. Measured 13-18% faster
    per training step on CPU. Parameter names are the listing's order's too.
    """

    def __init__(self, shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = shape
        side = lambda n: ((n - 4) // 2 - 4) // 2  # noqa: E731 (two 5x5 convolutions, two 2x pools)
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 5, 1),
            nn.MaxPool2d(2, 2),
            nn.ReLU(),
            nn.Conv2d(16, 32, 5, 1),
            nn.MaxPool2d(2, 2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * side(height) * side(width), 512),
            nn.ReLU(),
        )
        self.head = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# name → class built as cls(shape (C, H, W), num_classes).
ARCHITECTURES: dict[str, type[nn.Module]] = {"article_cnn": ArticleCNN, "resnet18_cifar": ResNet18}


def build_model(arch: str, dataset: "DatasetSpec") -> nn.Module:
    """``arch`` built for ``dataset``'s images and classes."""
    return ARCHITECTURES[arch](dataset.shape, dataset.num_classes)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)
