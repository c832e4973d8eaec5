"""Reading real MNIST from torchvision's layout, and refusing broken copies."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from backdoor_train.data import DataError, check_data_root, load_mnist, to_float

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_real_mnist_shapes_and_class_counts(mnist_splits):
    train, test = mnist_splits
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 28, 28) and test.labels.dtype == torch.int64
    assert torch.bincount(train.labels).tolist() == TRAIN_COUNTS
    assert torch.bincount(test.labels).tolist() == TEST_COUNTS
    x = to_float(train.images[:1000])
    assert x.shape == (1000, 1, 28, 28) and 0.0 <= x.min() and x.max() <= 1.0


def test_mean_pixel_matches_the_known_figure(mnist_splits):
    assert abs(to_float(mnist_splits[0].images).mean().item() - 0.1307) < 1e-3


def test_limit_keeps_the_first_images(mnist_root, mnist_splits):
    head = load_mnist(mnist_root, train=False, limit=100)
    assert torch.equal(head.images, mnist_splits[1].images[:100])


def _copy_raw(mnist_root, tmp_path):
    dest = tmp_path / "MNIST" / "raw"
    dest.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
                 "train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        shutil.copy(os.path.join(mnist_root, "MNIST", "raw", name), dest / name)
    return dest


def test_missing_root_names_data_root(tmp_path):
    with pytest.raises(DataError, match="data.root: directory .* does not exist"):
        check_data_root(str(tmp_path / "nowhere"))
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    with pytest.raises(DataError, match="data.root: .* lacks train-images-idx3-ubyte"):
        check_data_root(str(tmp_path))


def test_truncated_file_is_refused_with_its_name(mnist_root, tmp_path):
    raw = _copy_raw(mnist_root, tmp_path)
    path = raw / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte is corrupt"):
        load_mnist(str(tmp_path), train=False)


def test_foreign_file_is_refused(mnist_root, tmp_path):
    raw = _copy_raw(mnist_root, tmp_path)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"not an idx file at all")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte is not an IDX file"):
        load_mnist(str(tmp_path), train=False)


def test_gzip_only_copy_is_read(mnist_root, tmp_path, mnist_splits):
    dest = tmp_path / "MNIST" / "raw"
    dest.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
                 "train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        shutil.copy(os.path.join(mnist_root, "MNIST", "raw", name + ".gz"), dest / (name + ".gz"))
    test = load_mnist(str(tmp_path), train=False)
    assert torch.equal(test.labels, mnist_splits[1].labels)
