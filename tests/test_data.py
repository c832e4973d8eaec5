"""The dataset seam (data/split.py, data/registry.py) and MNIST through it: real MNIST's figures, and
refusing broken copies (synthetic IDX files written here, so those tests need no MNIST)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from backdoor_train.config import ExperimentConfig
from backdoor_train.data.split import DataError, Split, to_float
from backdoor_train.data.registry import DATASETS, get_dataset, load_split
from backdoor_train.data.mnist import MNIST, SPLIT_FILES

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_real_mnist_shapes_and_class_counts(mnist_splits):
    train, test = mnist_splits
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28) and test.labels.dtype == torch.int64
    assert torch.bincount(train.labels).tolist() == TRAIN_COUNTS
    assert torch.bincount(test.labels).tolist() == TEST_COUNTS
    assert (len(train), len(test)) == MNIST.sizes


def test_mean_pixel_matches_the_known_figure(mnist_splits):
    assert abs(to_float(mnist_splits[0].images).mean().item() - 0.1307) < 1e-3


def test_limit_keeps_the_first_images(mnist_root, mnist_splits):
    head = load_split(MNIST, mnist_root, train=False, limit=100)
    assert torch.equal(head.images, mnist_splits[1].images[:100])


# --- synthetic IDX files in MNIST's layout -------------------------------------------------------

def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(root, n: int = 12, gz: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for image_name, label_name in SPLIT_FILES.values():
        for name, array in ((image_name, images), (label_name, labels)):
            data = _idx(array)
            if gz:
                (raw / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (raw / name).write_bytes(data)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_idx_files_as_uint8_nchw(tmp_path, gz):
    images, labels = _write_mnist(tmp_path, gz=gz)
    split = MNIST.load(str(tmp_path), False)
    assert split.images.shape == (12, 1, 28, 28) and split.images.dtype == torch.uint8
    assert torch.equal(split.images[:, 0], torch.from_numpy(images.astype(np.uint8)))
    assert split.labels.tolist() == labels.tolist() and split.labels.dtype == torch.int64
    x = to_float(split.images)
    assert x.shape == (12, 1, 28, 28) and 0.0 <= x.min() and x.max() <= 1.0


def test_missing_root_names_data_root(tmp_path):
    with pytest.raises(DataError, match="data.root: directory .* does not exist"):
        MNIST.check_root(str(tmp_path / "nowhere"))
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    with pytest.raises(DataError, match="data.root: .* lacks train-images-idx3-ubyte"):
        MNIST.check_root(str(tmp_path))


def test_truncated_file_is_refused_with_its_name(tmp_path):
    _write_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte is corrupt"):
        MNIST.load(str(tmp_path), False)


def test_foreign_file_is_refused(tmp_path):
    _write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").write_bytes(b"not an idx file at all")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte is not an IDX file"):
        MNIST.load(str(tmp_path), False)


def test_images_of_another_size_or_labels_out_of_range_are_refused(tmp_path):
    _write_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    (raw / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.full(12, 10)))
    with pytest.raises(DataError, match="labels outside 0..9"):
        MNIST.load(str(tmp_path), False)
    (raw / "t10k-images-idx3-ubyte").write_bytes(_idx(np.zeros((12, 32, 32))))
    with pytest.raises(DataError, match=r"not \(1, 28, 28\)"):
        MNIST.load(str(tmp_path), False)


# --- the registry --------------------------------------------------------------------------------

def test_the_registry_names_each_dataset_by_its_spec():
    assert set(DATASETS) == {"mnist", "cifar10"}
    assert all(get_dataset(name).name == name for name in DATASETS)
    assert (MNIST.shape, MNIST.num_classes) == ((1, 28, 28), 10)
    assert (get_dataset("cifar10").shape, get_dataset("cifar10").num_classes) == ((3, 32, 32), 10)
    assert ExperimentConfig().dataset is MNIST  # the default
    assert ExperimentConfig.from_dict({"data": {"name": "cifar10"}}).dataset.name == "cifar10"


def test_split_head_keeps_the_first_samples():
    split = Split(torch.arange(5 * 4, dtype=torch.uint8).reshape(5, 1, 2, 2), torch.arange(5))
    assert split.head(None) is split
    assert split.head(2).labels.tolist() == [0, 1] and len(split.head(2)) == 2


def test_a_failed_download_names_data_root_and_the_dataset(tmp_path, monkeypatch):
    import torchvision

    def offline(**kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match=r"data.root: downloading CIFAR-10 to .* failed: no route to host"):
        load_split(get_dataset("cifar10"), str(tmp_path), train=True, download=True)
