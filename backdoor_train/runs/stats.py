"""Statistics over seeds: the one place that turns per-seed figures into mean, spread and interval.

Multi-seed experiments (runs/seeds.py) and sweeps (runs/sweep.py) both describe their seeds with
``describe``, so a sweep over seeds and a multi-seed experiment report the same figures for
the same runs. The interval is Student t's: seeds are few (8-16) and their figures are not
known to be normal, but t is what a reader expects and it is honest about small n.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Optional, Sequence

from backdoor_train.results import Description, EpochDescription, EpochRecord

CONFIDENCE = 0.95


def t_critical(df: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student t quantile: mean ± t * sd / sqrt(n) covers ``confidence``."""
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, df))


def describe(values: Sequence[float]) -> Description:
    """n, mean, sample standard deviation (n - 1), the 95% t interval of the mean, min and max.

    One value has no spread: its std and interval are None (JSON null), not 0. NaN (an ASR
    without triggered test images) is left out; with nothing left every figure is None.
    """
    if not values:
        raise ValueError("describe needs at least one value")
    xs = [float(v) for v in values if v == v]
    if not xs:
        return Description(n=0, mean=None, std=None, ci95=None, min=None, max=None)
    n, mean = len(xs), statistics.fmean(xs)
    std: Optional[float] = statistics.stdev(xs) if n > 1 else None
    ci: Optional[tuple[float, float]] = None
    if std is not None:
        half = t_critical(n - 1) * std / math.sqrt(n)
        ci = (mean - half, mean + half)
    return Description(n=n, mean=mean, std=std, ci95=ci, min=min(xs), max=max(xs))


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Description:
    """``describe`` of ``b - a`` seed by seed: the paired comparison (same seed, same test set)
    removes the seed-to-seed spread both variants share."""
    if len(a) != len(b):
        raise ValueError(f"paired values differ in length ({len(a)} vs {len(b)})")
    return describe([y - x for x, y in zip(a, b)])


def first_epoch_at(history: Sequence[EpochRecord], key: str, threshold: float) -> Optional[int]:
    """The first epoch whose figure ``key`` reaches ``threshold`` (None: never)."""
    for h in history:
        value = getattr(h, key)
        if value is not None and value == value and value >= threshold:
            return h.epoch
    return None


def by_epoch(histories: Sequence[Sequence[EpochRecord]], key: str) -> tuple[EpochDescription, ...]:
    """``describe`` of figure ``key`` at every epoch that all histories reached, with its ``epoch``."""
    epochs = min((len(h) for h in histories), default=0)
    return tuple(EpochDescription(epoch=histories[0][i].epoch,
                                  **dataclasses.asdict(describe([getattr(h[i], key) for h in histories])))
                 for i in range(epochs))


def _fmt(s: Description, value: str, spread: str, unit: str = "") -> str:
    """mean ± std [95% interval] of ``describe``'s figures; ``value`` formats the mean and the
    interval's ends, ``spread`` the std (format specs), ``unit`` follows the mean. A summary of
    an early sweep has a std but no interval."""
    if s.mean is None:
        return "n/a"
    out = f"{s.mean:{value}}{unit}"
    if s.std is not None:
        out += f" ± {s.std:{spread}}"
    if s.ci95 is not None:
        lo, hi = s.ci95
        out += f" [{lo:{value}}, {hi:{value}}]"
    return out


def fmt_pct(s: Description, digits: int = 2) -> str:
    """``92.23% ± 4.45% [89.9%, 94.6%]``: mean ± std [95% interval], in percent."""
    return _fmt(s, f".{digits}%", f".{digits}%")


def fmt_range(s: Description) -> str:
    """``81.2%–97.9%``: min–max in percent."""
    return "n/a" if s.min is None or s.max is None else f"{s.min:.1%}–{s.max:.1%}"


def fmt_pp(s: Description) -> str:
    """A difference of fractions in percentage points: ``-0.04 pp ± 0.09 [-0.09, +0.01]``."""
    def pp(x: Optional[float]) -> Optional[float]:
        return None if x is None else x * 100

    lo_hi = None if s.ci95 is None else (s.ci95[0] * 100, s.ci95[1] * 100)
    return _fmt(dataclasses.replace(s, mean=pp(s.mean), std=pp(s.std), ci95=lo_hi), "+.2f", ".2f", " pp")
