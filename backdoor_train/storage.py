"""Where a run's checkpoints and artifacts live: a local directory or S3-compatible storage.

``open_storage(cfg.storage)`` returns a ``Storage`` rooted at ``storage.path``. Artifacts are
addressed by '/'-joined keys relative to that root and written atomically (a local temp file
renamed into place; a single S3 PUT), so a failed run never leaves a half-written file.
Ray Train gets the same root through ``ray_storage()`` for its checkpoints.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Optional

from backdoor_train.config import StorageConfig


class StorageError(RuntimeError):
    """The storage location is unreachable, refuses us, or lacks something we need. ``kind``
    says which when it is known: "missing", "unreachable" or "refused"."""

    def __init__(self, message: str, kind: str = "other") -> None:
        super().__init__(message)
        self.kind = kind


class Storage:
    """A root URI plus atomic reads and writes of keys below it."""

    uri: str

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


class LocalStorage(Storage):
    def __init__(self, path: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(path))
        self.uri = self.root

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *key.strip("/").split("/"))

    def path_of(self, key: str) -> str:
        """The local file of ``key`` (the run lock locks it with fcntl)."""
        return self._path(key)

    def check(self) -> None:
        try:
            os.makedirs(self.root, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError as exc:
            raise StorageError(f"storage.path: cannot write to {self.root!r}: {exc.strerror or exc}") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        atomic_write_local(self._path(key), data)

    def read_bytes(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            raise StorageError(f"{self.key_uri(key)} does not exist", kind="missing") from None

    def exists(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        keys = []
        for dirpath, _, files in os.walk(base):
            for name in files:
                rel = os.path.relpath(os.path.join(dirpath, name), self.root)
                keys.append(rel.replace(os.sep, "/"))
        return sorted(keys)

    def ray_storage(self) -> tuple[str, Optional[Any]]:
        return self.root, None


def open_storage(cfg: StorageConfig) -> Storage:
    if cfg.path.startswith("s3://"):
        from backdoor_train.s3 import S3Storage

        return S3Storage(cfg.path, retry_seconds=cfg.retry_seconds)
    return LocalStorage(cfg.path)
