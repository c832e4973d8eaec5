"""Riding out storage outages: which errors are transient, and retrying them for a bounded time.

Object storage has short outages (a MinIO pod restarting, a load balancer failing over,
throttling). boto3 and pyarrow each retry a few times within about a second, which an
outage of a few seconds outlasts. Every write of a run (artifacts, the workers' checkpoint
uploads, Ray Train's run snapshot) goes through ``retry_transient``: transient errors are
retried with exponential backoff for ``storage.retry_seconds``, then the last one is raised
and the run ends with exit 1, resumable. (The S3 run lock keeps its own bounds: a heartbeat
gives up after 5 s, the release after 60 s, when the lock would be stale anyway.) Errors that
waiting cannot cure (credentials, a missing bucket, a full local disk) are raised at once.
"""

from __future__ import annotations

import random
import time
from typing import Callable, Optional, TypeVar

T = TypeVar("T")

# pyarrow's S3 errors are OSErrors whose message names the AWS error class; these are the
# classes Ray Train itself retries (ray.train.v2 constants) plus curl's connection failures.
TRANSIENT_TOKENS = ("AWS Error SLOW_DOWN", "AWS Error INTERNAL_FAILURE", "AWS Error SERVICE_UNAVAILABLE",
                    "AWS Error NETWORK_CONNECTION", "AWS Error UNKNOWN", "curlCode: 7", "curlCode: 28",
                    "curlCode: 52", "curlCode: 56")
TRANSIENT_S3_CODES = ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                      "ServiceUnavailable", "RequestTimeTooSkewed")


def botocore_connection_errors() -> tuple[type, ...]:
    """botocore's exceptions for an endpoint that does not answer (refused, timed out, dropped)."""
    from botocore import exceptions as bex

    return (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ReadTimeoutError, bex.ConnectionClosedError)


def is_transient(exc: BaseException) -> bool:
    """Whether waiting may cure ``exc``: a lost connection, a timeout, a 5xx or throttling."""
    try:
        from botocore import exceptions as bex
    except ImportError:  # pragma: no cover - boto3 is a dependency
        bex = None
    if bex is not None:
        if isinstance(exc, botocore_connection_errors()):
            return True
        if isinstance(exc, bex.ClientError):
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return status >= 500 or exc.response.get("Error", {}).get("Code") in TRANSIENT_S3_CODES
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, OSError) and any(token in str(exc) for token in TRANSIENT_TOKENS)


def retry_transient(fn: Callable[[], T], what: str, seconds: float,
                    log: Optional[Callable[[str], None]] = None,
                    sleep: Callable[[float], None] = time.sleep,
                    clock: Callable[[], float] = time.monotonic) -> T:
    """``fn()``, retried on transient errors with exponential backoff (0.5 s doubling to 8 s,
    with jitter) until ``seconds`` have passed since the first attempt; then the last error
    is raised. Non-transient errors are raised at once. ``log`` hears of the first retry and
    of the recovery, so an outage shows in the run's output."""
    deadline = clock() + seconds
    delay, attempt = 0.5, 0
    while True:
        attempt += 1
        try:
            result = fn()
        except Exception as exc:
            left = deadline - clock()
            if not is_transient(exc) or left <= 0:
                raise
            if log is not None and attempt == 1:
                log(f"WARNING: {what} failed ({type(exc).__name__}: {_first_line(exc)}); "
                    f"retrying for up to {seconds:g}s (storage.retry_seconds)")
            sleep(min(delay * random.uniform(0.8, 1.2), left))
            delay = min(delay * 2, 8.0)
            continue
        if log is not None and attempt > 1:
            log(f"{what} succeeded after {attempt} attempts")
        return result


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""
