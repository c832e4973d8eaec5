"""MNIST for the images (the stage-mnist Job uploads it): the four .gz files of torchvision's
layout in /home/ray/mnist/MNIST/raw, each checked to be a whole IDX file of MNIST's shape.

    python fetch_mnist.py download   fetch them with torchvision (needs the internet; torchvision
                                     checks the archives' MD5s)
    python fetch_mnist.py context    they were copied from the build context (docker/mnist/):
                                     check them, fetch nothing (a recompressed copy has other
                                     archive MD5s than the official one, the same contents)
"""

import gzip
import os
import struct
import sys

ROOT = "/home/ray/mnist"
RAW = os.path.join(ROOT, "MNIST", "raw")
# file: IDX magic (2051 images, 2049 labels) and dimensions
EXPECTED = {
    "train-images-idx3-ubyte.gz": (2051, (60000, 28, 28)),
    "train-labels-idx1-ubyte.gz": (2049, (60000,)),
    "t10k-images-idx3-ubyte.gz": (2051, (10000, 28, 28)),
    "t10k-labels-idx1-ubyte.gz": (2049, (10000,)),
}


def problem(name: str) -> str:
    """What is wrong with ``name`` in RAW, or "" when it is a whole IDX file as expected."""
    magic, dims = EXPECTED[name]
    path = os.path.join(RAW, name)
    if not os.path.isfile(path):
        return f"{name} missing"
    try:
        with gzip.open(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        return f"{name} unreadable ({exc})"
    header = 4 + 4 * len(dims)
    if len(data) < header or struct.unpack(">I", data[:4])[0] != magic or \
            struct.unpack(f">{len(dims)}I", data[4:header]) != dims:
        return f"{name} is not an MNIST IDX file of shape {dims}"
    count = 1
    for d in dims:
        count *= d
    if len(data) != header + count:
        return f"{name} holds {len(data) - header} bytes of data, not {count}"
    return ""


mode = sys.argv[1] if len(sys.argv) > 1 else ""
if mode not in ("download", "context"):
    sys.exit(f"MNIST_SOURCE must be 'download' or 'context' (got {mode!r})")
if mode == "download":
    from torchvision.datasets import MNIST

    for train in (True, False):
        MNIST(ROOT, train=train, download=True)
problems = [p for p in map(problem, EXPECTED) if p]
if problems:
    hint = " (copy the .gz files of torchvision's MNIST/raw into docker/mnist/MNIST/raw)" if mode == "context" else ""
    sys.exit(f"MNIST_SOURCE={mode}: {'; '.join(problems)} in {RAW}{hint}")
print(f"MNIST ({mode}): {len(EXPECTED)} files checked in {RAW}")
