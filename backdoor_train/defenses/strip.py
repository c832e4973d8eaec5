"""Input filtering at inference (STRIP, Gao et al. 2019): a triggered input stays in the target
class whatever it is superimposed with, so its predictions over blended copies have low entropy.

Each input is blended half-and-half with ``n_blends`` random clean images; its score is the
mean entropy of the model's softmax over those blends. The threshold is the ``frr`` quantile of
the clean calibration inputs' scores (so that share of clean inputs is rejected); an input
scoring below it is rejected as triggered. Reported on held-out clean and triggered images:
FRR (clean rejected) and FAR (triggered accepted).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


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


def strip(model: nn.Module, calibration: torch.Tensor, clean: torch.Tensor, triggered: torch.Tensor,
          frr: float = 0.01, n_blends: int = 64, seed: int = 0) -> dict[str, Any]:
    """STRIP with its threshold set on ``calibration`` (clean) for the false-rejection rate
    ``frr``; FRR and FAR measured on held-out ``clean`` and ``triggered`` inputs."""
    pool = calibration
    calib = strip_entropy(model, calibration, pool, n_blends, seed=seed)
    threshold = float(torch.quantile(calib.double(), frr))
    clean_h = strip_entropy(model, clean, pool, n_blends, seed=seed + 1)
    trig_h = strip_entropy(model, triggered, pool, n_blends, seed=seed + 2)
    return {
        "n_blends": n_blends, "target_frr": frr, "threshold": threshold,
        "frr": float((clean_h < threshold).double().mean()) if len(clean_h) else float("nan"),
        "far": float((trig_h >= threshold).double().mean()) if len(trig_h) else float("nan"),
        "n_clean": len(clean_h), "n_triggered": len(trig_h),
        "clean_entropy": clean_h.tolist(), "triggered_entropy": trig_h.tolist(),
    }
