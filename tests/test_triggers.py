"""The trigger registry: each kind's pure stamp on synthetic uint8 [N, C, H, W] images, and
each kind's own config, validated per kind (config.py builds the kind ``kind`` names)."""

from __future__ import annotations

import pytest
import torch

from backdoor_train.config import ConfigError, ExperimentConfig
from backdoor_train.attack.triggers import (TRIGGERS, BlendTrigger, PatchTrigger, PixelTrigger, apply_trigger,
                                     blend_pattern, checkerboard)


def _images(n: int = 20, c: int = 1, h: int = 28, w: int = 28) -> torch.Tensor:
    return torch.randint(0, 200, (n, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("channels", [1, 3])
def test_pixel_trigger_sets_exactly_one_pixel_on_every_channel(channels):
    images = _images(c=channels)
    before = images.clone()
    out = apply_trigger(images, PixelTrigger(row=3, col=3, value=1.0))
    assert torch.equal(images, before), "apply_trigger must not modify its input"
    assert (out[:, :, 3, 3] == 255).all()
    changed = out != images
    changed[:, :, 3, 3] = False
    assert not changed.any(), "only pixel (3, 3) may change"


def test_pixel_value_is_scaled_to_the_stored_range():
    out = apply_trigger(_images(3), PixelTrigger(row=0, col=27, value=0.5))
    assert (out[:, 0, 0, 27] == 128).all()


@pytest.mark.parametrize("channels, side", [(1, 28), (3, 32)])
def test_patch_trigger_is_a_checkerboard_in_place(channels, side):
    images = _images(c=channels, h=side, w=side)
    r = side - 4
    out = apply_trigger(images, PatchTrigger(row=r, col=r, size=3, value=1.0))
    expected = torch.tensor([[255, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
    assert torch.equal(checkerboard(3, 1.0), expected)
    assert (out[:, :, r:r + 3, r:r + 3] == expected).all()
    outside = torch.ones(side, side, dtype=torch.bool)
    outside[r:r + 3, r:r + 3] = False
    assert torch.equal(out[:, :, outside], images[:, :, outside])


def test_blend_trigger_mixes_a_fixed_pattern_of_the_images_shape():
    images = _images(c=3, h=32, w=32)
    out = apply_trigger(images, BlendTrigger(alpha=0.2, pattern_seed=7))
    pattern = blend_pattern(7, (3, 32, 32)).float()
    assert torch.equal(out, (0.8 * images.float() + 0.2 * pattern).round().to(torch.uint8))
    assert torch.equal(blend_pattern(7, (1, 28, 28)), blend_pattern(7, (1, 28, 28)))
    assert not torch.equal(blend_pattern(7, (1, 28, 28)), blend_pattern(8, (1, 28, 28)))


def test_the_blend_pattern_of_one_channel_is_the_releases_before_it():
    # Before images had a channel axis the pattern was drawn as [28, 28]: the same numbers.
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(5))
    old = torch.from_numpy(rng.integers(0, 256, size=(28, 28), dtype=np.uint8))
    assert torch.equal(blend_pattern(5, (1, 28, 28))[0], old)


def test_apply_trigger_rejects_float_or_channel_less_images():
    with pytest.raises(ValueError, match="uint8"):
        apply_trigger(torch.zeros(2, 1, 28, 28), PixelTrigger())
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        apply_trigger(torch.zeros(2, 28, 28, dtype=torch.uint8), PixelTrigger())


def test_every_kind_is_registered_with_its_config_and_stamp():
    assert set(TRIGGERS) == {"pixel", "patch", "blend"}
    for kind, (config, stamp) in TRIGGERS.items():
        assert config().kind == kind
        assert apply_trigger(_images(2), config()).shape == (2, 1, 28, 28)


def _cfg(trigger: dict, **data) -> ExperimentConfig:
    return ExperimentConfig.from_dict({"poison": {"trigger": trigger}, **data})


def test_the_config_builds_the_kind_it_names():
    assert _cfg({"kind": "patch", "size": 4}).poison.trigger == PatchTrigger(size=4)
    assert _cfg({"kind": "blend"}).poison.trigger == BlendTrigger()
    assert _cfg({}).poison.trigger == PixelTrigger()  # the article's trigger by default
    assert _cfg({"row": 5}).poison.trigger == PixelTrigger(row=5)


@pytest.mark.parametrize("trigger, key", [
    ({"kind": "pixel", "size": 3}, "unknown key poison.trigger.size"),  # another kind's field
    ({"kind": "blend", "row": 3}, "unknown key poison.trigger.row"),
    ({"kind": "star"}, "poison.trigger.kind"),
    ({"kind": "patch", "size": 0}, "poison.trigger.size"),
    ({"kind": "blend", "alpha": 0}, "poison.trigger.alpha"),
    ({"kind": "blend", "pattern_seed": -1}, "poison.trigger.pattern_seed"),
    ({"value": 2.0}, "poison.trigger.value"),
    ({"row": 28}, "poison.trigger.row"),  # outside MNIST's 28x28
    ({"kind": "patch", "row": 26}, "poison.trigger.row"),  # 3 wide from 26 leaves the image
])
def test_each_kind_validates_its_own_fields(trigger, key):
    with pytest.raises(ConfigError, match=key):
        _cfg(trigger)


def test_the_trigger_must_fit_the_datasets_image():
    # 3x3 at (29, 29) fits CIFAR-10's 32x32, not MNIST's 28x28.
    patch = {"kind": "patch", "row": 29, "col": 29}
    assert _cfg(patch, data={"name": "cifar10"}).poison.trigger.row == 29
    with pytest.raises(ConfigError, match="inside the 28x28 image"):
        _cfg(patch)


@pytest.mark.parametrize("trigger, message", [
    ("pixel", "poison.trigger must be a mapping"),
    ({"kind": ["pixel"]}, "poison.trigger.kind must be one of"),
])
def test_a_trigger_that_is_not_a_mapping_of_a_kind_is_named(trigger, message):
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig.from_dict({"poison": {"trigger": trigger}})


def test_a_sweep_over_the_trigger_kind_keeps_each_kinds_own_keys(tmp_path):
    import yaml

    from backdoor_train.runs.sweep import load_sweep

    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"poison": {"trigger": {"kind": "pixel", "row": 5}}}))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(
        {"name": "kinds", "base": "base.yaml", "grid": {"poison.trigger.kind": ["pixel", "patch", "blend"]}}))
    triggers = [t.poison.trigger for t in load_sweep(str(tmp_path / "sweep.yaml")).trials]
    assert triggers == [PixelTrigger(row=5), PatchTrigger(row=5), BlendTrigger()]
