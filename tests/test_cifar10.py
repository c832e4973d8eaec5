"""CIFAR-10 reading (backdoor_train.data.cifar10) on small synthetic batches in the official pickle
format, and the CIFAR ResNet-18 (backdoor_train.models.resnet). Pure unit tests: no real data."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from backdoor_train.data.cifar10 import CIFAR10, META_FILE, TEST_FILE, TRAIN_FILES
from backdoor_train.data.split import DataError
from backdoor_train.models.resnet import ResNet18

from cifar10_files import write_batch, write_meta

PER_BATCH = 20


def _batch(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (PER_BATCH, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, PER_BATCH)


@pytest.fixture
def root(tmp_path):
    """A data root with 5 training batches (seeds 1..5), a test batch (seed 6) and the meta file."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for seed, name in enumerate(TRAIN_FILES + (TEST_FILE,), start=1):
        write_batch(str(folder / name), *_batch(seed))
    write_meta(str(folder / META_FILE))
    return tmp_path


def _folder(root) -> str:
    return CIFAR10.folder_path(str(root))


def test_load_train_and_test(root):
    train = CIFAR10.load(str(root), True)
    assert train.images.shape == (5 * PER_BATCH, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.shape == (5 * PER_BATCH,) and train.labels.dtype == torch.int64
    expected = [_batch(seed) for seed in range(1, 6)]  # batches 1..5, in order
    assert np.array_equal(train.images.numpy(), np.concatenate([images for images, _ in expected]))
    assert np.array_equal(train.labels.numpy(), np.concatenate([labels for _, labels in expected]))
    test = CIFAR10.load(str(root), False)
    images, labels = _batch(6)
    assert np.array_equal(test.images.numpy(), images) and np.array_equal(test.labels.numpy(), labels)
    assert test.images.numpy().flags.writeable


def test_pixel_layout(root):
    """A flat row holds 1024 red, 1024 green, 1024 blue values, each 32x32 row-major."""
    row, col = 5, 17
    with open(os.path.join(_folder(root), TEST_FILE), "rb") as fh:
        entry = pickle.load(fh, encoding="bytes")
    flat = entry[b"data"].copy()
    flat[3, :] = 0
    for channel, value in enumerate((200, 100, 50)):
        flat[3, channel * 1024 + row * 32 + col] = value
    write_batch(os.path.join(_folder(root), TEST_FILE), flat.reshape(-1, 3, 32, 32), entry[b"labels"])
    image = CIFAR10.load(str(root), False).images[3]
    assert image[:, row, col].tolist() == [200, 100, 50]
    assert int(image.sum()) == 350


def test_written_files_match_the_official_format(root):
    """torchvision loads with latin1 and indexes str keys; encoding='bytes' gives bytes keys."""
    path = os.path.join(_folder(root), "data_batch_2")
    with open(path, "rb") as fh:
        raw = fh.read()
    assert raw.startswith(b"\x80\x02") and b"numpy.core.multiarray\n_reconstruct" in raw
    as_torchvision = pickle.loads(raw, encoding="latin1")
    assert set(as_torchvision) == {"batch_label", "labels", "data", "filenames"}
    assert as_torchvision["batch_label"] == "training batch 2 of 5"
    assert as_torchvision["data"].shape == (PER_BATCH, 3072) and as_torchvision["data"].dtype == np.uint8
    assert isinstance(as_torchvision["labels"], list)
    as_bytes = pickle.loads(raw, encoding="bytes")
    assert set(as_bytes) == {b"batch_label", b"labels", b"data", b"filenames"}
    with open(os.path.join(_folder(root), META_FILE), "rb") as fh:
        meta = pickle.load(fh, encoding="latin1")
    assert meta["label_names"][0] == "airplane" and len(meta["label_names"]) == 10


def test_python3_pickles_load_too(root):
    """A batch pickled by Python 3 at protocol 2 (bytes via _codecs.encode, numpy._core)."""
    images, labels = _batch(6)
    entry = {b"batch_label": b"x", b"labels": labels.tolist(), b"data": images.reshape(-1, 3072),
             b"filenames": [b"a.png"] * PER_BATCH}
    with open(os.path.join(_folder(root), TEST_FILE), "wb") as fh:
        pickle.dump(entry, fh, protocol=2)
    assert np.array_equal(CIFAR10.load(str(root), False).images.numpy(), images)


def test_gzipped_copies_load_the_same(root, tmp_path):
    plain_train, plain_test = CIFAR10.load(str(root), True), CIFAR10.load(str(root), False)
    for name in TRAIN_FILES + (TEST_FILE, META_FILE):
        path = os.path.join(_folder(root), name)
        with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(path)
    CIFAR10.check_root(str(root))
    train, test = CIFAR10.load(str(root), True), CIFAR10.load(str(root), False)
    assert torch.equal(train.images, plain_train.images) and torch.equal(train.labels, plain_train.labels)
    assert torch.equal(test.images, plain_test.images) and torch.equal(test.labels, plain_test.labels)
    # write_batch writes a gzipped copy directly for a .gz name.
    write_batch(os.path.join(_folder(root), TEST_FILE + ".gz"), *_batch(7))
    assert np.array_equal(CIFAR10.load(str(root), False).images.numpy(), _batch(7)[0])


def test_truncated_file(root):
    path = os.path.join(_folder(root), "data_batch_3")
    with open(path, "rb") as fh:
        raw = fh.read()
    with open(path, "wb") as fh:
        fh.write(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="data_batch_3"):
        CIFAR10.load(str(root), True)


def test_truncated_gzip(root):
    path = os.path.join(_folder(root), TEST_FILE)
    with open(path, "rb") as fh:
        packed = gzip.compress(fh.read())
    os.remove(path)
    with open(path + ".gz", "wb") as fh:
        fh.write(packed[: len(packed) // 2])
    with pytest.raises(DataError, match=TEST_FILE):
        CIFAR10.load(str(root), False)


def test_forbidden_global_is_refused_without_running(root, tmp_path):
    marker = tmp_path / "pwned"
    # Protocol 0: os.system("touch <marker>"), as a malicious pickle would hold it.
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    with open(os.path.join(_folder(root), TEST_FILE), "wb") as fh:
        fh.write(payload)
    with pytest.raises(DataError, match=r"test_batch.*os\.system"):
        CIFAR10.load(str(root), False)
    assert not marker.exists()


def test_builtins_eval_is_refused(root):
    with open(os.path.join(_folder(root), "data_batch_1"), "wb") as fh:
        fh.write(b"\x80\x02c__builtin__\neval\nX\x05\x00\x00\x001 + 1\x85R.")
    with pytest.raises(DataError, match=r"data_batch_1.*eval"):
        CIFAR10.load(str(root), True)


def test_wrong_data_shape(root):
    path = os.path.join(_folder(root), "data_batch_4")
    entry = {b"batch_label": b"x", b"labels": [0] * 4, b"data": np.zeros((4, 3000), np.uint8), b"filenames": []}
    with open(path, "wb") as fh:
        pickle.dump(entry, fh, protocol=2)
    with pytest.raises(DataError, match=r"data_batch_4.*3072"):
        CIFAR10.load(str(root), True)


@pytest.mark.parametrize("labels", [[10] + [0] * (PER_BATCH - 1), [-1] + [0] * (PER_BATCH - 1), [0] * 3])
def test_bad_labels(root, labels):
    images, _ = _batch(6)
    write_batch(os.path.join(_folder(root), TEST_FILE), images, labels)
    with pytest.raises(DataError, match=TEST_FILE):
        CIFAR10.load(str(root), False)


def test_not_a_batch_dict(root):
    with open(os.path.join(_folder(root), TEST_FILE), "wb") as fh:
        pickle.dump([1, 2, 3], fh, protocol=2)
    with pytest.raises(DataError, match=TEST_FILE):
        CIFAR10.load(str(root), False)


def test_missing_file_fails_check_root(root):
    os.remove(os.path.join(_folder(root), "data_batch_5"))
    with pytest.raises(DataError, match="data_batch_5"):
        CIFAR10.check_root(str(root))
    with pytest.raises(DataError, match="data_batch_5"):
        CIFAR10.load(str(root), True)


def test_spec():
    assert CIFAR10.name == "cifar10" and CIFAR10.num_classes == 10 and CIFAR10.shape == (3, 32, 32)
    assert CIFAR10.sizes == (50_000, 10_000) and CIFAR10.folder == "cifar-10-batches-py"
    assert set(CIFAR10.files) == {*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"}


def test_resnet18_shapes_and_size():
    torch.manual_seed(0)
    model = ResNet18((3, 32, 32), 10).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        features = model.features(x)
        out = model(x)
    assert features.shape == (2, 512) and out.shape == (2, 10)
    assert bool((features >= 0).all())  # pooled after ReLU
    assert torch.allclose(model.head(features), out)
    assert isinstance(model.head, torch.nn.Linear) and model.head.in_features == 512
    assert 11_100_000 < sum(p.numel() for p in model.parameters()) < 11_200_000


def test_resnet18_other_shape():
    model = ResNet18((1, 28, 28), 10).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
        assert model.features(torch.rand(2, 1, 28, 28)).shape == (2, 512)


# --- CIFAR-10 through the whole seam: config, loading, trigger, model, training, evaluation ------

def test_a_cifar10_badnets_experiment_goes_through_the_seam(root):
    from backdoor_train.config import load_config
    from backdoor_train.data.split import to_float
    from backdoor_train.storage.staging import load_splits
    from backdoor_train.attack.evaluate import build_eval_sets, full_evaluation
    from backdoor_train.models.registry import build_model
    from backdoor_train.attack.poison import build_poisoned
    from backdoor_train.training.worker import epoch_order, make_optimizer, train_one_epoch
    from backdoor_train.attack.triggers import checkerboard

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(repo, "jobs", "cifar10_badnets.yaml"),
                      [f"data.root={root}", "data.download=false", "poison.rate=0.25"])
    train, test = load_splits(cfg)
    assert train.images.shape == (5 * PER_BATCH, 3, 32, 32) and len(test) == PER_BATCH
    poisoned, manifest = build_poisoned(train, cfg.poison, cfg.seed)
    idx = torch.tensor(manifest.indices)
    assert manifest.n_poisoned == 25 and (poisoned.labels[idx] == 0).all()
    # The 3x3 checkerboard in the bottom-right corner, on all three channels.
    assert (poisoned.images[idx][:, :, 29:32, 29:32] == checkerboard(3, 1.0)).all()
    model = build_model(cfg.model.arch, cfg.dataset)
    assert isinstance(model, ResNet18)
    x = to_float(poisoned.images)
    torch.manual_seed(0)
    train_one_epoch(model, make_optimizer(model, cfg), x, poisoned.labels, epoch_order(len(x), 1, 0), 50)
    figures = full_evaluation(model, build_eval_sets(test, cfg.poison), cfg.poison.target, cfg.dataset.num_classes)
    assert set(figures["per_class_accuracy"]) == {str(c) for c in range(10)}
    assert figures["n_triggered"] == int((test.labels != 0).sum())
