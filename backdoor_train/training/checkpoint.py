"""Training checkpoints: what goes in one, its checksum, and restoring from it.

A checkpoint is a directory holding ``state.pt`` (model and optimizer state, the number of
finished epochs, RNG states and the metrics history) and ``state.pt.sha256``. Loading
verifies the checksum first, so a truncated or altered file is refused with its path
instead of silently resuming from garbage. Uploads write the checksum last, so an upload cut
short is an incomplete checkpoint, never a valid-looking one.

The checksum is no proof of origin: it sits in the same bucket, and whoever can write one
writes both. So ``state.pt`` holds only tensors and plain types (the numpy RNG state as a
tensor) and is read with ``torch.load(weights_only=True)``, whose unpickler resolves no global
outside torch's allowlist: a planted pickle that calls ``os.system`` is refused
(``UnsafeCheckpointError``, exit 2) before it can run. Checkpoints of earlier releases, whose
numpy RNG state is a pickled ``ndarray``, load through the same safe path with numpy's array
reconstruction (and nothing else of numpy) allowed.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import random
import re
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch

from backdoor_train.storage.safeload import CorruptCheckpointError, safe_torch_load

if TYPE_CHECKING:
    from backdoor_train.storage import Storage


STATE_FILE = "state.pt"
CHECKSUM_FILE = STATE_FILE + ".sha256"


STATE_KEYS = ("model", "optimizer", "epochs_done", "rng", "history")


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # A tensor and plain types, so that weights_only loading reads it back (an ndarray is a global).
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)  # a tuple: a checkpoint of an earlier release
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


def checksum_matches(data: bytes, recorded: str) -> bool:
    """Whether ``data`` is what the checksum file (its contents: ``recorded``) vouches for."""
    return hashlib.sha256(data).hexdigest() == recorded.strip()


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
    if not checksum_matches(data, expected):
        actual = hashlib.sha256(data).hexdigest()
        raise CorruptCheckpointError(
            f"checkpoint {directory}: {STATE_FILE} has sha256 {actual[:16]}…, "
            f"its checksum file says {expected[:16]}…")
    return state_from_bytes(data, map_location, where=state_path)


def state_from_bytes(data: bytes, map_location: Optional[str | torch.device] = "cpu",
                     where: str = STATE_FILE) -> dict[str, Any]:
    """A checkpoint's state from ``state.pt`` bytes whose checksum was verified, read with
    ``safe_torch_load`` (``where``: the file, for the error)."""
    state = safe_torch_load(data, where, map_location, legacy_numpy=True)
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise CorruptCheckpointError(f"{where}: not a checkpoint of this product (it needs the keys "
                                     f"{', '.join(STATE_KEYS)})")
    return state


CHECKPOINT_DIR_RE = re.compile(r"^checkpoint_epoch_(\d{4,})(-[0-9a-f]+)?$")


def checkpoint_dir_name(epochs_done: int, suffix: str = "") -> str:
    return f"checkpoint_epoch_{epochs_done:04d}{suffix}"


def checkpoint_epoch(dir_name: str) -> Optional[int]:
    m = CHECKPOINT_DIR_RE.match(dir_name)
    return int(m.group(1)) if m else None


def load_with_fallback(checkpoint: Any, log: Callable[[str], None]) -> tuple[dict[str, Any], Any, bool]:
    """Load ``checkpoint`` (a ray.train.Checkpoint); if it is corrupt, the newest valid one
    before it (``newest_valid_checkpoint`` over the same folder), saying so. Returns (state,
    checkpoint used, whether it fell back). Raises CorruptCheckpointError when none is valid:
    resuming from garbage is refused."""
    from ray.train import Checkpoint

    from backdoor_train.storage.arrow import ArrowStorage

    parent, name = posixpath.split(checkpoint.path.rstrip("/"))
    found = newest_valid_checkpoint(ArrowStorage(checkpoint.filesystem, parent), "", log,
                                    at_most=checkpoint_epoch(name))
    if found is None:
        raise CorruptCheckpointError(f"checkpoint {checkpoint.path} is incomplete and there is no valid one "
                                     f"before it: refusing to continue — delete the run folder or use a new name")
    key, data = found
    state = state_from_bytes(data, where=f"{parent}/{key}/{STATE_FILE}")
    if key == name:
        return state, checkpoint, False
    return state, Checkpoint(path=f"{parent}/{key}", filesystem=checkpoint.filesystem), True


def checkpoint_folders(storage: Storage, prefix: str) -> dict[str, set[str]]:
    """The checkpoint folders under ``prefix`` in a ``Storage`` (their keys), each with the
    names of the files in it."""
    files: dict[str, set[str]] = {}
    for key in storage.list(prefix):
        parts = key.split("/")
        if len(parts) >= 2 and checkpoint_epoch(parts[-2]) is not None:
            files.setdefault("/".join(parts[:-1]), set()).add(parts[-1])
    return files


def newest_valid_checkpoint(storage: Storage, prefix: str, log: Callable[[str], None],
                            files: Optional[dict[str, set[str]]] = None,
                            at_most: Optional[int] = None) -> Optional[tuple[str, bytes]]:
    """The one "newest valid checkpoint" routine, of the driver (planning a resume) and of the
    workers (loading one): (key, verified ``state.pt`` bytes) of the newest checkpoint under
    ``prefix`` in a ``Storage`` whose checksum holds — of epoch ``at_most`` or earlier, if
    given — warning about each newer corrupt or incomplete one; None if there is none and
    nothing corrupt (a folder without its checksum file is an upload cut short, never a
    checkpoint). ``files``: ``checkpoint_folders`` of the prefix, when the caller listed it.
    Raises CorruptCheckpointError when every candidate is corrupt."""
    files = checkpoint_folders(storage, prefix) if files is None else files
    epoch_of = {d: checkpoint_epoch(d.rsplit("/", 1)[-1]) or 0 for d in files}
    problems = []
    for directory in sorted(files, key=lambda d: (epoch_of[d], d), reverse=True):
        if at_most is not None and epoch_of[directory] > at_most:
            continue
        if CHECKSUM_FILE not in files[directory]:  # written last: the upload did not finish
            log(f"WARNING: checkpoint {storage.key_uri(directory)} is incomplete (no {CHECKSUM_FILE}: its "
                f"upload was cut short); skipped")
            continue
        try:
            data = storage.read_bytes(f"{directory}/{STATE_FILE}")
            expected = storage.read_text(f"{directory}/{CHECKSUM_FILE}").strip()
        except Exception as exc:  # a checksum without its state is as bad as a wrong one
            problems.append(f"{storage.key_uri(directory)}: {exc}")
            log(f"WARNING: checkpoint {storage.key_uri(directory)} is unreadable ({exc}); "
                f"falling back to the previous checkpoint")
            continue
        if checksum_matches(data, expected):
            # Parsed here too, so that the driver (planning the resume) refuses a planted pickle
            # with exit 2 before any worker starts; UnsafeCheckpointError is never fallen back from.
            state_from_bytes(data, where=storage.key_uri(f"{directory}/{STATE_FILE}"))
            return directory, data
        problems.append(f"{storage.key_uri(directory)}: checksum mismatch")
        log(f"WARNING: checkpoint {storage.key_uri(directory)} does not match its checksum; "
            f"falling back to the previous checkpoint")
    if not problems:
        return None
    raise CorruptCheckpointError("every checkpoint under " + storage.key_uri(prefix) + " is corrupt ("
                                 + "; ".join(problems) + "): refusing to resume — delete them or use a new name")


def upload_checkpoint(local_dir: str, dir_name: str, retry_seconds: float) -> Any:
    """``checkpoint_upload_fn`` of the workers' ``ray.train.report``: the checkpoint in
    ``local_dir`` to the run's storage as ``dir_name`` (``copy_checkpoint``); returns the stored
    ``ray.train.Checkpoint``."""
    import ray.train

    from backdoor_train.training.rayinternals import checkpoint_destination

    fs, dest = checkpoint_destination(dir_name)
    copy_checkpoint(local_dir, fs, dest, retry_seconds)
    return ray.train.Checkpoint(path=dest, filesystem=fs)


def copy_checkpoint(local_dir: str, fs: Any, dest: str, retry_seconds: float) -> None:
    """The checkpoint in ``local_dir`` to folder ``dest`` of pyarrow filesystem ``fs``, checksum
    last, retried across transient storage errors for ``retry_seconds``."""
    from pyarrow import fs as pafs

    from backdoor_train.storage.retry import is_transient, retry_transient
    from backdoor_train.storage import StorageError

    dir_name = posixpath.basename(dest.rstrip("/"))

    def upload() -> None:
        # A folder of that name may hold a corrupt checkpoint a rerun resumed before: clear it.
        fs.delete_dir_contents(dest, missing_dir_ok=True)
        fs.create_dir(dest)
        for name in (STATE_FILE, CHECKSUM_FILE):
            pafs.copy_files(os.path.join(local_dir, name), f"{dest}/{name}",
                            source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

    try:
        retry_transient(upload, f"uploading checkpoint {dir_name}", retry_seconds, log=print)
    except Exception as exc:
        # Ray retries an upload whose error names a transient AWS error: ours already did, for
        # the whole bound, so the error must not name one (or the bound would triple).
        # The bound is named only where retries ran: an error waiting cannot cure failed at once.
        if is_transient(exc) and retry_seconds > 0:
            raise StorageError(f"uploading checkpoint {dir_name} to {dest} failed for storage.retry_seconds="
                               f"{retry_seconds:g}: the storage stayed unreachable or failing") from None
        if is_transient(exc):  # retry_seconds 0: no retry ran, so no bound to name
            raise StorageError(f"uploading checkpoint {dir_name} to {dest} failed: the storage was unreachable "
                               f"or failing (storage.retry_seconds=0: not retried)") from None
        raise StorageError(f"uploading checkpoint {dir_name} to {dest} failed: {type(exc).__name__}: "
                           f"{' '.join(str(exc).split())}") from None
