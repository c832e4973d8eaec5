"""One run per experiment name at a time: a lock next to the run's files.

Two runs of the same name would write the same checkpoints, manifest and results. The driver
takes ``<name>/run.lock`` before it checks or writes anything of the run and gives it back at
the end; a second run is refused (exit 2) naming the one that holds it. The lock records who
holds it (run id, host, pid, start) so the refusal can say so. Each storage backend picks its
kind of lock (``Storage.acquire_lock`` and ``lock_holder``, in local.py and s3.py):

* Local storage: an ``fcntl`` lock on the file. The kernel releases it when the holding process
  dies, however it dies, so a killed run never blocks the next one.
* S3: the object is created only if absent (``If-None-Match: *``, AWS S3 and MinIO) and its
  holder rewrites it every ``HEARTBEAT_S``, each write conditioned on the ETag of its own last
  one (``If-Match``). A lock not rewritten for ``STALE_AFTER_S`` belongs to a run that died
  without releasing it and is taken over by one PUT conditioned on the stale lock's ETag: of two
  runs taking it over at once exactly one wins. A holder whose conditioned beat fails has lost
  the lock (an outage longer than ``STALE_AFTER_S`` let another run take it), and so has one that
  could not renew it for ``STALE_AFTER_S`` (it stops before storage answers again): it stops its
  fits and ends with ``RunLockLost`` (exit 1), writing nothing more.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from backdoor_train.storage.base import Storage, StorageError
from backdoor_train.storage.runstore import RunStore

if TYPE_CHECKING:
    from backdoor_train.storage.s3 import S3Storage

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


class RunLockLost(RuntimeError):
    """Another run took this run's S3 lock over: the run stopped writing (exit 1)."""


class RunLock:
    """A held lock; ``release`` gives it back (idempotent). ``lost``: why it was lost, if it was."""

    lost: Optional[str] = None

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
    """Rewrites its object every ``HEARTBEAT_S`` until released, each time only if it is still
    the object this lock wrote last (its ETag); ``on_lost`` is called once when it is not."""

    def __init__(self, storage: S3Storage, key: str, info: dict[str, Any], etag: str,
                 on_lost: Optional[Callable[[], None]] = None) -> None:
        self.key, self.info, self.etag, self.on_lost = key, dict(info), etag, on_lost
        # A beat gives up retrying before release() stops waiting for it, or it could write the
        # lock again after release deleted it; release rides out an outage until the lock would
        # be stale anyway, so that a run ended by an outage leaves its name free to rerun.
        self.beat_storage = storage.with_retry(HEARTBEAT_S / 2)
        self.storage = storage.with_retry(STALE_AFTER_S)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        last_renewed = time.time()
        while not self.stop.wait(HEARTBEAT_S):
            self.info["heartbeat_at"] = time.time()
            try:
                etag = self.beat_storage.replace_if_match(self.key, json.dumps(self.info).encode(), self.etag)
            except Exception:  # an outage: the next beat tries again
                unrenewed = time.time() - last_renewed
                if unrenewed > STALE_AFTER_S:
                    # Stale now: another run may take the lock over the moment storage answers it.
                    # Stop before then, rather than learn it from the next beat while this run's
                    # retried uploads land beside the new holder's.
                    self._lose(unrenewed, expired=True)
                    return
                continue
            if etag is None:  # never over another run's lock: the condition failed, nothing written
                self._lose(time.time() - last_renewed)
                return
            self.etag, last_renewed = etag, time.time()

    def _lose(self, unrenewed_s: float, expired: bool = False) -> None:
        stopped = ("so this run stopped its training and wrote no results; its committed checkpoints "
                   "are kept")
        if expired:
            self.lost = (f"the run lock {self.storage.key_uri(self.key)} could not be renewed for "
                         f"{unrenewed_s:.0f} s (storage did not answer) and is stale after "
                         f"{STALE_AFTER_S:.0f} s, when another run may take it over: {stopped}")
        else:
            try:
                holder = describe_holder(self.beat_storage.read_json(self.key))
            except Exception:
                holder = "nobody (it was deleted)"
            self.lost = (f"the run lock {self.storage.key_uri(self.key)} now belongs to {holder}: it was taken "
                         f"over {unrenewed_s:.0f} s after this run last renewed it (a lock is stale after "
                         f"{STALE_AFTER_S:.0f} s), {stopped}")
        print(f"ERROR: {self.lost}", flush=True)
        if self.on_lost is not None:
            self.on_lost()

    def release(self) -> None:
        if self.stop.is_set():
            return
        self.stop.set()
        # A beat in flight may take as long as one S3 request can (boto3's timeouts, ~60 s):
        # deleting before it lands would let it write the lock again.
        self.thread.join(timeout=HEARTBEAT_S + 90)
        if self.lost:
            return
        try:
            self.storage.delete_if_match(self.key, self.etag)  # only the object this lock wrote
        except Exception:  # unreachable: it goes stale by itself
            pass


