"""Reading torch files from storage that other people can write: ``torch.load(weights_only=True)``
and the errors that tell a corrupt file from a hostile one.

A checksum next to a file is no proof of origin (whoever writes the bucket writes both), so every
stored tensor file (checkpoints, model.pt) goes through ``safe_torch_load``, whose unpickler resolves
no global outside torch's allowlist: a planted pickle that calls ``os.system`` is refused before it
can run.
"""

from __future__ import annotations

import io
import re
from typing import Any, Optional

import numpy as np
import torch


class CorruptCheckpointError(RuntimeError):
    """A checkpoint's files are missing or do not match their checksum."""


class UnsafeCheckpointError(CorruptCheckpointError):
    """A stored file's pickle names something a checkpoint or model never holds (it could run
    code): refused unread. Never fallen back from like a corrupt one: someone wrote it."""


def _legacy_numpy_globals() -> list[Any]:
    """What a pickled 1-D ``uint32`` ndarray (the numpy RNG state of earlier releases) names:
    numpy's array reconstruction, ``ndarray`` and its dtype; nothing that calls out."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def safe_torch_load(data: bytes, where: str, map_location: Optional[str | torch.device] = "cpu",
                    legacy_numpy: bool = False) -> Any:
    """``torch.load`` that cannot run code: ``weights_only=True`` (tensors, containers and plain
    types only). A pickle naming anything else raises ``UnsafeCheckpointError`` naming ``where``;
    any other unreadable file ``CorruptCheckpointError``."""
    import pickle

    allowed = _legacy_numpy_globals() if legacy_numpy else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch words it "Weights only load failed ... Unsupported global: GLOBAL posix.system ...".
        named = re.search(r"[^\n.]*GLOBAL [^\n]*", str(exc), re.IGNORECASE)
        if named is None:  # not a global: bytes that are no pickle of ours (garbage, truncation)
            raise CorruptCheckpointError(f"{where}: unreadable (not a torch file: {str(exc).splitlines()[-1][:200]})") \
                from None
        raise UnsafeCheckpointError(
            f"{where}: refused unread: it is not a plain tensor file ({named.group(0).strip()}); loading it could "
            f"run code. Someone with write access to the storage wrote it: delete it and check who can write "
            f"the bucket") from None
    except Exception as exc:  # truncated, not a torch file at all
        raise CorruptCheckpointError(f"{where}: unreadable ({type(exc).__name__}: {str(exc)[:200]})") from None
