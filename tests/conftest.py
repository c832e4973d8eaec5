"""Shared fixtures: the real MNIST copy and small configs built on it."""

from __future__ import annotations

import os

import pytest

from backdoor_train.config import ExperimentConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST_ROOT = os.environ.get("BACKDOOR_TRAIN_MNIST_ROOT",
                            os.path.join(REPO_ROOT, "..", "shared", "datasets", "mnist"))


@pytest.fixture(scope="session")
def mnist_root() -> str:
    root = os.path.abspath(MNIST_ROOT)
    if not os.path.isfile(os.path.join(root, "MNIST", "raw", "train-images-idx3-ubyte")):
        pytest.fail(f"real MNIST not found at {root}: set BACKDOOR_TRAIN_MNIST_ROOT to torchvision's layout")
    return root


@pytest.fixture(scope="session")
def mnist_splits(mnist_root):
    from backdoor_train.data import load_mnist

    return load_mnist(mnist_root, train=True), load_mnist(mnist_root, train=False)


def small_config(mnist_root: str, storage: str, **sections) -> ExperimentConfig:
    """A quick real-MNIST experiment: a subset, few epochs; sections override whole keys."""
    data = {
        "name": "tiny",
        "seed": 1,
        "data": {"root": mnist_root, "train_samples": 6000, "test_samples": 2000},
        "train": {"epochs": 2, "batch_size": 200, "lr": 0.002},
        "poison": {"rate": 0.05, "target": 8},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "storage": {"path": storage},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return ExperimentConfig.from_dict(data)
