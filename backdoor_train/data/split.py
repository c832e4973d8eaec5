"""What a dataset is to the rest of the code: a ``Split`` of uint8 [N, C, H, W] images and
int64 labels, and the ``DatasetSpec`` that describes one dataset (classes, shape, files).

Each dataset lives in its own module (data/mnist.py, data/cifar10.py) and is registered in
data/registry.py; triggers, models, evaluation, reports and staging read shapes from the spec.
Images are kept as stored (0..255, no normalisation): triggers stamp pixel values, and
``to_float`` makes the [0, 1] floats a model sees.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch


class DataError(RuntimeError):
    """The data root or one of its files is missing or unreadable."""


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W], values as stored (0..255)
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, limit: Optional[int]) -> "Split":
        """The first ``limit`` samples (all of them for None)."""
        return self if limit is None else Split(self.images[:limit], self.labels[:limit])


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: ``folder`` (below ``data.root``, torchvision's layout) holds ``files``;
    ``load(root, train)`` reads one whole split and checks it against ``shape`` and
    ``num_classes``; ``download(root)`` fetches the files there with torchvision's dataset
    class ``torchvision_class``."""

    name: str
    title: str  # as people write it, for messages: "MNIST", "CIFAR-10"
    num_classes: int
    shape: tuple[int, int, int]  # C, H, W
    sizes: tuple[int, int]  # training, test images
    folder: str
    files: tuple[str, ...]
    load: Callable[[str, bool], Split]
    torchvision_class: str

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.shape[1], self.shape[2]

    def download(self, root: str) -> None:
        import torchvision

        for train in (True, False):
            try:
                getattr(torchvision.datasets, self.torchvision_class)(root=root, train=train, download=True)
            except Exception as exc:  # network errors come in many types
                raise DataError(f"data.root: downloading {self.title} to {root!r} failed: {exc}") from None

    def folder_path(self, root: str) -> str:
        return os.path.join(root, *self.folder.split("/"))

    def find(self, root: str, name: str) -> Optional[str]:
        """The file ``name`` below ``root``, as stored or gzipped (a staged copy is gzipped)."""
        for candidate in (name, name + ".gz"):
            path = os.path.join(self.folder_path(root), candidate)
            if os.path.isfile(path):
                return path
        return None

    def check_root(self, root: str, download: bool = False) -> None:
        """Fail fast, naming ``data.root``, when the files are not there to read."""
        if download:
            return
        if not os.path.isdir(root):
            raise DataError(f"data.root: directory {root!r} does not exist "
                            f"(set data.download: true to fetch {self.title} there)")
        missing = [name for name in self.files if self.find(root, name) is None]
        if missing:
            raise DataError(f"data.root: {self.folder_path(root)!r} lacks {', '.join(missing)} "
                            f"(torchvision's {self.title} layout is expected)")

    def check_split(self, split: Split, where: str) -> Split:
        """``split`` when its images are this dataset's shape and its labels its classes."""
        if tuple(split.images.shape[1:]) != self.shape:
            raise DataError(f"{where}: images are {tuple(split.images.shape[1:])}, not {self.shape} (C, H, W)")
        if split.images.shape[0] != split.labels.shape[0]:
            raise DataError(f"{where}: {split.images.shape[0]} images but {split.labels.shape[0]} labels")
        if split.labels.numel() and not 0 <= int(split.labels.min()) <= int(split.labels.max()) < self.num_classes:
            raise DataError(f"{where}: labels outside 0..{self.num_classes - 1}")
        return split


def read_raw(path: str) -> bytes:
    """A data file's bytes, gunzipped when its name ends in .gz; a ``DataError`` naming it."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] → float32 in [0, 1], as torchvision's ToTensor gives."""
    return images.to(torch.float32).div_(255.0)
