"""The registry of datasets ``data.name`` chooses from, and loading a config's splits.

A dataset is one module exporting a ``DatasetSpec`` (data/split.py); adding one means writing that
module and one line here.
"""

from __future__ import annotations

from typing import Optional

from backdoor_train.data.cifar10 import CIFAR10
from backdoor_train.data.split import DataError, DatasetSpec, Split
from backdoor_train.data.mnist import MNIST

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (MNIST, CIFAR10)}


def get_dataset(name: str) -> DatasetSpec:
    return DATASETS[name]


def load_split(spec: DatasetSpec, root: str, train: bool, limit: Optional[int] = None,
               download: bool = False) -> Split:
    """One split of ``spec`` from the local ``root``; ``limit`` keeps the first N images;
    ``download`` fetches the files first when any is missing."""
    if download and any(spec.find(root, name) is None for name in spec.files):
        spec.download(root)
    spec.check_root(root)
    return spec.load(root, train).head(limit)


__all__ = ["DATASETS", "DataError", "DatasetSpec", "Split", "get_dataset", "load_split"]
