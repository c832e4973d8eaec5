"""Where the MNIST files come from: the configured data root, resolved to a local directory."""

from __future__ import annotations

import os

from backdoor_train.config import ExperimentConfig
from backdoor_train.data import MnistSplit, check_data_root, load_mnist


def resolve_data_root(cfg: ExperimentConfig) -> str:
    """A local directory in torchvision's MNIST layout for ``data.root``."""
    root = os.path.abspath(os.path.expanduser(cfg.data.root))
    check_data_root(root, cfg.data.download)
    return root


def load_splits(cfg: ExperimentConfig) -> tuple[MnistSplit, MnistSplit]:
    root = resolve_data_root(cfg)
    train = load_mnist(root, train=True, limit=cfg.data.train_samples, download=cfg.data.download)
    test = load_mnist(root, train=False, limit=cfg.data.test_samples, download=cfg.data.download)
    return train, test
