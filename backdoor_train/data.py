"""Real MNIST, read once into tensors from a data root in torchvision's layout.

``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (or their ``.gz``), as
``torchvision.datasets.MNIST(root=...)`` leaves them. The IDX files are parsed straight
into uint8/int64 tensors — no per-item PIL conversion — and checked, so a truncated or
foreign file fails with its name instead of producing garbage.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

SPLIT_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SPLIT_SIZES = {True: 60_000, False: 10_000}
RAW_FILES = [name for pair in SPLIT_FILES.values() for name in pair]
_IDX_UBYTE = 0x08


class DataError(RuntimeError):
    """The data root or one of its files is missing or unreadable."""


@dataclass(frozen=True)
class MnistSplit:
    images: torch.Tensor  # uint8 [N, 28, 28], values as stored (0..255)
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def raw_dir(root: str) -> str:
    return os.path.join(root, "MNIST", "raw")


def _find(root: str, name: str) -> Optional[str]:
    for candidate in (name, name + ".gz"):
        path = os.path.join(raw_dir(root), candidate)
        if os.path.isfile(path):
            return path
    return None


def check_data_root(root: str, download: bool = False) -> None:
    """Fail fast, naming ``data.root``, when the MNIST files are not there to read."""
    if download:
        return
    if not os.path.isdir(root):
        raise DataError(f"data.root: directory {root!r} does not exist "
                        f"(set data.download: true to fetch MNIST there)")
    missing = [name for name in RAW_FILES if _find(root, name) is None]
    if missing:
        raise DataError(f"data.root: {raw_dir(root)!r} lacks {', '.join(missing)} "
                        f"(torchvision's MNIST layout is expected)")


def _read_idx(path: str, expected_ndim: int) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] != expected_ndim:
        raise DataError(f"{path} is not an IDX file of unsigned bytes with {expected_ndim} dimension(s)")
    header_len = 4 + 4 * expected_ndim
    if len(raw) < header_len:
        raise DataError(f"{path} is truncated (header)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(expected_ndim))
    count = int(np.prod(shape))
    if len(raw) != header_len + count:
        raise DataError(f"{path} is corrupt: header says {shape} ({count} bytes), "
                        f"file holds {len(raw) - header_len}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


def _download(root: str) -> None:
    import torchvision

    for train in (True, False):
        try:
            torchvision.datasets.MNIST(root=root, train=train, download=True)
        except Exception as exc:  # network errors come in many types
            raise DataError(f"data.root: downloading MNIST to {root!r} failed: {exc}") from None


def load_mnist(root: str, train: bool, limit: Optional[int] = None, download: bool = False) -> MnistSplit:
    """Load one split as tensors; ``limit`` keeps the first N images."""
    if download and any(_find(root, name) is None for name in RAW_FILES):
        _download(root)
    check_data_root(root)
    image_name, label_name = SPLIT_FILES[train]
    images = _read_idx(_find(root, image_name), 3)
    labels = _read_idx(_find(root, label_name), 1)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{_find(root, image_name)}: images are {images.shape[1:]}, not 28x28")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{raw_dir(root)}: {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise DataError(f"{_find(root, label_name)}: label {int(labels.max())} is not a digit")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    # Copy out of the read-only buffer so callers own writable tensors.
    return MnistSplit(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] → float32 [N, 1, 28, 28] in [0, 1], as torchvision's ToTensor gives."""
    return images.unsqueeze(1).to(torch.float32).div_(255.0)