def s3_holder(storage: S3Storage, key: str) -> Optional[dict[str, Any]]:
    """The live holder of the S3 lock (None: absent, stale or unreadable)."""
    if not storage.exists(key):
        return None
    try:
        holder = storage.read_json(key)
    except Exception:
        return None
    return None if _stale(holder) else holder


def _stale(holder: dict[str, Any]) -> bool:
    try:
        return time.time() - float(holder.get("heartbeat_at", 0)) > STALE_AFTER_S
    except (TypeError, ValueError):
        return True


def acquire_s3(storage: S3Storage, key: str, info: dict[str, Any],
               on_lost: Optional[Callable[[], None]] = None) -> tuple[Optional[RunLock], Optional[dict[str, Any]]]:
    body = json.dumps(info).encode()
    etag = storage.create_if_absent(key, body)
    if etag:
        return S3RunLock(storage, key, info, etag, on_lost), None
    try:
        data, stale_etag = storage.read_with_etag(key)
        holder = json.loads(data)
        holder = holder if isinstance(holder, dict) else {}
    except ValueError:  # not JSON: nobody's live lock
        holder = {}
    except Exception:  # released between our create and read: try once more
        etag = storage.create_if_absent(key, body)
        return (S3RunLock(storage, key, info, etag, on_lost), None) if etag else (None, s3_holder(storage, key) or {})
    if not _stale(holder):
        return None, holder
    # Stale: its run died without releasing it. One PUT conditioned on the stale object's ETag:
    # of two runs taking it over at once, the second finds the ETag changed and is refused.
    etag = storage.replace_if_match(key, body, stale_etag)
    if etag:
        return S3RunLock(storage, key, info, etag, on_lost), None
    return None, s3_holder(storage, key) or {}


def run_lock_holder(storage: Storage, name: str) -> Optional[dict[str, Any]]:
    """Who is running experiment ``name`` in ``storage`` right now (None: nobody)."""
    return storage.lock_holder(RunStore(storage, name).lock_key())


def refuse_if_running(storage: Storage, name: str) -> None:
    holder = run_lock_holder(storage, name)
    if holder is not None:
        raise _locked(storage, name, holder)


def acquire_run_lock(storage: Storage, name: str, run_id: str,
                     on_lost: Optional[Callable[[], None]] = None) -> RunLock:
    """Take the lock of experiment ``name`` (the storage's own kind of lock); a ``StorageError``
    naming the holder if taken. ``on_lost``: called (from the heartbeat thread) if another run
    takes the lock over (S3)."""
    lock, holder = storage.acquire_lock(RunStore(storage, name).lock_key(), holder_info(run_id), on_lost)
    if lock is None:
        raise _locked(storage, name, holder or {})
    return lock


class _LockLostInterrupt(KeyboardInterrupt):
    """Raised in the main thread when the lock is lost: a KeyboardInterrupt, so every running
    fit is aborted exactly as on Ctrl-C; ``run_lock`` turns it into ``RunLockLost``."""


# A signal of the product's own, not SIGINT: a driver started in the background by a shell has
# SIGINT ignored, and a real signal (unlike ``_thread.interrupt_main``) also wakes a blocking call.
_LOST_SIGNAL = signal.SIGUSR2


def _on_lost_signal(signum: int, frame: Any) -> None:
    raise _LockLostInterrupt()


@contextlib.contextmanager
def run_lock(storage: Storage, name: str, run_id: str) -> Iterator[RunLock]:
    """The run lock of ``name`` held for the block. If it is lost, the main thread is
    interrupted (the fits are aborted as on Ctrl-C) and the block ends in ``RunLockLost``."""
    # Only the main thread can take a signal; elsewhere the loss is raised when the block ends.
    main = threading.current_thread() is threading.main_thread()
    on_lost = None
    if main:
        previous = signal.signal(_LOST_SIGNAL, _on_lost_signal)
        main_ident = threading.main_thread().ident
        on_lost = lambda: signal.pthread_kill(main_ident, _LOST_SIGNAL)  # noqa: E731
    try:
        lock = acquire_run_lock(storage, name, run_id, on_lost=on_lost)
        try:
            yield lock
        except KeyboardInterrupt:
            if lock.lost:
                raise RunLockLost(lock.lost) from None
            raise
        finally:
            lock.release()
    finally:
        if main:
            signal.signal(_LOST_SIGNAL, previous)
    if lock.lost:  # lost as the block ended: its last writes may have raced the new holder
        raise RunLockLost(lock.lost)


def _locked(storage: Storage, name: str, holder: dict[str, Any]) -> Exception:
    stale = f" (a run that died leaves it stale after {STALE_AFTER_S:.0f} s)" if storage.stale_locks else ""
    return StorageError(f"name: experiment {name!r} at {storage.key_uri(name)} is being run right now by "
                        f"{describe_holder(holder)}{stale}: wait for it to finish, or choose another name")
