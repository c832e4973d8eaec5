"""Statistics over seeds: known values, the edge of one seed, per-epoch and paired figures."""

from __future__ import annotations

import math

import pytest

from backdoor_train.results import Description
from backdoor_train.runs.stats import by_epoch, describe, first_epoch_at, fmt_pct, fmt_pp, paired_difference, t_critical

from fake_results import history


@pytest.mark.parametrize("df, expected", [(1, 12.7062), (7, 2.3646), (15, 2.1314), (1000, 1.9623)])
def test_t_critical_matches_the_tables(df, expected):
    assert t_critical(df) == pytest.approx(expected, abs=1e-4)


def test_describe_gives_sample_std_and_the_t_interval():
    s = describe([0.90, 0.94, 0.95, 0.97])
    assert s.n == 4 and s.mean == pytest.approx(0.94)
    std = math.sqrt(((0.04 ** 2) + 0 + 0.01 ** 2 + 0.03 ** 2) / 3)  # n - 1, not n
    assert s.std == pytest.approx(std)
    half = 3.1824 * std / 2
    assert s.ci95 == pytest.approx((0.94 - half, 0.94 + half), abs=1e-5)
    assert (s.min, s.max) == (0.90, 0.97)


def test_one_seed_has_no_spread_and_no_values_is_an_error():
    assert describe([0.5]) == Description(n=1, mean=0.5, std=None, ci95=None, min=0.5, max=0.5)
    assert describe([0.5]).to_dict() == {"n": 1, "mean": 0.5, "std": None, "ci95": None, "min": 0.5, "max": 0.5}
    assert fmt_pct(describe([0.5])) == "50.00%"
    with pytest.raises(ValueError):
        describe([])


def test_paired_difference_is_per_seed():
    # Both variants vary a lot from seed to seed, their difference hardly: pairing sees that.
    clean, poisoned = [0.95, 0.99, 0.97], [0.949, 0.989, 0.969]
    d = paired_difference(clean, poisoned)
    assert d.mean == pytest.approx(-0.001) and d.std == pytest.approx(0.0, abs=1e-12)
    assert fmt_pp(d).startswith("-0.10 pp ± 0.00")
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference([1.0], [1.0, 2.0])


def test_first_epoch_at_and_by_epoch():
    h1 = history([0.0, 0.1, 0.6, 0.9], acc=0.99)
    h2 = history([0.0, float("nan"), 0.2, 0.5], acc=0.99)
    assert first_epoch_at(h1, "attack_success_rate", 0.5) == 3
    assert first_epoch_at(h2, "attack_success_rate", 0.5) == 4
    assert first_epoch_at(h2, "attack_success_rate", 0.9) is None
    rows = by_epoch([h1, h2[:3]], "attack_success_rate")  # only the epochs every seed reached
    assert [r.epoch for r in rows] == [1, 2, 3]
    assert rows[2].mean == pytest.approx(0.4) and rows[2].n == 2
    assert rows[1].n == 1 and rows[1].mean == pytest.approx(0.1)  # NaN (no triggered images) left out
    nothing = describe([float("nan")])
    assert nothing.n == 0 and nothing.mean is None and fmt_pct(nothing) == "n/a"
