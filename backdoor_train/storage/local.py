"""A ``Storage`` in a local directory (the embedded default): atomic writes by rename."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional

from backdoor_train.storage.base import Storage, StorageError, atomic_write_local


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
        try:
            atomic_write_local(self._path(key), data)
        except OSError as exc:  # a full disk, say: an operational failure (exit 1) that names the file
            raise OSError(exc.errno, f"writing {self.key_uri(key)}: {exc.strerror or exc}") from None

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
