"""Training checkpoints: what goes in one, its checksum, and restoring from it.

A checkpoint is a directory holding ``state.pt`` (model and optimizer state, the number of
finished epochs, RNG states and the metrics history) and ``state.pt.sha256``. Loading
verifies the checksum first, so a truncated or altered file is refused with its path
instead of silently resuming from garbage.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from typing import Any, Optional

import numpy as np
import torch

STATE_FILE = "state.pt"
CHECKSUM_FILE = STATE_FILE + ".sha256"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint's files are missing or do not match their checksum."""


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(directory: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               epochs_done: int, history: list[dict[str, Any]]) -> int:
    """Write ``state.pt`` and its checksum into ``directory``; return the bytes written."""
    buf = io.BytesIO()
    torch.save({
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "epochs_done": epochs_done,
        "rng": rng_state(),
        "history": history,
    }, buf)
    data = buf.getvalue()
    with open(os.path.join(directory, STATE_FILE), "wb") as fh:
        fh.write(data)
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(directory, CHECKSUM_FILE), "w", encoding="ascii") as fh:
        fh.write(digest + "\n")
    return len(data) + len(digest) + 1


def load_state(directory: str, map_location: Optional[str | torch.device] = "cpu") -> dict[str, Any]:
    """Read and verify a checkpoint directory's state."""
    state_path = os.path.join(directory, STATE_FILE)
    sum_path = os.path.join(directory, CHECKSUM_FILE)
    try:
        with open(state_path, "rb") as fh:
            data = fh.read()
        with open(sum_path, encoding="ascii") as fh:
            expected = fh.read().strip()
    except OSError as exc:
        raise CorruptCheckpointError(f"checkpoint {directory}: {exc}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise CorruptCheckpointError(
            f"checkpoint {directory}: {STATE_FILE} has sha256 {actual[:16]}…, "
            f"its checksum file says {expected[:16]}…")
    # weights_only=False: the state holds numpy RNG state; the checksum above vouches for it.
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
