"""Statistics over seeds: the one place that turns per-seed figures into mean, spread and interval.

Multi-seed experiments (runs/seeds.py) and sweeps (runs/sweep.py) both describe their seeds with
``describe``, so a sweep over seeds and a multi-seed experiment report the same figures for
the same runs. The interval is Student t's: seeds are few (8-16) and their figures are not
known to be normal, but t is what a reader expects and it is honest about small n.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Optional, Sequence

CONFIDENCE = 0.95


def t_critical(df: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student t quantile: mean ± t * sd / sqrt(n) covers ``confidence``."""
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, df))


def describe(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, sample standard deviation (n - 1), the 95% t interval of the mean, min and max.

    One value has no spread: its std and interval are None (JSON null), not 0. NaN (an ASR
    without triggered test images) is left out; with nothing left every figure is None.
    """
    if not values:
        raise ValueError("describe needs at least one value")
    xs = [float(v) for v in values if v == v]
    if not xs:
        return {"n": 0, "mean": None, "std": None, "ci95": None, "min": None, "max": None}
    n, mean = len(xs), statistics.fmean(xs)
    std: Optional[float] = statistics.stdev(xs) if n > 1 else None
    ci: Optional[list[float]] = None
    if std is not None:
        half = t_critical(n - 1) * std / math.sqrt(n)
        ci = [mean - half, mean + half]
    return {"n": n, "mean": mean, "std": std, "ci95": ci, "min": min(xs), "max": max(xs)}


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """``describe`` of ``b - a`` seed by seed: the paired comparison (same seed, same test set)
    removes the seed-to-seed spread both variants share."""
    if len(a) != len(b):
        raise ValueError(f"paired values differ in length ({len(a)} vs {len(b)})")
    return describe([y - x for x, y in zip(a, b)])


def first_epoch_at(history: list[dict[str, Any]], key: str, threshold: float) -> Optional[int]:
    """The first epoch whose ``key`` reaches ``threshold`` (None: never)."""
    for h in history:
        value = h.get(key)
        if value is not None and value == value and value >= threshold:
            return int(h["epoch"])
    return None


def by_epoch(histories: list[list[dict[str, Any]]], key: str) -> list[dict[str, Any]]:
    """``describe`` of ``key`` at every epoch that all histories reached, with its ``epoch``."""
    epochs = min((len(h) for h in histories), default=0)
    return [{"epoch": histories[0][i]["epoch"], **describe([h[i][key] for h in histories])}
            for i in range(epochs)]


def _fmt(s: dict[str, Any], value: str, spread: str, unit: str = "") -> str:
    """mean ± std [95% interval] of ``describe``'s figures; ``value`` formats the mean and the
    interval's ends, ``spread`` the std (format specs), ``unit`` follows the mean."""
    if s["mean"] is None:
        return "n/a"
    out = f"{s['mean']:{value}}{unit}"
    if s["std"] is not None:
        lo, hi = s["ci95"]
        out += f" ± {s['std']:{spread}} [{lo:{value}}, {hi:{value}}]"
    return out


def fmt_pct(s: dict[str, Any], digits: int = 2) -> str:
    """``92.23% ± 4.45% [89.9%, 94.6%]``: mean ± std [95% interval], in percent."""
    return _fmt(s, f".{digits}%", f".{digits}%")


def fmt_range(s: dict[str, Any]) -> str:
    """``81.2%–97.9%``: min–max in percent."""
    return "n/a" if s["min"] is None else f"{s['min']:.1%}–{s['max']:.1%}"


def fmt_pp(s: dict[str, Any]) -> str:
    """A difference of fractions in percentage points: ``-0.04 pp ± 0.09 [-0.09, +0.01]``."""
    points = {k: s[k] if s[k] is None else s[k] * 100 for k in ("mean", "std")}
    points["ci95"] = None if s["ci95"] is None else [x * 100 for x in s["ci95"]]
    return _fmt(points, "+.2f", ".2f", " pp")
