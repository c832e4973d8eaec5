"""A ``Storage`` in a local directory (the embedded default): atomic writes by rename."""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Any, Callable, Optional

from backdoor_train.storage.base import Storage, StorageError, atomic_write_local

if TYPE_CHECKING:
    from backdoor_train.storage.runlock import RunLock


class LocalStorage(Storage):
    def __init__(self, path: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(path))
        self.uri = self.root

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *key.strip("/").split("/"))

    def path_of(self, key: str) -> str:
        """The local file of ``key``."""
        return self._path(key)

    def acquire_lock(self, key: str, info: dict[str, Any],
                     on_lost: Optional[Callable[[], None]] = None) -> tuple[Optional[RunLock], Optional[dict[str, Any]]]:
        """An ``fcntl`` lock on the file of ``key``: the kernel releases it when its holder dies, so
        it is never lost while held (``on_lost`` is never called)."""
        from backdoor_train.storage.runlock import acquire_local

        return acquire_local(self._path(key), info)

    def lock_holder(self, key: str) -> Optional[dict[str, Any]]:
        from backdoor_train.storage.runlock import local_holder

        return local_holder(self._path(key))

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
