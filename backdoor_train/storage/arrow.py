"""The ``Storage`` protocol over a pyarrow filesystem and a root path in it: what Ray Train
hands its workers (``checkpoint.filesystem``), so that they read checkpoints through the same
routines as the driver (checkpointing.newest_valid_checkpoint) instead of a second copy."""

from __future__ import annotations

import posixpath
from typing import Any, Optional

from backdoor_train.storage.base import Storage, StorageError


class ArrowStorage(Storage):
    def __init__(self, filesystem: Any, root: str) -> None:
        self.filesystem, self.root = filesystem, root.rstrip("/")
        self.uri = self.root

    def _path(self, key: str) -> str:
        key = key.strip("/")
        return f"{self.root}/{key}" if key else self.root

    def full_path(self, key: str) -> str:
        """``key``'s path in the filesystem (for pyarrow's own calls)."""
        return self._path(key)

    def check(self) -> None:
        self.list("")

    def write_bytes(self, key: str, data: bytes) -> None:
        # Object stores write an object whole; Ray's local filesystem is only used on one node.
        with self.filesystem.open_output_stream(self._path(key)) as fh:
            fh.write(data)

    def read_bytes(self, key: str) -> bytes:
        try:
            with self.filesystem.open_input_stream(self._path(key)) as fh:
                return fh.read()
        except FileNotFoundError:
            raise StorageError(f"{self.key_uri(key)} does not exist", kind="missing") from None
        except OSError as exc:
            raise StorageError(f"cannot read {self.key_uri(key)}: {exc}") from None

    def exists(self, key: str) -> bool:
        from pyarrow import fs as pafs

        return self.filesystem.get_file_info(self._path(key)).type != pafs.FileType.NotFound

    def delete(self, key: str) -> None:
        try:
            self.filesystem.delete_file(self._path(key))
        except FileNotFoundError:
            pass

    def list(self, prefix: str) -> list[str]:
        from pyarrow import fs as pafs

        selector = pafs.FileSelector(self._path(prefix), allow_not_found=True, recursive=True)
        return sorted(posixpath.relpath(i.path, self.root) for i in self.filesystem.get_file_info(selector)
                      if i.type == pafs.FileType.File)

    def ray_storage(self) -> tuple[str, Optional[Any]]:
        return self.root, self.filesystem
