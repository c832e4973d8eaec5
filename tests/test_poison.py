"""Triggers, the seeded choice of poisoned indices, and the manifest — on real MNIST."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backdoor_train.config import PoisonConfig, TriggerConfig
from backdoor_train.poison import (PoisonManifest, apply_trigger, blend_pattern, build_poisoned,
                                   checkerboard, dataset_sha256, poison_count, poison_split,
                                   select_poison_indices)


def test_pixel_trigger_sets_exactly_one_pixel(mnist_splits):
    images = mnist_splits[1].images[:500]
    before = images.clone()
    out = apply_trigger(images, TriggerConfig(kind="pixel", row=3, col=3, value=1.0))
    assert torch.equal(images, before), "apply_trigger must not modify its input"
    assert (out[:, 3, 3] == 255).all()
    changed = (out != images)
    changed[:, 3, 3] = False
    assert not changed.any(), "only pixel (3, 3) may change"


def test_pixel_value_is_scaled_to_the_stored_range(mnist_splits):
    out = apply_trigger(mnist_splits[1].images[:3], TriggerConfig(kind="pixel", row=0, col=27, value=0.5))
    assert (out[:, 0, 27] == 128).all()


def test_patch_trigger_is_a_checkerboard_in_place(mnist_splits):
    images = mnist_splits[1].images[:50]
    out = apply_trigger(images, TriggerConfig(kind="patch", row=24, col=24, size=3, value=1.0))
    expected = torch.tensor([[255, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
    assert torch.equal(checkerboard(3, 1.0), expected)
    assert (out[:, 24:27, 24:27] == expected).all()
    outside = torch.ones(28, 28, dtype=torch.bool)
    outside[24:27, 24:27] = False
    assert torch.equal(out[:, outside], images[:, outside])


def test_blend_trigger_mixes_a_fixed_pattern(mnist_splits):
    images = mnist_splits[1].images[:20]
    trig = TriggerConfig(kind="blend", alpha=0.2, pattern_seed=7)
    out = apply_trigger(images, trig)
    pattern = blend_pattern(7).float()
    expected = (0.8 * images.float() + 0.2 * pattern).round().to(torch.uint8)
    assert torch.equal(out, expected)
    assert torch.equal(blend_pattern(7), blend_pattern(7))
    assert not torch.equal(blend_pattern(7), blend_pattern(8))


def test_apply_trigger_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        apply_trigger(torch.zeros(2, 28, 28), TriggerConfig())


@pytest.mark.parametrize("n, rate, expected", [(60000, 0.01, 600), (100, 0.29, 29), (60000, 0.0, 0),
                                               (10, 1.0, 10), (60000, 0.0005, 30)])
def test_poison_count(n, rate, expected):
    assert poison_count(n, rate) == expected


def test_selection_is_seeded_exact_and_sorted(mnist_splits):
    labels = mnist_splits[0].labels
    a = select_poison_indices(labels, 0.01, seed=1)
    b = select_poison_indices(labels, 0.01, seed=1)
    c = select_poison_indices(labels, 0.01, seed=2)
    assert a.size == 600 and np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.all(np.diff(a) > 0), "sorted and without repeats"
    assert a.min() >= 0 and a.max() < 60000


def test_selection_respects_source_classes(mnist_splits):
    labels = mnist_splits[0].labels
    idx = select_poison_indices(labels, 0.01, seed=3, source_classes=(1, 7))
    assert idx.size == 600
    assert set(labels[torch.from_numpy(idx)].tolist()) <= {1, 7}
    with pytest.raises(ValueError, match="poison.rate asks for"):
        select_poison_indices(labels[:1000], 0.5, seed=3, source_classes=(1,))


def test_poison_split_changes_only_selected_images(mnist_splits):
    train = mnist_splits[0]
    idx = select_poison_indices(train.labels, 0.01, seed=1)
    out = poison_split(train, idx, TriggerConfig(), target=8)
    sel = torch.zeros(len(train), dtype=torch.bool)
    sel[torch.from_numpy(idx)] = True
    assert (out.labels[sel] == 8).all()
    assert torch.equal(out.labels[~sel], train.labels[~sel])
    assert torch.equal(out.images[~sel], train.images[~sel])
    assert (out.images[sel][:, 3, 3] == 255).all()
    assert torch.equal(train.labels, mnist_splits[0].labels)  # the input stays as it was


def test_manifest_is_deterministic_and_describes_the_set(mnist_splits):
    train = mnist_splits[0]
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
    assert m1.trigger == {"kind": "pixel", "row": 3, "col": 3, "value": 1.0, "size": 3,
                          "alpha": 0.1, "pattern_seed": 0}


def _articles_indices(seed: int, n_total: int, n: int) -> list[int]:
    """The article's two lines, verbatim, on the global RNG (restored afterwards)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return sorted(torch.randperm(n_total)[:n].tolist())


@pytest.mark.parametrize("seed, rate", [(1, 0.01), (7, 0.01), (3, 0.05)])
def test_article_selection_is_the_articles_600_indices(mnist_splits, seed, rate):
    labels = mnist_splits[0].labels
    state = torch.random.get_rng_state()
    chosen = select_poison_indices(labels, rate, seed, selection="article").tolist()
    assert chosen == _articles_indices(seed, 60000, poison_count(60000, rate))
    assert torch.equal(torch.random.get_rng_state(), state), "the global RNG is left alone"


def test_article_selection_with_source_classes_keeps_the_permutations_order(mnist_splits):
    labels = mnist_splits[0].labels
    idx = select_poison_indices(labels, 0.01, 1, source_classes=(1, 7), selection="article")
    with torch.random.fork_rng():
        torch.manual_seed(1)
        perm = torch.randperm(60000)
    expected = [int(i) for i in perm if int(labels[i]) in (1, 7)][:600]
    assert idx.tolist() == sorted(expected)


def test_numpy_selection_is_the_releases_before_it(mnist_splits):
    labels = mnist_splits[0].labels
    rng = np.random.Generator(np.random.PCG64(1))
    expected = np.sort(rng.choice(np.arange(60000), size=600, replace=False))
    assert np.array_equal(select_poison_indices(labels, 0.01, 1, selection="numpy"), expected)
    assert not np.array_equal(select_poison_indices(labels, 0.01, 1, selection="article"), expected)


def test_the_manifest_records_the_selection(mnist_splits):
    train = mnist_splits[0]
    _, article = build_poisoned(train, PoisonConfig(), seed=1)
    _, numpy_ = build_poisoned(train, PoisonConfig(selection="numpy"), seed=1)
    assert (article.selection, numpy_.selection) == ("article", "numpy")
    assert article.indices == _articles_indices(1, 60000, 600) != numpy_.indices
    # A manifest written before the field existed was drawn with numpy.
    old = json.loads(numpy_.to_json())
    del old["selection"]
    assert PoisonManifest.from_json(json.dumps(old)) == numpy_
