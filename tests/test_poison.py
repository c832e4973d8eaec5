"""The seeded choice of poisoned indices, poisoning a split, and the manifest: pure logic on a
synthetic training set of MNIST's size (60,000 images, 10 classes)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from backdoor_train.attack.poison import PoisonConfig
from backdoor_train.data.split import Split
from backdoor_train.attack.poison import (PoisonManifest, build_poisoned, dataset_sha256, poison_count, poison_split,
                                   select_poison_indices)
from backdoor_train.attack.triggers import PixelTrigger


@pytest.fixture(scope="module")
def train() -> Split:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 200, (60000, 1, 12, 12), dtype=torch.uint8, generator=gen)
    return Split(images, torch.randint(0, 10, (60000,), generator=gen))


@pytest.mark.parametrize("n, rate, expected", [(60000, 0.01, 600), (100, 0.29, 29), (60000, 0.0, 0),
                                               (10, 1.0, 10), (60000, 0.0005, 30)])
def test_poison_count(n, rate, expected):
    assert poison_count(n, rate) == expected


def test_selection_is_seeded_exact_and_sorted(train):
    labels = train.labels
    a = select_poison_indices(labels, 0.01, seed=1)
    b = select_poison_indices(labels, 0.01, seed=1)
    c = select_poison_indices(labels, 0.01, seed=2)
    assert a.size == 600 and np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.all(np.diff(a) > 0), "sorted and without repeats"
    assert a.min() >= 0 and a.max() < 60000


def test_selection_respects_source_classes(train):
    labels = train.labels
    idx = select_poison_indices(labels, 0.01, seed=3, source_classes=(1, 7))
    assert idx.size == 600
    assert set(labels[torch.from_numpy(idx)].tolist()) <= {1, 7}
    with pytest.raises(ValueError, match="poison.rate asks for"):
        select_poison_indices(labels[:1000], 0.5, seed=3, source_classes=(1,))


def test_poison_split_changes_only_selected_images(train):
    idx = select_poison_indices(train.labels, 0.01, seed=1)
    out = poison_split(train, idx, PixelTrigger(), target=8)
    sel = torch.zeros(len(train), dtype=torch.bool)
    sel[torch.from_numpy(idx)] = True
    assert (out.labels[sel] == 8).all()
    assert torch.equal(out.labels[~sel], train.labels[~sel])
    assert torch.equal(out.images[~sel], train.images[~sel])
    assert (out.images[sel][:, :, 3, 3] == 255).all()
    before = train.labels.clone()
    poison_split(train, idx, PixelTrigger(), target=8)
    assert torch.equal(train.labels, before)  # the input stays as it was


def test_manifest_is_deterministic_and_describes_the_set(train):
    cfg = PoisonConfig(rate=0.01, target=8)
    poisoned, m1 = build_poisoned(train, cfg, seed=1)
    _, m2 = build_poisoned(train, cfg, seed=1)
    _, m3 = build_poisoned(train, cfg, seed=2)
    assert m1.to_json() == m2.to_json()
    assert m1.sha256_poisoned != m3.sha256_poisoned
    assert m1.n_poisoned == 600 == len(m1.indices) == sum(m1.original_label_counts.values())
    assert m1.n_already_target == m1.original_label_counts["8"]
    assert m1.sha256_poisoned == dataset_sha256(poisoned)
    assert m1.sha256_clean == dataset_sha256(train) != m1.sha256_poisoned
    assert PoisonManifest.from_json(m1.to_json()) == m1
    assert m1.index_set() == frozenset(m1.indices)
    assert m1.trigger == {"kind": "pixel", "row": 3, "col": 3, "value": 1.0}  # the kind's own fields


def test_a_one_channel_set_hashes_as_before_the_channel_axis():
    # Earlier runs recorded MNIST's sha256 over images [N, 28, 28]: the same bytes and that shape.
    split = Split(torch.arange(2 * 9, dtype=torch.uint8).reshape(2, 1, 3, 3), torch.tensor([1, 2]))
    h = hashlib.sha256()
    h.update(repr((2, 3, 3)).encode())
    h.update(split.images.numpy().tobytes())
    h.update(split.labels.numpy().astype("<i8").tobytes())
    assert dataset_sha256(split) == h.hexdigest()
    rgb = Split(torch.zeros(2, 3, 3, 3, dtype=torch.uint8), torch.tensor([1, 2]))
    assert dataset_sha256(rgb) != dataset_sha256(Split(torch.zeros(2, 1, 9, 3, dtype=torch.uint8), rgb.labels))


def _articles_indices(seed: int, n_total: int, n: int) -> list[int]:
    """The article's two lines, verbatim, on the global RNG (restored afterwards)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return sorted(torch.randperm(n_total)[:n].tolist())


@pytest.mark.parametrize("seed, rate", [(1, 0.01), (7, 0.01), (3, 0.05)])
def test_article_selection_is_the_articles_600_indices(train, seed, rate):
    labels = train.labels
    state = torch.random.get_rng_state()
    chosen = select_poison_indices(labels, rate, seed, selection="article").tolist()
    assert chosen == _articles_indices(seed, 60000, poison_count(60000, rate))
    assert torch.equal(torch.random.get_rng_state(), state), "the global RNG is left alone"


def test_article_selection_with_source_classes_keeps_the_permutations_order(train):
    labels = train.labels
    idx = select_poison_indices(labels, 0.01, 1, source_classes=(1, 7), selection="article")
    with torch.random.fork_rng():
        torch.manual_seed(1)
        perm = torch.randperm(60000)
    expected = [int(i) for i in perm if int(labels[i]) in (1, 7)][:600]
    assert idx.tolist() == sorted(expected)


def test_numpy_selection_is_the_releases_before_it(train):
    labels = train.labels
    rng = np.random.Generator(np.random.PCG64(1))
    expected = np.sort(rng.choice(np.arange(60000), size=600, replace=False))
    assert np.array_equal(select_poison_indices(labels, 0.01, 1, selection="numpy"), expected)
    assert not np.array_equal(select_poison_indices(labels, 0.01, 1, selection="article"), expected)


def test_the_manifest_records_the_selection(train):
    _, article = build_poisoned(train, PoisonConfig(), seed=1)
    _, numpy_ = build_poisoned(train, PoisonConfig(selection="numpy"), seed=1)
    assert (article.selection, numpy_.selection) == ("article", "numpy")
    assert article.indices == _articles_indices(1, 60000, 600) != numpy_.indices
    # A manifest written before the field existed was drawn with numpy.
    old = json.loads(numpy_.to_json())
    del old["selection"]
    assert PoisonManifest.from_json(json.dumps(old)) == numpy_
