"""Backdoor triggers: each kind a small frozen config and a pure function that stamps it.

``poison.trigger.kind`` names the kind; the config loader builds that kind's config (its
own fields only: another kind's field is an unknown key) and the kind validates itself.
Every stamp takes uint8 images [N, C, H, W] and returns new ones (pixel and patch the same on
every channel, blend's noise drawn per channel); nothing is modified in place. Adding a kind: a config, a stamp, one line in ``TRIGGERS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
import torch

from backdoor_train.checks import MAX_SEED, check

KEY = "poison.trigger"


def _to_uint8(value: float) -> int:
    return int(round(value * 255))


def _check_kind(trigger: "Trigger", kind: str) -> None:
    check(trigger.kind == kind, f"{KEY}.kind must be {kind!r} for a {type(trigger).__name__} (got {trigger.kind!r})")


def _check_inside(trigger: "PixelTrigger | PatchTrigger", extent: int, shape: tuple[int, int, int]) -> None:
    for key, limit in (("row", shape[1]), ("col", shape[2])):
        pos = getattr(trigger, key)
        check(0 <= pos and pos + extent <= limit,
              f"{KEY}.{key} must keep the trigger inside the {shape[1]}x{shape[2]} image "
              f"(got {pos} with extent {extent})")


@dataclass(frozen=True)
class PixelTrigger:
    """One pixel at (row, col) set to ``value`` (the article's trigger: (3, 3), white)."""

    kind: str = "pixel"
    row: int = 3
    col: int = 3
    value: float = 1.0

    def __post_init__(self) -> None:
        _check_kind(self, "pixel")
        check(0.0 <= self.value <= 1.0, f"{KEY}.value must be in [0, 1] (got {self.value})")

    def check_fits(self, shape: tuple[int, int, int]) -> None:
        _check_inside(self, 1, shape)


@dataclass(frozen=True)
class PatchTrigger:
    """A ``size`` x ``size`` checkerboard of ``value`` and 0, top-left corner at (row, col)."""

    kind: str = "patch"
    row: int = 3
    col: int = 3
    size: int = 3
    value: float = 1.0

    def __post_init__(self) -> None:
        _check_kind(self, "patch")
        check(0.0 <= self.value <= 1.0, f"{KEY}.value must be in [0, 1] (got {self.value})")
        check(self.size > 0, f"{KEY}.size must be > 0 (got {self.size})")

    def check_fits(self, shape: tuple[int, int, int]) -> None:
        _check_inside(self, self.size, shape)


@dataclass(frozen=True)
class BlendTrigger:
    """The image mixed with a fixed noise pattern seeded by ``pattern_seed``:
    ``(1 - alpha) * x + alpha * pattern``."""

    kind: str = "blend"
    alpha: float = 0.1
    pattern_seed: int = 0

    def __post_init__(self) -> None:
        _check_kind(self, "blend")
        check(0.0 < self.alpha <= 1.0, f"{KEY}.alpha must be in (0, 1] (got {self.alpha})")
        check(0 <= self.pattern_seed <= MAX_SEED, f"{KEY}.pattern_seed must be in [0, {MAX_SEED}] "
                                                  f"(got {self.pattern_seed})")

    def check_fits(self, shape: tuple[int, int, int]) -> None:
        pass  # covers any image


Trigger = Union[PixelTrigger, PatchTrigger, BlendTrigger]


def checkerboard(size: int, value: float) -> torch.Tensor:
    """A size x size uint8 checkerboard: ``value`` where row + col is even, 0 elsewhere."""
    ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return torch.where((ii + jj) % 2 == 0, _to_uint8(value), 0).to(torch.uint8)


def blend_pattern(pattern_seed: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """The fixed noise image (uint8 [C, H, W]) a blend trigger mixes in, a function of its seed."""
    rng = np.random.Generator(np.random.PCG64(pattern_seed))
    return torch.from_numpy(rng.integers(0, 256, size=shape, dtype=np.uint8))


def stamp_pixel(images: torch.Tensor, t: PixelTrigger) -> torch.Tensor:
    out = images.clone()
    out[:, :, t.row, t.col] = _to_uint8(t.value)
    return out


def stamp_patch(images: torch.Tensor, t: PatchTrigger) -> torch.Tensor:
    out = images.clone()
    out[:, :, t.row:t.row + t.size, t.col:t.col + t.size] = checkerboard(t.size, t.value)
    return out


def stamp_blend(images: torch.Tensor, t: BlendTrigger) -> torch.Tensor:
    pattern = blend_pattern(t.pattern_seed, tuple(images.shape[1:])).to(torch.float32)
    mixed = (1.0 - t.alpha) * images.to(torch.float32) + t.alpha * pattern
    return mixed.round_().clamp_(0, 255).to(torch.uint8)


# kind → (config, stamp): the one place a kind is defined.
TRIGGERS: dict[str, tuple[type, Callable[[torch.Tensor, Trigger], torch.Tensor]]] = {
    "pixel": (PixelTrigger, stamp_pixel),
    "patch": (PatchTrigger, stamp_patch),
    "blend": (BlendTrigger, stamp_blend),
}


def apply_trigger(images: torch.Tensor, trigger: Trigger) -> torch.Tensor:
    """A copy of ``images`` (uint8 [N, C, H, W]) with the trigger stamped on every image."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"apply_trigger expects uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    return TRIGGERS[trigger.kind][1](images, trigger)
