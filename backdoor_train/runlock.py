"""One run per experiment name at a time: a lock next to the run's files.

Two runs of the same name would write the same checkpoints, manifest and results. The driver
takes ``<name>/run.lock`` before it checks or writes anything of the run and gives it back at
the end; a second run is refused (exit 2) naming the one that holds it. The lock records who
holds it (run id, host, pid, start) so the refusal can say so.

* Local storage: an ``fcntl`` lock on the file. The kernel releases it when the holding process
  dies, however it dies, so a killed run never blocks the next one.
* S3: the object is created only if absent (``If-None-Match: *``, AWS S3 and MinIO) and its
  holder rewrites it every ``HEARTBEAT_S``. A lock not rewritten for ``STALE_AFTER_S`` belongs to
  a run that died without releasing it and is taken over.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any, Optional

from backdoor_train.runstore import RunStore

HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0


def holder_info(run_id: str) -> dict[str, Any]:
    now = time.time()
    return {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "started_at": now,
            "heartbeat_at": now}


def describe_holder(holder: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started_at", 0)))
    return (f"run {holder.get('run_id', '?')} (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"started {started})")


class RunLock:
    """A held lock; ``release`` gives it back (idempotent)."""

    def release(self) -> None:
        raise NotImplementedError


class LocalRunLock(RunLock):
    def __init__(self, fd: int) -> None:
        self.fd: Optional[int] = fd

    def release(self) -> None:
        import fcntl

        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def acquire_local(path: str, info: Optional[dict[str, Any]]) -> tuple[Optional[RunLock], Optional[dict[str, Any]]]:
    """(lock, None) when taken, recording ``info`` as its holder (None: a probe, which leaves
    the last holder's record); (None, holder) when another process holds it."""
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with os.fdopen(fd, "rb") as fh:
            try:
                holder = json.loads(fh.read() or b"{}")
            except ValueError:  # the holder is writing it right now
                holder = {}
        return None, holder
    if info is not None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    return LocalRunLock(fd), None


def local_holder(path: str) -> Optional[dict[str, Any]]:
    """Who holds the lock at ``path`` right now (None: nobody), without taking it."""
    if not os.path.exists(path):
        return None
    lock, holder = acquire_local(path, None)
    if lock is not None:
        lock.release()
        return None
    return holder


class S3RunLock(RunLock):
    """Rewrites its object every ``HEARTBEAT_S`` until released."""

    def __init__(self, storage: Any, key: str, info: dict[str, Any]) -> None:
        self.key, self.info = key, dict(info)
        # A beat gives up retrying before release() stops waiting for it, or it could write the
        # lock again after release deleted it; release rides out an outage until the lock would
        # be stale anyway, so that a run ended by an outage leaves its name free to rerun.
        self.beat_storage = storage.with_retry(HEARTBEAT_S / 2)
        self.storage = storage.with_retry(STALE_AFTER_S)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            self.info["heartbeat_at"] = time.time()
            try:
                # Never over another run's lock: after an outage longer than STALE_AFTER_S another
                # run may have taken it over.
                if self.beat_storage.read_json(self.key).get("run_id") != self.info["run_id"]:
                    print(f"WARNING: the run lock {self.storage.key_uri(self.key)} now belongs to another run "
                          f"(this one could not renew it for {STALE_AFTER_S:.0f} s)", flush=True)
                    return
                self.beat_storage.write_text(self.key, json.dumps(self.info))
            except Exception:  # an outage: the next beat tries again; 60 s of them makes it stale
                pass

    def release(self) -> None:
        if self.stop.is_set():
            return
        self.stop.set()
        # A beat in flight may take as long as one S3 request can (boto3's timeouts, ~60 s):
        # deleting before it lands would let it write the lock again.
        self.thread.join(timeout=HEARTBEAT_S + 90)
        try:
            if self.storage.read_json(self.key).get("run_id") == self.info["run_id"]:
                self.storage.delete(self.key)
        except Exception:  # gone already, or unreachable: it goes stale by itself
            pass


def s3_holder(storage: Any, key: str) -> Optional[dict[str, Any]]:
    """The live holder of the S3 lock (None: absent, stale or unreadable)."""
    if not storage.exists(key):
        return None
    try:
        holder = storage.read_json(key)
    except Exception:
        return None
    if time.time() - float(holder.get("heartbeat_at", 0)) > STALE_AFTER_S:
        return None
    return holder


def acquire_s3(storage: Any, key: str, info: dict[str, Any]) -> tuple[Optional[RunLock], Optional[dict[str, Any]]]:
    body = json.dumps(info).encode()
    if storage.create_if_absent(key, body):
        return S3RunLock(storage, key, info), None
    holder = s3_holder(storage, key)
    if holder is not None:
        return None, holder
    # Stale: its run died without releasing it. Take it over; of two runs doing so at once the
    # second create fails and that run is refused.
    storage.delete(key)
    if storage.create_if_absent(key, body):
        return S3RunLock(storage, key, info), None
    return None, s3_holder(storage, key) or {}


def run_lock_holder(storage: Any, name: str) -> Optional[dict[str, Any]]:
    """Who is running experiment ``name`` in ``storage`` right now (None: nobody)."""
    from backdoor_train.storage import LocalStorage

    if isinstance(storage, LocalStorage):
        return local_holder(storage.path_of(RunStore(storage, name).lock_key()))
    return s3_holder(storage, RunStore(storage, name).lock_key())


def refuse_if_running(storage: Any, name: str) -> None:
    holder = run_lock_holder(storage, name)
    if holder is not None:
        raise _locked(storage, name, holder)


def acquire_run_lock(storage: Any, name: str, run_id: str) -> RunLock:
    """Take the lock of experiment ``name``; a ``RunLockedError`` naming the holder if taken."""
    from backdoor_train.storage import LocalStorage

    info = holder_info(run_id)
    if isinstance(storage, LocalStorage):
        lock, holder = acquire_local(storage.path_of(RunStore(storage, name).lock_key()), info)
    else:
        lock, holder = acquire_s3(storage, RunStore(storage, name).lock_key(), info)
    if lock is None:
        raise _locked(storage, name, holder or {})
    return lock


def _locked(storage: Any, name: str, holder: dict[str, Any]) -> Exception:
    from backdoor_train.storage import LocalStorage, StorageError

    stale = "" if isinstance(storage, LocalStorage) else \
        f" (a run that died leaves it stale after {STALE_AFTER_S:.0f} s)"
    return StorageError(f"name: experiment {name!r} at {storage.key_uri(name)} is being run right now by "
                        f"{describe_holder(holder)}{stale}: wait for it to finish, or choose another name")
