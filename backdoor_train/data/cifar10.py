"""CIFAR-10 in torchvision's layout: ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,
batches.meta}`` (or their ``.gz``), as ``torchvision.datasets.CIFAR10(root=...)`` leaves them.

The batches are the official archive's Python 2 pickles. They are read with a restricted
unpickler that resolves only numpy's array reconstruction, so a tampered file cannot run code,
and each batch is checked, so a truncated or foreign file fails with its name. (The tests
write files in the same format: tests/cifar10_files.py.)
"""

from __future__ import annotations

import codecs
import io
import pickle

import numpy as np
import torch

from backdoor_train.data.split import DataError, DatasetSpec, Split, read_raw

try:  # numpy >= 2 moved numpy.core to numpy._core (the old name still warns or is gone)
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_PIXELS = 3 * 32 * 32  # a row of b'data': 1024 red, 1024 green, 1024 blue, each row-major

# The only globals the official pickles (and write_batch's) name. Python 2 wrote numpy's
# reconstructor as numpy.core.multiarray; numpy 2 writes numpy._core.multiarray; Python 3 at
# protocol 2 writes bytes as _codecs.encode(str, "latin1").
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: str) -> None:
        super().__init__(io.BytesIO(data), encoding="latin1")  # as torchvision reads them
        self.path = path

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DataError(f"{self.path} is not a CIFAR-10 batch: its pickle names {module}.{name}") from None


def read_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as (uint8 [n, 3072] rows, int64 [n] labels), checked."""
    raw = read_raw(path)
    try:
        entry = _SafeUnpickler(raw, path).load()
    except DataError:
        raise
    except Exception as exc:  # truncated or foreign pickles fail in many ways
        raise DataError(f"{path} is not a readable CIFAR-10 batch: {type(exc).__name__}: {exc}") from None
    if not isinstance(entry, dict):
        raise DataError(f"{path} holds a {type(entry).__name__}, not a CIFAR-10 batch dict")
    # latin1 gives str keys for Python 2's files, bytes keys for Python 3's protocol-2 bytes.
    entry = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in entry.items()}
    data, labels = entry.get("data"), entry.get("labels")
    if not isinstance(data, np.ndarray) or not isinstance(labels, (list, tuple, np.ndarray)):
        raise DataError(f"{path} lacks a numpy 'data' array or a 'labels' list")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise DataError(f"{path}: data is {data.dtype} {tuple(data.shape)}, not uint8 [n, {_PIXELS}]")
    try:
        labels = np.asarray(labels)
    except Exception as exc:
        raise DataError(f"{path}: labels are not a list of integers ({exc})") from None
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {data.shape[0]} images but labels of shape {tuple(labels.shape)}")
    if labels.size and (labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= len(LABEL_NAMES)):
        raise DataError(f"{path}: labels are not integers in 0..{len(LABEL_NAMES) - 1}")
    return data, labels.astype(np.int64)


def load(root: str, train: bool) -> Split:
    """One split as uint8 [N, 3, 32, 32] images and int64 labels (training: batches 1..5 in order)."""
    CIFAR10.check_root(root)
    batches = [read_batch(CIFAR10.find(root, name)) for name in (TRAIN_FILES if train else (TEST_FILE,))]
    # concatenate copies, so callers own writable arrays even for the single test batch.
    images = np.concatenate([data for data, _ in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([labels for _, labels in batches])
    split = Split(torch.from_numpy(images), torch.from_numpy(labels))
    return CIFAR10.check_split(split, CIFAR10.folder_path(root))


CIFAR10 = DatasetSpec(
    name="cifar10", title="CIFAR-10", num_classes=10, shape=(3, 32, 32), sizes=(50_000, 10_000),
    folder="cifar-10-batches-py",
    files=TRAIN_FILES + (TEST_FILE, META_FILE), load=load,
    torchvision_class="CIFAR10")
