"""Data poisoning: a seeded choice of indices, stamping the trigger (attack/triggers.py) on them,
and the manifest that records it.

Everything works on uint8 image tensors [N, C, H, W] (the stored values) and returns new
tensors; nothing is modified in place. The choice of poisoned indices depends only on
the labels, the rate, the source-class filter and the seed, so every Ray worker can rebuild
the same poisoned set and check it against the manifest's sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from backdoor_train.checks import check
from backdoor_train.data.split import Split
from backdoor_train.attack.triggers import PixelTrigger, Trigger, apply_trigger


# How the poisoned images are drawn (below): "article" is the article's own
# torch.manual_seed(seed); torch.randperm(N)[:n], "numpy" numpy's PCG64 choice (before 0.2).
SELECTIONS = ("article", "numpy")


@dataclass(frozen=True)
class PoisonConfig:
    rate: float = 0.01
    target: int = 8
    trigger: Trigger = field(default_factory=PixelTrigger)
    # Poison only images of these true classes (empty: any class, the article's setting).
    source_classes: tuple[int, ...] = ()
    selection: str = "article"

    def __post_init__(self) -> None:
        check(self.selection in SELECTIONS,
               f"poison.selection must be one of {list(SELECTIONS)} (got {self.selection!r})")
        check(0.0 <= self.rate <= 1.0, f"poison.rate must be in [0, 1] (got {self.rate})")
        check(self.target >= 0, f"poison.target must be a class, >= 0 (got {self.target})")
        for c in self.source_classes:
            check(c >= 0 and c != self.target,
                  f"poison.source_classes must hold classes other than poison.target (got {c})")
        check(len(set(self.source_classes)) == len(self.source_classes), "poison.source_classes must not repeat")


def poison_count(n_total: int, rate: float) -> int:
    # The article's int(m * p); the epsilon keeps 0.29 * 100 = 28.999… from becoming 28.
    return math.floor(n_total * rate + 1e-9)


def select_poison_indices(labels: torch.Tensor, rate: float, seed: int,
                          source_classes: tuple[int, ...] = (), selection: str = "article") -> np.ndarray:
    """Sorted indices of the images to poison: ``floor(N * rate)`` drawn without replacement.

    Candidates are all images, or only those whose true label is in ``source_classes``.

    ``article``: the article's ``torch.manual_seed(seed); torch.randperm(N)[:n]``, on a private
    generator (the global RNG is left alone). With ``source_classes``, the first ``n`` of that
    same permutation whose label is a source class; without, exactly the article's indices.
    ``numpy``: ``n`` candidates chosen by numpy's PCG64 seeded with ``seed`` (releases before 0.2).
    """
    labels_np = labels.numpy()
    is_candidate = (np.isin(labels_np, np.asarray(source_classes)) if source_classes
                    else np.ones(labels_np.shape[0], dtype=bool))
    n = poison_count(labels_np.shape[0], rate)
    if n > int(is_candidate.sum()):
        raise ValueError(f"poison.rate asks for {n} images but only {int(is_candidate.sum())} are of "
                         f"poison.source_classes {list(source_classes)}")
    if selection == "article":
        perm = torch.randperm(labels_np.shape[0], generator=torch.Generator().manual_seed(seed)).numpy()
        chosen = perm[is_candidate[perm]][:n]
    elif selection == "numpy":
        rng = np.random.Generator(np.random.PCG64(seed))
        chosen = rng.choice(np.flatnonzero(is_candidate), size=n, replace=False)
    else:  # config validation makes this unreachable for user input
        raise ValueError(f"unknown poison.selection {selection!r}")
    return np.sort(chosen).astype(np.int64)


def poison_split(split: Split, indices: np.ndarray, trigger: Trigger, target: int) -> Split:
    """A new split where the images at ``indices`` carry the trigger and have label ``target``."""
    idx = torch.from_numpy(indices)
    images = split.images.clone()
    labels = split.labels.clone()
    if idx.numel():
        images[idx] = apply_trigger(split.images[idx], trigger)
        labels[idx] = target
    return Split(images, labels)


def dataset_sha256(split: Split) -> str:
    h = hashlib.sha256()
    shape = tuple(split.images.shape)
    # A one-channel set hashes its shape as [N, H, W], as before images carried a channel axis:
    # the MNIST hashes recorded in earlier runs' manifests stay valid.
    h.update(repr(shape[:1] + shape[2:] if shape[1] == 1 else shape).encode())
    h.update(split.images.contiguous().numpy().tobytes())
    h.update(split.labels.to(torch.int64).contiguous().numpy().astype("<i8").tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class PoisonManifest:
    """What was poisoned and how; identical for identical inputs (no timestamps)."""

    seed: int
    rate: float
    target: int
    trigger: dict[str, Any]
    source_classes: list[int]
    n_total: int
    n_poisoned: int
    n_already_target: int
    original_label_counts: dict[str, int]
    indices: list[int]
    sha256_clean: str
    sha256_poisoned: str
    selection: str = "numpy"  # manifests written before poison.selection existed drew with numpy

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PoisonManifest":
        return cls(**json.loads(text))

    def index_set(self) -> frozenset[int]:
        return frozenset(self.indices)


def build_poisoned(split: Split, poison: PoisonConfig, seed: int) -> tuple[Split, PoisonManifest]:
    """Poison ``split`` as the config says and describe it in a manifest."""
    indices = select_poison_indices(split.labels, poison.rate, seed, poison.source_classes, poison.selection)
    poisoned = poison_split(split, indices, poison.trigger, poison.target)
    original = split.labels[torch.from_numpy(indices)].numpy()
    classes = int(split.labels.max()) + 1 if len(split) else 0
    counts = np.bincount(original, minlength=classes)
    manifest = PoisonManifest(
        seed=seed,
        rate=poison.rate,
        target=poison.target,
        trigger=dataclasses.asdict(poison.trigger),
        source_classes=list(poison.source_classes),
        n_total=len(split),
        n_poisoned=int(indices.size),
        n_already_target=int((original == poison.target).sum()),
        original_label_counts={str(c): int(counts[c]) for c in range(classes)},
        indices=[int(i) for i in indices],
        sha256_clean=dataset_sha256(split),
        sha256_poisoned=dataset_sha256(poisoned),
        selection=poison.selection,
    )
    return poisoned, manifest
