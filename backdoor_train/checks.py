"""The one error a bad configuration value raises, and the check that raises it: shared by
config.py and by the components that own their own config (attack/triggers.py, attack/poison.py)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def check(ok: bool, message: str) -> None:
    # Not `assert`: user input must be checked even under `python -O`.
    if not ok:
        raise ConfigError(message)


MAX_SEED = 2**32 - 1  # what numpy's and torch's seeding takes without surprises
