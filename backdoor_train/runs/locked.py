"""The start every command that writes into an experiment's name shares: ``locked_run``.

An experiment, a multi-seed experiment and a detection each make the config's local paths
absolute (Ray workers run in other directories), refuse a config the cluster cannot hold before
anything is written (where the command trains), open and check the storage, and take the name's
run lock (storage/runlock.py) under a new run id for the whole of their work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid
from dataclasses import dataclass
from typing import Iterator

from backdoor_train.config import ExperimentConfig
from backdoor_train.storage import Storage, open_storage
from backdoor_train.storage.runlock import run_lock
from backdoor_train.training.fitting import check_cluster
from backdoor_train.training.precision import check_precision


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Make local paths absolute on the driver: Ray workers run in other directories."""
    def fix(path: str) -> str:
        return path if "://" in path else os.path.abspath(os.path.expanduser(path))

    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, root=fix(cfg.data.root)),
        storage=dataclasses.replace(cfg.storage, path=fix(cfg.storage.path)),
    )


def new_run_id() -> str:
    """A run's id: in its run lock, its results and its metrics' labels."""
    return uuid.uuid4().hex[:12]


@dataclass(frozen=True)
class LockedRun:
    """A run holding its name's lock: its config (local paths absolute), its checked storage
    and the run id the lock records."""

    cfg: ExperimentConfig
    storage: Storage
    run_id: str


@contextlib.contextmanager
def locked_run(cfg: ExperimentConfig, cluster_check: bool = True) -> Iterator[LockedRun]:
    """``cfg``'s run with its name's lock held for the block: paths made absolute, the cluster
    checked to hold one of its fits and, in bf16, to run it usefully (``cluster_check``: a
    ``ClusterError`` or ``ConfigError`` before anything is written), the storage opened and
    checked (a ``StorageError``), the lock taken (a ``StorageError`` naming the run holding it;
    ``RunLockLost`` if another run takes it over)."""
    cfg = absolute_paths(cfg)
    if cluster_check:
        check_cluster(cfg)  # before the manifest and any training: a config the cluster cannot hold is bad input
        check_precision(cfg)  # bf16 where the workers' chips cannot run it is bad input too
    storage = open_storage(cfg.storage)
    storage.check()
    run_id = new_run_id()
    with run_lock(storage, cfg.name, run_id):  # one run of a name at a time
        yield LockedRun(cfg, storage, run_id)
