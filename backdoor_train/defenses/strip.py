"""Input filtering at inference (STRIP, Gao et al. 2019): a triggered input stays in the target
class whatever it is superimposed with, so its predictions over blended copies have low entropy.

Each input is blended half-and-half with ``n_blends`` random clean images; its score is the
mean entropy of the model's softmax over those blends. The threshold is the ``frr`` quantile of
the clean calibration inputs' scores (so that share of clean inputs is rejected); an input
scoring below it is rejected as triggered. Reported on held-out clean and triggered images:
FRR (clean rejected) and FAR (triggered accepted). ``Strip`` is the defense (defenses/base.py's
``ModelDefense``): ``calibrate`` on the defender's clean images, ``measure`` on the held-out ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from backdoor_train.checks import check
from backdoor_train.data.split import to_float
from backdoor_train.defenses.base import Block, DefenseContext, ModelDefense, Plot, Text, pct, rounded

ENTROPY_BINS = 40


@torch.no_grad()
def strip_entropy(model: nn.Module, x: torch.Tensor, pool: torch.Tensor, n_blends: int = 64,
                  batch_size: int = 4096, seed: int = 0) -> torch.Tensor:
    """The mean prediction entropy of each input in ``x`` over ``n_blends`` blends with images
    drawn from the clean ``pool`` (float [N, C, H, W] in [0, 1])."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(pool), (len(x), n_blends), generator=gen).to(x.device)
    out = torch.empty(len(x), device=x.device)
    per = max(1, batch_size // n_blends)
    for start in range(0, len(x), per):
        xs = x[start:start + per]
        blends = 0.5 * xs[:, None] + 0.5 * pool[picks[start:start + per]]
        probs = model(blends.flatten(0, 1)).softmax(1).clamp_min(1e-12)
        entropy = -(probs * probs.log()).sum(1).view(len(xs), n_blends)
        out[start:start + per] = entropy.mean(1)
    return out.cpu()


def calibrate(model: nn.Module, calibration: torch.Tensor, frr: float = 0.01, n_blends: int = 64,
              seed: int = 0) -> float:
    """The entropy threshold that rejects ``frr`` of the clean ``calibration`` inputs (blended
    with each other)."""
    calib = strip_entropy(model, calibration, calibration, n_blends, seed=seed)
    return float(torch.quantile(calib.double(), frr))


def measure(model: nn.Module, pool: torch.Tensor, threshold: float, clean: torch.Tensor, triggered: torch.Tensor,
            n_blends: int = 64, seed: int = 0) -> dict[str, Any]:
    """FRR on held-out ``clean`` and FAR on ``triggered`` inputs at ``threshold``, each input
    blended with images of the clean ``pool``; with every input's entropy."""
    clean_h = strip_entropy(model, clean, pool, n_blends, seed=seed + 1)
    trig_h = strip_entropy(model, triggered, pool, n_blends, seed=seed + 2)
    return {
        "frr": float((clean_h < threshold).double().mean()) if len(clean_h) else float("nan"),
        "far": float((trig_h >= threshold).double().mean()) if len(trig_h) else float("nan"),
        "n_clean": len(clean_h), "n_triggered": len(trig_h),
        "clean_entropy": clean_h.tolist(), "triggered_entropy": trig_h.tolist(),
    }


def strip(model: nn.Module, calibration: torch.Tensor, clean: torch.Tensor, triggered: torch.Tensor,
          frr: float = 0.01, n_blends: int = 64, seed: int = 0) -> dict[str, Any]:
    """STRIP with its threshold set on ``calibration`` (clean) for the false-rejection rate
    ``frr``; FRR and FAR measured on held-out ``clean`` and ``triggered`` inputs."""
    threshold = calibrate(model, calibration, frr, n_blends, seed)
    return {"n_blends": n_blends, "target_frr": frr, "threshold": threshold,
            **measure(model, calibration, threshold, clean, triggered, n_blends, seed)}


@dataclass(frozen=True)
class StripKnobs:
    strip_blends: int = 64  # blends per input
    strip_frr: float = 0.01  # the false-rejection rate its threshold is set for

    def __post_init__(self) -> None:
        check(self.strip_blends > 0, f"defense.strip_blends must be > 0 (got {self.strip_blends})")
        check(0 < self.strip_frr < 1, f"defense.strip_frr must be in (0, 1) (got {self.strip_frr})")


class Strip(ModelDefense):
    """STRIP: the threshold calibrated on the defender's clean images, FRR and FAR on the
    held-out clean and triggered ones; detection.json keeps histograms of their entropies."""

    name = "strip"
    title = "STRIP"
    Knobs = StripKnobs

    def inspect(self, ctx: DefenseContext) -> dict[str, Any]:
        knobs = ctx.knobs
        threshold = calibrate(ctx.model.to(ctx.device), to_float(ctx.clean.images).to(ctx.device),
                              knobs.strip_frr, knobs.strip_blends, ctx.cfg.seed)
        return {"n_blends": knobs.strip_blends, "target_frr": knobs.strip_frr, "threshold": threshold}

    def evaluate_defence(self, ctx: DefenseContext, found: dict[str, Any]) -> dict[str, Any]:
        from backdoor_train.attack.evaluate import attack_mask
        from backdoor_train.attack.triggers import apply_trigger

        cfg, device, held = ctx.cfg, ctx.device, ctx.held
        triggered = apply_trigger(held.images[attack_mask(held.labels, cfg.poison)], cfg.poison.trigger)
        found = {**found, **measure(ctx.model.to(device), to_float(ctx.clean.images).to(device), found["threshold"],
                                    to_float(held.images).to(device), to_float(triggered).to(device),
                                    found["n_blends"], cfg.seed)}
        # Histograms, not every input's entropy: what the report plots, in a small file.
        top = math.log(cfg.dataset.num_classes)
        edges = torch.linspace(0, top, ENTROPY_BINS + 1)
        for key in ("clean_entropy", "triggered_entropy"):
            values = torch.tensor(found.pop(key)).clamp(0, top)
            found[key + "_histogram"] = torch.histc(values, ENTROPY_BINS, 0, top).int().tolist()
        found["entropy_bin_edges"] = rounded(edges)
        return found

    def log_lines(self, result: dict[str, Any]) -> list[str]:
        return [f"STRIP at FRR {result['target_frr']:.0%}: FRR {result['frr']:.2%}, FAR {result['far']:.2%}"]

    def report_section(self, result: dict[str, Any], cfg: Any, detection: dict[str, Any]) -> list[Block]:
        """The entropy of clean and triggered held-out inputs, and the threshold."""
        import matplotlib.pyplot as plt

        edges = result["entropy_bin_edges"]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        for key, label in (("clean_entropy_histogram", "clean"), ("triggered_entropy_histogram", "triggered")):
            ax.stairs(result[key], edges, label=label, fill=True, alpha=0.5)
        ax.axvline(result["threshold"], color="k", ls="--", lw=1, label="threshold")
        ax.set_xlabel("mean prediction entropy over blends")
        ax.legend()
        return [Text(f"Threshold set for {result['target_frr']:.0%} false rejections on the defender's clean "
                     f"images: FRR {pct(result['frr'])} on {result['n_clean']} held-out clean images, FAR "
                     f"{pct(result['far'])} on {result['n_triggered']} triggered ones ({result['n_blends']} "
                     f"blends each)."),
                Plot(fig)]
