"""Finding the poisoned training samples from the poisoned model's penultimate activations.

Two classic methods, each applied per (possibly poisoned) training label, each helped by the
defender's clean images of that label (the ones Neural Cleanse and STRIP use too):

* activation clustering (Chen et al., 2018): reduce the activations to a few whitened
  components, split them into two clusters with k-means (the best of ``restarts`` seeded
  starts). Whitening matters: the top components of a class are the directions its clean
  images vary most in, and without it the split follows them (measured: the 240 poisoned
  images of a 3x3 patch at 2% fell half in each cluster; whitened, 238 of 240 in one). The
  paper flags the smaller cluster, which assumes the poison is a minority of its label; at a
  10% rate it is ~52% of class 8 and that rule flagged the clean images. Here the defender's
  clean images of the label decide instead: each goes to its nearest cluster, and a cluster
  they avoid (under ``ref_ratio`` of its share of the training images) is flagged. It is the
  paper's exclusionary reclassification (are a cluster's images like clean ones of the
  label?) without a retraining;
* spectral signatures (Tran et al., 2018): score each sample by its squared projection on the
  top singular vector, and flag the ``1.5 * rate_bound * N`` highest scores in the labels
  whose score tail stands out. Centred on the label's own mean, the 52% poison of a 10% rate
  and the clean half project equally far (the scores cannot tell them apart), and the
  directions clean images vary most in hide a small poison (on a 3x3 patch at 2%, class 8's
  top direction was the clean images' own: 491 of the 1,200 poisoned images among its 1,800
  top scores). As in SPECTRE (Hayase et al., 2021), the activations are centred and whitened
  by clean statistics first, here the defender's clean images' mean and covariance (shrunk
  toward a multiple of the identity, as ~200 images estimate a 512-dimensional covariance):
  clean images then vary alike in every direction and the poison's offset is the top one.

Both are scored against the poison manifest: precision, recall (= TPR) and FPR. ``ActivationDefense``
runs both as one defense (defenses/base.py's ``PoisonDetector``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from backdoor_train.data.split import Split, to_float
from backdoor_train.defenses.base import Block, DefenseContext, Detection, Plot, PoisonDetector, score
from backdoor_train.models.registry import unwrap

__all__ = ["ActivationDefense", "activation_clustering", "clean_whitened", "detect", "find_poison", "kmeans2",
           "penultimate_activations", "score", "spectral_signatures"]

REF_RATIO = 0.2  # activation clustering: a cluster the clean images avoid this much is flagged
TAIL_RATIO = 3.0  # spectral signatures: a label whose tail is this many times the median is flagged
SHRINKAGE = 0.1  # of the clean covariance toward the identity times its mean eigenvalue


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


def activation_clustering(acts: torch.Tensor, labels: torch.Tensor, clean: torch.Tensor,
                          clean_labels: torch.Tensor, n_components: int = 10, ref_ratio: float = REF_RATIO,
                          seed: int = 0, restarts: int = 10) -> tuple[np.ndarray, dict[int, float]]:
    """(the flagged indices, per label the lower cluster's share of clean images over its share
    of training images: near 0 for a cluster of poison, near 1 for a split of clean images)."""
    flagged, ratios = [], {}
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        ref = clean[clean_labels == c].double()
        if len(idx) < 4 or len(ref) == 0:  # no clean image of the label: nothing to compare with
            continue
        x = acts[idx].double()
        mean = x.mean(0)
        # Whitened PCA to n_components (the paper's ICA whitens, then rotates; k-means only
        # needs the whitening).
        _, s, v = torch.linalg.svd(x - mean, full_matrices=False)
        project = v[:n_components].T / s[:n_components].clamp_min(1e-12)
        reduced = (x - mean) @ project
        assignment = best_of_kmeans2(reduced, seed, restarts)
        centers = torch.stack([reduced[assignment == k].mean(0) if (assignment == k).any() else reduced.mean(0)
                               for k in (0, 1)])
        nearest = torch.cdist((ref - mean) @ project, centers).argmin(1)
        share = torch.bincount(assignment, minlength=2).double() / len(idx)
        ref_share = torch.bincount(nearest, minlength=2).double() / len(ref)
        ratio = ref_share / share.clamp_min(1e-12)
        avoided = int(ratio.argmin())
        ratios[c] = round(float(ratio[avoided]), 4)
        if ratio[avoided] < ref_ratio:
            flagged.append(idx[assignment == avoided])
    return (torch.cat(flagged).numpy() if flagged else np.empty(0, dtype=np.int64)), ratios


def clean_whitened(x: torch.Tensor, ref: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """``x`` centred on the mean of ``ref`` and whitened by its covariance, shrunk toward
    ``shrinkage`` times its mean eigenvalue (a fixed-intensity shrinkage: a few hundred clean
    images of a label estimate a 512-dimensional covariance, and without it the smallest
    eigenvalues, near 0, would blow their directions up)."""
    mean = ref.mean(0)
    centred = ref - mean
    cov = centred.T @ centred / len(ref)
    cov = cov + shrinkage * cov.trace() / cov.shape[0] * torch.eye(cov.shape[0], dtype=cov.dtype)
    eigenvalues, vectors = torch.linalg.eigh(cov)
    return (x - mean) @ (vectors / eigenvalues.sqrt())


def spectral_signatures(acts: torch.Tensor, labels: torch.Tensor, clean: torch.Tensor,
                        clean_labels: torch.Tensor, rate_bound: float, tail_ratio: float = TAIL_RATIO,
                        shrinkage: float = SHRINKAGE) -> tuple[np.ndarray, dict[int, float]]:
    """Per label: outlier scores along the top singular vector of the clean-whitened
    activations. The defender does not know the target label, and removing the top scores of
    every label mostly removes clean samples, so only labels whose score tail stands out lose
    their ``1.5 * rate_bound * N`` highest-scoring samples. The tail figure: the label's score
    ranked ``rate_bound * N / 2`` over its clean images' score at the same quantile; a label
    is flagged when it is over ``tail_ratio`` times the median figure across labels. A
    quantile, not a mean: one clean label's few extreme images must not outweigh a poison's
    hundreds; against the clean images, not the label's own median: a poison that is the
    majority of its label is its median too. Returns (the flagged indices, each label's
    tail figure)."""
    n_remove = int(round(1.5 * rate_bound * len(labels)))
    rank = max(1, int(round(rate_bound * len(labels) / 2)))
    per_class = {}
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        ref = clean[clean_labels == c].double()
        if len(idx) < 2 or len(ref) < 2 or n_remove == 0:
            continue
        x = clean_whitened(acts[idx].double(), ref, shrinkage)
        _, _, v = torch.linalg.svd(x, full_matrices=False)
        scores = (x @ v[0]) ** 2
        ref_scores = (clean_whitened(ref, ref, shrinkage) @ v[0]) ** 2
        quantile = 1 - min(rank, len(idx) - 1) / len(idx)
        tail = float(torch.quantile(scores, quantile) / torch.quantile(ref_scores, quantile).clamp_min(1e-12))
        order = scores.argsort(descending=True)
        per_class[c] = (tail, idx[order[:min(len(idx), n_remove)]])
    tails = {c: round(t, 4) for c, (t, _) in per_class.items()}
    if not per_class:
        return np.empty(0, dtype=np.int64), tails
    typical = float(np.median(list(tails.values())))
    flagged = [top for t, top in per_class.values() if t > tail_ratio * typical]
    return (torch.cat(flagged).numpy() if flagged else np.empty(0, dtype=np.int64)), tails


def find_poison(model: nn.Module, poisoned_train: Split, clean: Split, rate_bound: float,
                seed: int = 0) -> dict[str, Detection]:
    """Both methods on ``poisoned_train`` (as the model was trained on it), with the defender's
    ``clean`` images as reference."""
    acts = penultimate_activations(model, poisoned_train)
    labels = poisoned_train.labels
    ref = penultimate_activations(model, clean)
    ac, ratios = activation_clustering(acts, labels, ref, clean.labels, seed=seed)
    ss, tails = spectral_signatures(acts, labels, ref, clean.labels, rate_bound)
    return {"activation_clustering": Detection(ac, "clean_share_ratio", ratios),
            "spectral_signatures": Detection(ss, "score_tail", tails)}


def detect(model: nn.Module, poisoned_train: Split, poisoned_indices: frozenset[int], clean: Split,
           rate_bound: float, seed: int = 0) -> dict[str, Any]:
    """``find_poison``, each method scored against the manifest: what detection.json keeps."""
    return ActivationDefense().record(find_poison(model, poisoned_train, clean, rate_bound, seed),
                                      poisoned_indices, len(poisoned_train))


class ActivationDefense(PoisonDetector):
    """Activation clustering and spectral signatures, one Ray task (they share the activations);
    detection.json keeps their result under ``methods``, as releases before the registry did."""

    name = "activations"
    record_key = "methods"
    title = "Activation clustering and spectral signatures"
    methods = ("activation_clustering", "spectral_signatures")

    def detect_poison(self, ctx: DefenseContext) -> dict[str, Detection]:
        return find_poison(ctx.model, ctx.poisoned_train, ctx.clean, rate_bound=max(ctx.cfg.poison.rate, 1e-4),
                           seed=ctx.cfg.seed)

    def report_section(self, result: dict[str, Any], cfg: Any, detection: dict[str, Any]) -> list[Block]:
        blocks = super().report_section(result, cfg, detection)
        if "clean_share_ratio" in result.get("activation_clustering", {}):  # not in the first releases' files
            blocks.append(Plot(_per_label(result)))
        return blocks


def _per_label(result: dict[str, Any]) -> Any:
    """What each method decided on, per training label."""
    import statistics

    import matplotlib.pyplot as plt

    ratio = result["activation_clustering"]["clean_share_ratio"]
    tail = result["spectral_signatures"]["score_tail"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    axes[0].bar(list(ratio), list(ratio.values()), color=["C3" if r < REF_RATIO else "C0" for r in ratio.values()])
    axes[0].axhline(REF_RATIO, color="k", ls="--", lw=1)
    axes[0].set_title("activation clustering: clean images' share / training share\n"
                      f"of the cluster they avoid (flagged < {REF_RATIO:g})", fontsize=9)
    if tail:
        median = statistics.median(tail.values()) or 1.0  # all-zero activations: plot them as they are
        relative = [t / median for t in tail.values()]
        axes[1].bar(list(tail), relative, color=["C3" if r > TAIL_RATIO else "C0" for r in relative])
        axes[1].axhline(TAIL_RATIO, color="k", ls="--", lw=1)
        axes[1].set_yscale("log")
    axes[1].set_title(f"spectral signatures: score tail over the labels' median\n(flagged > {TAIL_RATIO:g})",
                      fontsize=9)
    for ax in axes:
        ax.set_xlabel("training label")
    return fig
