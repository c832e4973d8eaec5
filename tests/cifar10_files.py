"""CIFAR-10 batch files in exactly the official archive's format, written for the tests (there
is no CIFAR-10 on the test machines and no internet): Python 2's protocol-2 pickles of dicts
with b'batch_label', b'labels', b'data' (uint8 [n, 3072]) and b'filenames'."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct

import numpy as np

from backdoor_train.data.cifar10 import LABEL_NAMES

try:  # numpy >= 2 moved numpy.core to numpy._core
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct

_PIXELS = 3 * 32 * 32


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2 wrote the official files: bytes become Python 2 ``str``
    (so torchvision's latin1 load sees str keys, as with the real files) and numpy's
    reconstructor keeps its numpy.core name."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]))
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)))
        self.write(obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes

    def save_global(self, obj, name=None) -> None:
        if obj is _reconstruct:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def _write(path: str, entry: dict) -> None:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(entry)
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as fh:  # .gz: a staged copy
        fh.write(buffer.getvalue())


def write_batch(path: str, images, labels, batch_label: bytes | None = None) -> None:
    """Write uint8 [n, 3, 32, 32] ``images`` and ``labels`` as an official batch file."""
    images = np.ascontiguousarray(np.asarray(images), dtype=np.uint8).reshape(-1, _PIXELS)
    labels = [int(label) for label in np.asarray(labels).reshape(-1)]
    if batch_label is None:
        name = os.path.basename(path)
        batch_label = (b"testing batch 1 of 1" if name.startswith("test") else
                       b"training batch %s of 5" % name.split(".")[0].rsplit("_", 1)[-1].encode())
    _write(path, {b"batch_label": batch_label, b"labels": labels, b"data": images,
                  b"filenames": [b"image_%05d.png" % i for i in range(len(labels))]})


def write_meta(path: str) -> None:
    """Write ``batches.meta`` as the official archive has it."""
    _write(path, {b"num_cases_per_batch": 10_000, b"label_names": [name.encode() for name in LABEL_NAMES],
                  b"num_vis": _PIXELS})
