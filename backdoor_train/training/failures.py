"""A failed fit told in one line: the cause, the variant, and what of it was kept.

A fit fails on a worker (a full disk, storage gone for longer than ``storage.retry_seconds``,
diverged training), on its controller (Ray's run snapshot), or when a worker's process or node
is lost. Ray hands the driver a ``WorkerGroupError`` whose text is every worker's whole
traceback, and prints each worker's traceback on the console too. The user needs the cause,
which variant, and what a rerun resumes from: ``FitFailed`` says that in one line; the worker's
traceback goes to a file in Ray's logs folder (named in the line), and on the console only with
``--debug`` (``BACKDOOR_TRAIN_DEBUG=1``).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import tempfile
import time
from typing import TYPE_CHECKING, Optional

from backdoor_train.training import rayinternals

if TYPE_CHECKING:
    from backdoor_train.storage import Storage
    from backdoor_train.storage.runstore import RunStore

DEBUG_ENV = "BACKDOOR_TRAIN_DEBUG"


class FitFailed(RuntimeError):
    """A variant's training failed; the other variants were stopped. ``str()`` is one line;
    ``detail`` the whole text Ray gave (the workers' tracebacks), ``log_path`` where it went."""

    def __init__(self, line: str, detail: str = "", log_path: Optional[str] = None) -> None:
        super().__init__(line)
        self.detail, self.log_path = detail, log_path


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


class _DropTrainingFunctionError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Error in training function")


def quiet_worker_tracebacks() -> None:
    """In a Train worker: Ray's own log of a failed training function is not printed (Ray would
    forward it to the driver's console); the driver keeps the traceback it is sent instead."""
    if not debug():
        logger = logging.getLogger(rayinternals.TRAIN_ERROR_LOGGER)
        if not any(isinstance(f, _DropTrainingFunctionError) for f in logger.filters):
            logger.addFilter(_DropTrainingFunctionError())


class _NoTraceback(logging.Formatter):
    """Formats a copy of the record without its traceback (the other handlers, Ray's log files,
    still get the record whole)."""

    def __init__(self, inner: Optional[logging.Formatter]) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        copy = logging.makeLogRecord(record.__dict__)
        copy.exc_info, copy.exc_text, copy.stack_info = None, None, None
        return self.inner.format(copy)


def quiet_controller_tracebacks() -> None:
    """In a fit's controller process, after Ray Train configured its loggers: the console
    (forwarded to the driver's) gets the messages without their tracebacks, which a lost node
    makes every callback still talking to it log; Ray's log files keep them whole."""
    if debug():
        return
    # Where Ray Train's records go: its own handlers when its structured logging is on, else
    # (the default) up to Ray's and the root logger's stderr handler.
    # Ray's handler in a worker process writes through an inner plain handler of its own.
    for name in ("ray.train", "ray", ""):
        for outer in logging.getLogger(name).handlers:
            for handler in rayinternals.inner_handlers(outer):
                if isinstance(handler, logging.Handler) and not isinstance(handler, logging.FileHandler) \
                        and not isinstance(handler.formatter, _NoTraceback):
                    handler.setFormatter(_NoTraceback(handler.formatter))


def root_cause(exc: BaseException) -> BaseException:
    """The exception that ended the fit, out of Ray Train's wrappers."""
    from ray.train import ControllerError, WorkerGroupError

    while True:
        if isinstance(exc, WorkerGroupError) and exc.worker_failures:
            exc = exc.worker_failures[min(exc.worker_failures)]
        elif isinstance(exc, ControllerError):
            exc = exc.controller_failure
        elif rayinternals.user_exception(exc) is not None:
            exc = rayinternals.user_exception(exc)
        else:
            return exc


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def cause_of(exc: BaseException) -> str:
    """One line saying what happened, in the user's words where the kind is known."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, NodeDiedError, WorkerCrashedError

    cause = root_cause(exc)
    text = " ".join(str(cause).split())
    if isinstance(cause, (ActorDiedError, ActorUnavailableError, NodeDiedError, WorkerCrashedError)) \
            or "WorkerHealthCheckFailedError" in type(cause).__name__:
        return f"a training worker's process or node was lost ({type(cause).__name__}: {text[:300]})"
    if "gloo" in text and re.search(r"Connection (reset|closed) by peer", text):
        # The surviving workers of a DDP group see the lost one as a dropped collective.
        return f"a training worker's process or node was lost (its DDP peer's connection dropped: {text[:300]})"
    if "No space left on device" in text or getattr(cause, "errno", None) == errno.ENOSPC:
        where = re.search(r" to (\S+) failed", text)
        return f"no space left on the device{' under ' + where.group(1) if where else ''} ({text[:300]})"
    if "\n" in str(cause) and "Traceback" in str(cause):  # a traceback as text: its last line
        return _last_line(str(cause))[:500]
    return f"{type(cause).__name__}: {text[:500]}"


def kept_checkpoints(storage: Storage, store: RunStore, variants: list[str]) -> str:
    """What a rerun resumes from: each variant's newest committed checkpoint."""
    from backdoor_train.training.checkpoint import CHECKSUM_FILE, STATE_FILE, checkpoint_epoch, checkpoint_folders

    kept = []
    for variant in variants:
        try:
            quick = storage.with_retry(0)  # no outage riding
            folders = checkpoint_folders(quick, store.variant_prefix(variant))
        except Exception:  # storage gone: say so rather than wait for it
            kept.append(f"{variant}: unknown (the storage does not answer)")
            continue
        done = [checkpoint_epoch(key.rsplit("/", 1)[-1]) for key, files in folders.items()
                if {STATE_FILE, CHECKSUM_FILE} <= files]
        kept.append(f"{variant}: epoch {max(done)}" if done else f"{variant}: no checkpoint")
    return ", ".join(kept)


def save_traceback(text: str, variant: str) -> Optional[str]:
    """The workers' tracebacks, to a file in Ray's logs folder (else the temp folder)."""
    from backdoor_train.training.raysession import logs_dir

    folder = logs_dir() or tempfile.gettempdir()
    path = os.path.join(folder, f"backdoor-train-{variant}-{time.strftime('%Y%m%d-%H%M%S')}.traceback")
    try:
        with open(path, "w") as fh:
            fh.write(text)
    except OSError:  # the full disk may be this one: the line must still be printed
        return None
    return path


def fit_failed(variant: str, exc: BaseException, storage: Storage, store: RunStore, variants: list[str]) -> FitFailed:
    """The ``FitFailed`` of ``variant`` failing with ``exc``, all of ``variants`` stopped."""
    detail = f"{type(exc).__name__}: {exc}"
    log_path = save_traceback(detail, variant)
    where = f"; the workers' tracebacks: {log_path}" if log_path else ""
    # A chain's checkpoints are its links' (the caller says what they kept): ``variants`` is empty.
    kept = f"; kept for a rerun: {kept_checkpoints(storage, store, variants)}" if variants else ""
    line = f"{variant}: {cause_of(exc)}{kept}{where}"
    return FitFailed(line, detail, log_path)
