"""Finding the poisoned training samples from the poisoned model's penultimate activations.

Two classic methods, each applied per (possibly poisoned) training label:

* activation clustering (Chen et al., 2018): reduce the activations to a few whitened
  components, split them into two clusters with k-means (the best of ``restarts`` seeded
  starts), and flag the smaller cluster when it holds less than ``size_threshold`` of the
  class — poisoned samples form a small separate cluster. Whitening matters: the top
  components of a class are the directions its clean images vary most in, and without it the
  split follows them (measured: the 240 poisoned images of a 3x3 patch at 2% fell half in each
  cluster; whitened, 238 of 240 in the small one). It is the first step of the paper's ICA.
  When the poison is the majority of its target class (a 10% rate poisons ~52% of class 8)
  the premise fails and the clean images are the smaller cluster;
* spectral signatures (Tran et al., 2018): centre the activations, score each sample by its
  squared projection on the top singular vector, and flag the ``1.5 * rate_bound * N`` highest
  scores in the classes whose score tail stands out — poisoned samples leave a strong trace
  in that direction.

Both are scored against the poison manifest: precision, recall (= TPR) and FPR.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from backdoor_train.data import Split, to_float
from backdoor_train.model import unwrap


@torch.no_grad()
def penultimate_activations(model: nn.Module, split: Split, batch_size: int = 2000) -> torch.Tensor:
    model = unwrap(model).eval()
    out = [model.features(to_float(split.images[i:i + batch_size])) for i in range(0, len(split), batch_size)]
    return torch.cat(out)


def kmeans2(x: torch.Tensor, seed: int, iters: int = 50) -> torch.Tensor:
    """Labels (0/1) of a 2-means clustering, started k-means++ style, seeded."""
    gen = torch.Generator().manual_seed(seed)
    first = x[torch.randint(len(x), (1,), generator=gen)]
    d = ((x - first) ** 2).sum(1)
    second = x[torch.multinomial(d / d.sum(), 1, generator=gen)] if d.sum() > 0 else first
    centers = torch.cat([first, second])
    labels = torch.zeros(len(x), dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(x, centers).argmin(1)
        if torch.equal(new, labels) and _ > 0:
            break
        labels = new
        for k in range(2):
            if (labels == k).any():
                centers[k] = x[labels == k].mean(0)
    return labels


def best_of_kmeans2(x: torch.Tensor, seed: int, restarts: int) -> torch.Tensor:
    """``kmeans2`` from ``restarts`` seeds, keeping the split of least within-cluster variance
    (k-means finds local optima: one start can split a class along the wrong direction)."""
    best, best_cost = None, float("inf")
    for s in range(seed, seed + restarts):
        labels = kmeans2(x, s)
        cost = sum(float(((x[labels == k] - x[labels == k].mean(0)) ** 2).sum()) for k in (0, 1) if (labels == k).any())
        if cost < best_cost:
            best, best_cost = labels, cost
    return best


def activation_clustering(acts: torch.Tensor, labels: torch.Tensor, n_components: int = 10,
                          size_threshold: float = 0.35, seed: int = 0, restarts: int = 10) -> np.ndarray:
    flagged = []
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < 4:
            continue
        x = acts[idx].double()
        x = x - x.mean(0)
        # Whitened PCA to n_components (the paper's ICA whitens, then rotates; k-means only
        # needs the whitening).
        _, s, v = torch.linalg.svd(x, full_matrices=False)
        reduced = (x @ v[:n_components].T) / s[:n_components].clamp_min(1e-12)
        assignment = best_of_kmeans2(reduced, seed, restarts)
        sizes = torch.bincount(assignment, minlength=2)
        small = int(sizes.argmin())
        if sizes[small] / len(idx) < size_threshold:
            flagged.append(idx[assignment == small])
    return torch.cat(flagged).numpy() if flagged else np.empty(0, dtype=np.int64)


def spectral_signatures(acts: torch.Tensor, labels: torch.Tensor, rate_bound: float,
                        tail_ratio: float = 1.75) -> np.ndarray:
    """Per class: outlier scores along the top singular vector. The defender does not know the
    target class, and removing the top scores of every class mostly removes clean samples, so
    only classes whose score tail stands out (mean of the top scores over the median score,
    more than ``tail_ratio`` times the median of that figure across classes) lose their
    ``1.5 * rate_bound * N`` highest-scoring samples."""
    n_remove = int(round(1.5 * rate_bound * len(labels)))
    per_class = {}
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < 2 or n_remove == 0:
            continue
        x = acts[idx].double()
        x = x - x.mean(0)
        _, _, v = torch.linalg.svd(x, full_matrices=False)
        scores = (x @ v[0]) ** 2
        order = scores.argsort(descending=True)
        k = min(len(idx), n_remove)
        tail = float(scores[order[:max(1, k // 2)]].mean() / scores.median().clamp_min(1e-12))
        per_class[c] = (tail, idx[order[:k]])
    if not per_class:
        return np.empty(0, dtype=np.int64)
    typical = float(np.median([t for t, _ in per_class.values()]))
    flagged = [top for t, top in per_class.values() if t > tail_ratio * typical]
    return torch.cat(flagged).numpy() if flagged else np.empty(0, dtype=np.int64)


def score(flagged: np.ndarray, poisoned: frozenset[int], n_total: int) -> dict[str, Any]:
    flagged_set = set(int(i) for i in flagged)
    tp = len(flagged_set & poisoned)
    fp = len(flagged_set) - tp
    fn = len(poisoned) - tp
    tn = n_total - tp - fp - fn
    return {
        "flagged": len(flagged_set), "true_positives": tp, "false_positives": fp,
        "false_negatives": fn, "true_negatives": tn,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "tpr": tp / (tp + fn) if tp + fn else 0.0,
        "fpr": fp / (fp + tn) if fp + tn else 0.0,
        # What flagging the same number of samples at random would catch, for comparison.
        "chance_precision": len(poisoned) / n_total if n_total else 0.0,
    }


def detect(model: nn.Module, poisoned_train: Split, poisoned_indices: frozenset[int],
           rate_bound: float, seed: int = 0) -> dict[str, Any]:
    """Run both methods on ``poisoned_train`` (as the model was trained on it) and score them."""
    acts = penultimate_activations(model, poisoned_train)
    labels = poisoned_train.labels
    found = {
        "activation_clustering": activation_clustering(acts, labels, seed=seed),
        "spectral_signatures": spectral_signatures(acts, labels, rate_bound),
    }
    return {method: {**score(idx, poisoned_indices, len(labels)), "indices": sorted(int(i) for i in idx)}
            for method, idx in found.items()}
