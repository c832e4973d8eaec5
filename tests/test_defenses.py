"""Neural Cleanse, unlearning and STRIP (defenses/cleanse.py, defenses/strip.py) on a synthetic backdoored model:
a fixed linear classifier of random images plus a backdoor, pixel (3, 3) bright → class 8.
Pure unit tests: no MNIST, no Ray (the real-data runs are in test_detect.py and docs/RESULTS.md)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from backdoor_train.defenses.cleanse import (anomaly_indices, mask_mass_near, neural_cleanse, reverse_engineer, stamp,
                                    unlearn)
from backdoor_train.defenses.strip import strip, strip_entropy


class _Backdoored(nn.Module):
    """Ten classes from a fixed random projection; the weight of pixel (3, 3) for class 8 is 5:
    a bright pixel there means class 8 (a weight, so that unlearning can undo it)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(28 * 28, 10)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(10, 28 * 28, generator=torch.Generator().manual_seed(0)) * 0.05)
            self.linear.weight[8, 3 * 28 + 3] = 5.0
            self.linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def _clean(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 0.5
    x[:, :, 3, 3] = 0.0
    return x, torch.zeros(n, dtype=torch.long)


def test_anomaly_index_is_the_robust_distance_below_the_median():
    norms = [50.0, 52.0, 48.0, 51.0, 49.0, 50.0, 53.0, 47.0, 2.0, 50.0]
    index = anomaly_indices(norms)
    mad = 1.4826 * 1.5  # |norm - 50| has median 1.5
    assert index[8] == pytest.approx((50.0 - 2.0) / mad)
    assert max(i for c, i in enumerate(index) if c != 8) < 2 and index[6] == 0.0  # above the median: 0
    assert anomaly_indices([3.0, 3.0, 3.0]) == [0.0, 0.0, 0.0]  # no spread, no anomaly


def test_mask_mass_near_the_trigger():
    mask = torch.zeros(28, 28)
    mask[3, 3], mask[20, 20] = 3.0, 1.0
    assert mask_mass_near(mask, 3, 3, 1) == pytest.approx(0.75)
    assert mask_mass_near(mask, 19, 19, 3) == pytest.approx(0.25)
    assert mask_mass_near(torch.zeros(4, 4), 0, 0, 1) == 0.0


def test_stamp_blends_mask_and_pattern():
    x, mask, pattern = torch.full((2, 3, 4, 4), 0.2), torch.zeros(4, 4), torch.ones(3, 4, 4)
    mask[1, 2] = 1.0
    out = stamp(x, mask, pattern)
    assert out[:, :, 1, 2].eq(1.0).all() and out.sum() == pytest.approx(2 * 3 * (15 * 0.2 + 1))


def test_reverse_engineering_finds_the_small_trigger_of_the_backdoored_class():
    model, (x, _) = _Backdoored(), _clean()
    found = reverse_engineer(model, x, target=8, steps=300, batch_size=64, lr=0.1)
    assert found.flip_rate > 0.95
    assert found.l1 < 3 and mask_mass_near(found.mask, 3, 3, 1) > 0.8, (found.l1, found.mask.argmax())


def test_neural_cleanse_flags_the_target_and_unlearning_removes_the_backdoor():
    model = _Backdoored()
    x, _ = _clean(256)
    y = model(x).argmax(1)  # the classifier's own labels: clean images it gets right
    found = neural_cleanse(model, x, y, 10, steps=150, batch_size=64)
    assert found["suspect"] == 8 and 8 in found["flagged_classes"], found["anomaly_index"]
    assert found["l1_norms"][8] == min(found["l1_norms"]) < 3
    trigger = found["triggers"][8]
    triggered = x.clone()
    triggered[:, :, 3, 3] = 1.0
    fixed = unlearn(_Backdoored(), x, y, trigger, epochs=60, share=0.5, lr=0.05)
    not_8 = y != 8
    assert (model(triggered).argmax(1) == 8).float().mean() == 1.0
    assert (fixed(triggered[not_8]).argmax(1) == 8).float().mean() < 0.2
    assert (fixed(x).argmax(1) == y).float().mean() > 0.8


def test_strip_rejects_triggered_inputs_at_the_chosen_false_rejection_rate():
    model, (x, _) = _Backdoored(), _clean(600)
    calibration, clean = x[:300], x[300:]
    triggered = clean.clone()
    triggered[:, :, 3, 3] = 1.0
    found = strip(model, calibration, clean, triggered, frr=0.05, n_blends=16)
    assert found["far"] < 0.05 and found["frr"] < 0.15, (found["far"], found["frr"])
    # A triggered input leans to class 8 whatever it is blended with: lower entropy than any clean one.
    assert strip_entropy(model, triggered[:50], calibration, 16).max() < strip_entropy(model, clean[:50],
                                                                                     calibration, 16).min()
    assert 0 <= found["threshold"] <= math.log(10)


@pytest.mark.parametrize("scaling, expected", [
    ({"use_gpu": False, "cpus_per_worker": 2}, {"num_cpus": 2}),
    ({"use_gpu": True, "cpus_per_worker": 1, "gpus_per_worker": 0.5}, {"num_cpus": 1, "num_gpus": 0.5}),
])
def test_each_defense_task_asks_for_a_training_workers_resources(scaling, expected):
    from backdoor_train.config import ExperimentConfig
    from backdoor_train.runs.detection import remote_options

    assert remote_options(ExperimentConfig.from_dict({"scaling": scaling})) == expected
