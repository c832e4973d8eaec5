"""S3-compatible object storage (AWS S3, MinIO): settings, errors, and the S3 ``Storage``.

Endpoint, region and credentials come only from the environment — the standard AWS
variables below, which boto3 users and MinIO deployments already set — never from the
config file, and they are never printed. boto3 handles artifacts and checks; a pyarrow
``S3FileSystem`` built from the same settings (with an explicit ``endpoint_override``)
carries Ray Train's checkpoints. Both retry transient errors a few times themselves; the
storage operations of a run are retried on top for ``storage.retry_seconds`` (storage/retry.py), so
an outage of seconds does not end it.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional
from urllib.parse import urlparse

from backdoor_train.config import StorageConfig
from backdoor_train.storage.retry import botocore_connection_errors, is_transient, retry_transient
from backdoor_train.storage.base import Storage, StorageError

if TYPE_CHECKING:
    from backdoor_train.storage.runlock import RunLock


ENV_ENDPOINT = "AWS_ENDPOINT_URL"
ENV_REGION = "AWS_REGION"
ENV_DEFAULT_REGION = "AWS_DEFAULT_REGION"
ENV_ACCESS_KEY = "AWS_ACCESS_KEY_ID"
ENV_SECRET_KEY = "AWS_SECRET_ACCESS_KEY"
ENV_SESSION_TOKEN = "AWS_SESSION_TOKEN"
ENV_MAX_ATTEMPTS = "BACKDOOR_TRAIN_S3_MAX_ATTEMPTS"
S3_ENV_VARS = (ENV_ENDPOINT, ENV_REGION, ENV_DEFAULT_REGION, ENV_ACCESS_KEY, ENV_SECRET_KEY,
               ENV_SESSION_TOKEN, ENV_MAX_ATTEMPTS)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' → ('bucket', 'a/b')."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    return bucket, prefix.strip("/")


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: Optional[str]
    region: str
    access_key: Optional[str]
    secret_key: Optional[str] = None
    session_token: Optional[str] = None
    max_attempts: int = 5

    @classmethod
    def from_env(cls, env: Optional[dict[str, str]] = None) -> "S3Settings":
        env = os.environ if env is None else env
        endpoint = env.get(ENV_ENDPOINT) or env.get("AWS_ENDPOINT_URL_S3") or None
        if endpoint is not None:
            parsed = urlparse(endpoint)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise StorageError(f"{ENV_ENDPOINT} must be an http(s)://host[:port] URL (got {endpoint!r})")
        try:
            attempts = int(env.get(ENV_MAX_ATTEMPTS, "5"))
        except ValueError:
            raise StorageError(f"{ENV_MAX_ATTEMPTS} must be an integer") from None
        return cls(
            endpoint_url=endpoint,
            region=env.get(ENV_REGION) or env.get(ENV_DEFAULT_REGION) or "us-east-1",
            access_key=env.get(ENV_ACCESS_KEY) or None,
            secret_key=env.get(ENV_SECRET_KEY) or None,
            session_token=env.get(ENV_SESSION_TOKEN) or None,
            max_attempts=max(1, attempts),
        )

    def where(self) -> str:
        return self.endpoint_url or f"AWS S3 ({self.region})"

    def boto3_client(self, max_attempts: Optional[int] = None) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            region_name=self.region,
            connect_timeout=5,
            read_timeout=60,
            # "standard" retries throttling, 5xx and connection errors with exponential backoff.
            retries={"mode": "standard", "total_max_attempts": max_attempts or self.max_attempts},
            s3={"addressing_style": "path"} if self.endpoint_url else None,
        )
        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, aws_session_token=self.session_token,
                            config=config)

    def pyarrow_fs(self) -> Any:
        from pyarrow import fs as pafs

        kwargs: dict[str, Any] = {
            "region": self.region,
            "connect_timeout": 5,
            "request_timeout": 60,
            # Used in this process; pickled copies (Ray's workers) fall back to pyarrow's default,
            # which is the same standard strategy with 3 attempts.
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=self.max_attempts),
        }
        if self.access_key:
            kwargs.update(access_key=self.access_key, secret_key=self.secret_key,
                          session_token=self.session_token)
        if self.endpoint_url:
            parsed = urlparse(self.endpoint_url)
            kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme,
                          force_virtual_addressing=False)
        return pafs.S3FileSystem(**kwargs)


def explain_s3_error(exc: BaseException, settings: S3Settings, what: str) -> StorageError:
    """Turn a botocore exception into one plain sentence naming the resource (never a secret)."""
    from botocore import exceptions as bex

    if isinstance(exc, botocore_connection_errors()):
        return StorageError(f"cannot reach the S3 endpoint {settings.where()} ({ENV_ENDPOINT}) for {what}: {exc}",
                            kind="unreachable")
    if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return StorageError(f"no S3 credentials for {what}: set {ENV_ACCESS_KEY} and {ENV_SECRET_KEY}, or give the "
                            f"pod a role the SDKs' default chain finds (IRSA, EKS Pod Identity, an instance profile)",
                            kind="refused")
    if isinstance(exc, bex.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden") \
                or status == 403:
            return StorageError(f"S3 credentials rejected by {settings.where()} for {what} ({code or status}): "
                                f"check {ENV_ACCESS_KEY} / {ENV_SECRET_KEY}", kind="refused")
        if code in ("NoSuchBucket",) or (status == 404 and "bucket" in what):
            return StorageError(f"{what} does not exist on {settings.where()}", kind="missing")
        if code in ("NoSuchKey", "404") or status == 404:
            return StorageError(f"{what} does not exist", kind="missing")
        return StorageError(f"S3 error for {what} on {settings.where()}: {code or status}",
                            kind="unreachable" if is_transient(exc) else "other")
    return StorageError(f"S3 error for {what} on {settings.where()}: {type(exc).__name__}: {exc}")


class S3Storage(Storage):
    """Keys below s3://bucket/prefix; each write is one PUT, so readers never see half a file.
    Reads and writes ride out transient errors for ``retry_seconds`` (see storage/retry.py)."""

    stale_locks = True  # a conditionally written object with a heartbeat (storage/runlock.py)

    def __init__(self, uri: str, settings: Optional[S3Settings] = None,
                 retry_seconds: float = StorageConfig.retry_seconds) -> None:
        self.bucket, self.prefix = split_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.settings = settings or S3Settings.from_env()
        self.retry_seconds = retry_seconds
        self._client = None

    def with_retry(self, seconds: float) -> "S3Storage":
        """The same storage, riding out outages for ``seconds`` instead (it shares the client
        once one is made)."""
        other = copy.copy(self)
        other.retry_seconds = seconds
        return other

    def acquire_lock(self, key: str, info: dict[str, Any],
                     on_lost: Optional[Callable[[], None]] = None) -> tuple[Optional[RunLock], Optional[dict[str, Any]]]:
        """The object at ``key``, created only if absent and rewritten by a heartbeat while held."""
        from backdoor_train.storage.runlock import acquire_s3

        return acquire_s3(self, key, info, on_lost)

    def lock_holder(self, key: str) -> Optional[dict[str, Any]]:
        from backdoor_train.storage.runlock import s3_holder

        return s3_holder(self, key)

    def _call(self, fn: Any, key: str) -> Any:
        """``fn()`` retried across transient errors; any error left one ``StorageError``."""
        try:
            return retry_transient(fn, f"S3 request for {self.key_uri(key)}", self.retry_seconds, log=print)
        except Exception as exc:
            raise explain_s3_error(exc, self.settings, self.key_uri(key)) from None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self.settings.boto3_client()
        return self._client

    def _key(self, key: str) -> str:
        key = key.strip("/")
        return f"{self.prefix}/{key}" if self.prefix else key

    def check(self) -> None:
        # Few attempts: an unreachable endpoint or a wrong key should fail in seconds, not minutes.
        client = self.settings.boto3_client(max_attempts=2)
        what = f"bucket {self.bucket!r} (storage.path {self.uri})"
        try:
            client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise explain_s3_error(exc, self.settings, what) from None

    def create_bucket(self) -> None:
        """Create the bucket if it does not exist (the staging Job's first step on a new MinIO)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
                raise explain_s3_error(exc, self.settings, f"bucket {self.bucket!r}") from None
        except Exception as exc:
            raise explain_s3_error(exc, self.settings, f"bucket {self.bucket!r}") from None
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise explain_s3_error(exc, self.settings, f"creating bucket {self.bucket!r}") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call(lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data), key)

    def create_if_absent(self, key: str, data: bytes) -> Optional[str]:
        """One PUT that succeeds only if ``key`` does not exist yet (``If-None-Match: *``): the
        new object's ETag, or None when it exists. AWS S3 and MinIO honour the condition."""
        return self._conditional_put(key, data, IfNoneMatch="*")

    def replace_if_match(self, key: str, data: bytes, etag: str) -> Optional[str]:
        """One PUT that succeeds only while ``key`` still has ``etag`` (``If-Match``, AWS S3
        since 2024 and MinIO): the new ETag, or None when another writer changed or deleted it.
        Of two writers holding the same ETag exactly one wins: the atomic step of a takeover."""
        return self._conditional_put(key, data, IfMatch=etag)

    def read_with_etag(self, key: str) -> tuple[bytes, str]:
        """``key``'s bytes and the ETag they have, from one GET (read and ETag agree)."""
        def get() -> tuple[bytes, str]:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return resp["Body"].read(), resp["ETag"]
        return self._call(get, key)

    def delete_if_match(self, key: str, etag: str) -> bool:
        """Delete ``key`` only while it has ``etag``; False when it changed (someone else's now)
        or is gone."""
        from botocore.exceptions import ClientError

        def delete() -> bool:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=self._key(key), IfMatch=etag)
                return True
            except ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (404, 409, 412):
                    return False
                raise
        return self._call(delete, key)

    def _conditional_put(self, key: str, data: bytes, **condition: str) -> Optional[str]:
        from botocore.exceptions import ClientError

        def put() -> Optional[str]:
            try:
                return self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)["ETag"]
            except ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (404, 409, 412):
                    return None
                raise

        try:
            etag = retry_transient(put, f"S3 request for {self.key_uri(key)}", self.retry_seconds, log=print)
        except Exception as exc:
            raise explain_s3_error(exc, self.settings, self.key_uri(key)) from None
        if etag is None and self.retry_seconds:
            # A retried PUT whose first attempt landed meets its own write: that is a success.
            try:
                current, current_etag = self.read_with_etag(key)
            except StorageError:
                return None
            return current_etag if current == data else None
        return etag

    def delete(self, key: str) -> None:
        self._call(lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)), key)

    def read_bytes(self, key: str) -> bytes:
        return self._call(lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read(), key)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise explain_s3_error(exc, self.settings, self.key_uri(key)) from None
        except Exception as exc:
            raise explain_s3_error(exc, self.settings, self.key_uri(key)) from None

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix)
        full = full + "/" if full and not full.endswith("/") else full
        keys = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    keys.append(obj["Key"][len(self.prefix) + 1:] if self.prefix else obj["Key"])
        except Exception as exc:
            raise explain_s3_error(exc, self.settings, f"s3://{self.bucket}/{full}") from None
        return sorted(keys)

    def ray_storage(self) -> tuple[str, Optional[Any]]:
        # With an explicit filesystem Ray wants the path without the scheme.
        return f"{self.bucket}/{self.prefix}".rstrip("/"), self.settings.pyarrow_fs()
