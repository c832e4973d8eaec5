"""Where a rerun resumes, and Ray Train's run snapshot kept truthful and intact.

Ray Train resumes a run name from its run snapshot, ``checkpoint_manager_snapshot.json``
beside the checkpoints: the checkpoints it registered, the latest first to load. After an
interrupted write the snapshot and the checkpoint folders disagree: a crash between a
checkpoint's upload and the snapshot's update leaves it naming an older checkpoint; Ray
rewrites it in place, so a full disk leaves it at 0 bytes and every later start fails to
parse it; a checkpoint corrupted or deleted since is still listed.

So the driver decides, before each fit (``prepare_resume``): the newest checkpoint whose
checksum holds (a scan of the folders) is where the variant resumes. The snapshot is kept
only if Ray's own schema parses it, everything it lists exists and its latest is that same
checkpoint; otherwise it is moved aside (``….invalid-<unix time>``, for a post-mortem) and
the workers load the checkpoint by name when Ray has none to give them (Ray Train V2's
replacement for ``resume_from_checkpoint``). Either way the message names the checkpoint the
workers load, and the workers print it again when they do.

The snapshot's file name and schema are Ray's private API: training/rayinternals.py reads it.
The controller writes its snapshot durably (``write_snapshot``, installed by training/fitting.py):
locally to a temp file renamed into place, so a full disk leaves the previous one; on object
storage in one upload (atomic), retried across transient errors for ``storage.retry_seconds``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from backdoor_train.training.checkpoint import checkpoint_epoch, checkpoint_folders, newest_valid_checkpoint
from backdoor_train.training.rayinternals import SNAPSHOT_FILE, read_snapshot
from backdoor_train.storage.retry import retry_transient
from backdoor_train.storage import Storage, atomic_write_local


@dataclass(frozen=True)
class ResumePlan:
    """Where one variant's fit starts: ``checkpoint`` (a folder name beside the snapshot) or
    None for from scratch; ``snapshot_problem`` says why Ray's snapshot cannot stay, if so."""

    checkpoint: Optional[str]
    snapshot_problem: Optional[str]

    @property
    def epochs_done(self) -> int:
        return checkpoint_epoch(self.checkpoint or "") or 0


def snapshot_problem(data: bytes, newest: Optional[str], existing: set[str]) -> Optional[str]:
    """Why Ray could not, or should not, resume from the snapshot ``data`` when ``newest`` is the
    newest valid checkpoint and ``existing`` the checkpoint folders there; None if it can."""
    import ray

    if not data:
        return "is empty (0 bytes: an interrupted write)"
    try:
        snapshot = read_snapshot(data)  # with the schema Ray loads it with
    except ValueError:
        return "is unreadable (not a snapshot Ray can parse: an interrupted write?)"
    if snapshot.ray_version != ray.__version__:
        return f"was written by Ray {snapshot.ray_version}, which this Ray ({ray.__version__}) refuses"
    missing = sorted(name for name in snapshot.checkpoint_dir_names if name not in existing)
    if missing:
        return f"lists checkpoints that no longer exist ({', '.join(missing)})"
    if snapshot.latest != newest:
        return (f"names {snapshot.latest or 'no checkpoint'} as the latest, but the newest valid checkpoint is "
                f"{newest or 'none'}")
    return None


def plan_resume(storage: Storage, prefix: str, log: Callable[[str], None]) -> ResumePlan:
    """Where the fit whose Ray run folder is ``prefix`` resumes; reads, writes nothing.
    Raises ``CorruptCheckpointError`` when there are checkpoints and none is valid."""
    folders = checkpoint_folders(storage, prefix)
    found = newest_valid_checkpoint(storage, prefix, log, folders)
    newest = found[0].rsplit("/", 1)[-1] if found else None
    key = f"{prefix}/{SNAPSHOT_FILE}"
    if not storage.exists(key):
        return ResumePlan(newest, None)
    existing = {folder.rsplit("/", 1)[-1] for folder in folders}
    return ResumePlan(newest, snapshot_problem(storage.read_bytes(key), newest, existing))


def prepare_resume(storage: Storage, prefix: str, label: str, log: Callable[[str], None],
                   plan: Optional[ResumePlan] = None) -> ResumePlan:
    """``plan`` (default: ``plan_resume`` now), carried out: a snapshot that cannot stay is
    moved aside; says what the fit will do. A plan made earlier must have been made under the
    run lock, so that nothing changed since."""
    plan = plan or plan_resume(storage, prefix, log)
    if plan.snapshot_problem:
        key = f"{prefix}/{SNAPSHOT_FILE}"
        aside = f"{key}.invalid-{int(time.time())}"
        storage.write_bytes(aside, storage.read_bytes(key))
        storage.delete(key)
        log(f"{label}: Ray's run snapshot {storage.key_uri(key)} {plan.snapshot_problem}; "
            f"moved aside to {aside.rsplit('/', 1)[-1]}")
    if plan.checkpoint:
        log(f"{label}: resuming after epoch {plan.epochs_done} from "
            f"{storage.key_uri(f'{prefix}/{plan.checkpoint}')}")
    elif plan.snapshot_problem:
        log(f"{label}: no valid checkpoint: training from scratch")
    return plan


def write_snapshot(filesystem: Any, path: str, text: str, retry_seconds: float) -> None:
    """Ray's ``_write_state_to_storage``, durable: never a half-written snapshot in place."""
    data = text.encode("utf-8")
    if filesystem.type_name == "local":
        atomic_write_local(path, data)  # a full disk fails here and leaves the previous one
        return

    def upload() -> None:
        # One object written whole: readers see the old snapshot or the new, never a part.
        with filesystem.open_output_stream(path) as fh:
            fh.write(data)

    retry_transient(upload, f"writing Ray Train's run snapshot {path}", retry_seconds, log=print)
