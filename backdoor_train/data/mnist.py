"""MNIST in torchvision's layout: ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
(or their ``.gz``), as ``torchvision.datasets.MNIST(root=...)`` leaves them.

The IDX files are parsed straight into tensors — no per-item PIL conversion — and checked,
so a truncated or foreign file fails with its name instead of producing garbage.
"""

from __future__ import annotations

import numpy as np
import torch

from backdoor_train.data.split import DataError, DatasetSpec, Split, read_raw

SPLIT_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_UBYTE = 0x08


def read_idx(path: str, expected_ndim: int) -> np.ndarray:
    raw = read_raw(path)
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


def load(root: str, train: bool) -> Split:
    """One split as uint8 [N, 1, 28, 28] images and int64 labels."""
    MNIST.check_root(root)
    image_path, label_path = (MNIST.find(root, name) for name in SPLIT_FILES[train])
    images = read_idx(image_path, 3)
    labels = read_idx(label_path, 1)
    # Copy out of the read-only buffer so callers own writable tensors.
    split = Split(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    return MNIST.check_split(split, image_path)


MNIST = DatasetSpec(
    name="mnist", title="MNIST", num_classes=10, shape=(1, 28, 28), sizes=(60_000, 10_000), folder="MNIST/raw",
    files=tuple(name for pair in SPLIT_FILES.values() for name in pair), load=load,
    torchvision_class="MNIST")
