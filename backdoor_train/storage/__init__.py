"""Where a run's checkpoints and artifacts live: a local directory or S3-compatible storage.

``open_storage(cfg.storage)`` returns a ``Storage`` rooted at ``storage.path``: base.py is
the protocol, local.py and s3.py its backends, arrow.py the same protocol over the pyarrow
filesystem Ray Train hands its workers. Which artifact lives under which key is storage/runstore.py's.
Ray Train gets the same root through ``ray_storage()`` for its checkpoints.
"""

from __future__ import annotations

from backdoor_train.config import StorageConfig
from backdoor_train.storage.base import Storage, StorageError, atomic_write_local
from backdoor_train.storage.local import LocalStorage
from backdoor_train.storage.s3 import S3Storage


def open_storage(cfg: StorageConfig) -> Storage:
    if cfg.path.startswith("s3://"):
        return S3Storage(cfg.path, retry_seconds=cfg.retry_seconds)
    return LocalStorage(cfg.path)


__all__ = ["LocalStorage", "S3Storage", "Storage", "StorageError", "atomic_write_local", "open_storage"]
