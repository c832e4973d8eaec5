"""The ``Storage`` protocol every backend implements, and its one error type.

Keys are '/'-joined and relative to the storage's root; writes are atomic (whole or not at
all), so a failed run never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from backdoor_train.storage.runlock import RunLock


class StorageError(RuntimeError):
    """The storage location is unreachable, refuses us, or lacks something we need. ``kind``
    says which when it is known: "missing", "unreachable" or "refused"."""

    def __init__(self, message: str, kind: str = "other") -> None:
        super().__init__(message)
        self.kind = kind


class Storage:
    """A root URI plus atomic reads and writes of keys below it, and a run lock per name.

    The run lock (storage/runlock.py, which has the locking itself) is each backend's own kind:
    ``acquire_lock`` and ``lock_holder`` pick it, ``stale_locks`` says how a dead holder's lock ends."""

    uri: str
    # False: a lock ends with its holder's process (the kernel's); True: the lock of a run that
    # died stays until it is stale (runlock.STALE_AFTER_S), when another run may take it over.
    stale_locks: bool = False

    def key_uri(self, key: str) -> str:
        return self.uri.rstrip("/") + "/" + key.lstrip("/")

    def check(self) -> None:
        """Raise StorageError unless the root can be written to."""
        raise NotImplementedError

    def write_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def read_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def list(self, prefix: str) -> list[str]:
        """Keys below ``prefix`` (recursively), relative to the root, sorted."""
        raise NotImplementedError

    def ray_storage(self) -> tuple[str, Optional[Any]]:
        """(storage_path, storage_filesystem) for ray.train.RunConfig."""
        raise NotImplementedError

    def with_retry(self, seconds: float) -> "Storage":
        """The same storage, riding out outages for ``seconds``; one that retries nothing: itself."""
        return self

    def acquire_lock(self, key: str, info: dict[str, Any],
                     on_lost: Optional[Callable[[], None]] = None) -> "tuple[Optional[RunLock], Optional[dict[str, Any]]]":
        """Take the run lock at ``key``, recording ``info`` as its holder: (lock, None); (None, the
        holder's record) when a live run holds it. ``on_lost``: called, from another thread, if
        another run takes a held lock over (a lock that can go stale)."""
        raise NotImplementedError

    def lock_holder(self, key: str) -> Optional[dict[str, Any]]:
        """The record of the live run holding the lock at ``key``, without taking it; None: nobody."""
        raise NotImplementedError

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def read_text(self, key: str) -> str:
        try:
            return self.read_bytes(key).decode("utf-8")
        except UnicodeDecodeError:
            raise StorageError(f"{self.key_uri(key)} is not UTF-8 text: corrupt") from None

    def read_json(self, key: str) -> dict[str, Any]:
        """A JSON object the project wrote; a ``StorageError`` naming it when it is corrupt."""
        try:
            data = json.loads(self.read_text(key))
        except ValueError as exc:
            raise StorageError(f"{self.key_uri(key)} is corrupt (not JSON: {exc})") from None
        if not isinstance(data, dict):
            raise StorageError(f"{self.key_uri(key)} is corrupt (not a JSON object)")
        return data


def atomic_write_local(path: str, data: bytes) -> None:
    """``data`` at ``path`` whole or not at all: a temp file beside it, fsynced, renamed over it."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
