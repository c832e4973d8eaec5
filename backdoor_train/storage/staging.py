"""Where a dataset's files come from: a local data root, or a copy staged in S3.

``stage_data`` uploads a local copy of a registered dataset (its files gzipped, plus a
manifest of their sha256, ``<dataset>_manifest.json``) to ``s3://bucket/prefix``. With ``data.root: s3://bucket/prefix`` every node then
downloads it once into a local cache (``$BACKDOOR_TRAIN_CACHE_DIR``, default
``~/.cache/backdoor_train``), under a file lock so the workers sharing a node download it
once, checking each file against the manifest. The manifest is written last, so a copy is
staged once it exists; ``data.wait_seconds`` waits for it (a run started beside its staging Job).
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import re
import time
from typing import Any, Callable

from backdoor_train.config import DataConfig, ExperimentConfig
from backdoor_train.data.split import DataError, DatasetSpec, Split, read_raw
from backdoor_train.data.registry import get_dataset, load_split
from backdoor_train.storage.base import Storage

ENV_CACHE_DIR = "BACKDOOR_TRAIN_CACHE_DIR"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def staged_manifest(spec: DatasetSpec) -> str:
    """The key of the manifest a staged copy of ``spec`` is known by (written last)."""
    return f"{spec.name}_manifest.json"


def cache_dir() -> str:
    return os.environ.get(ENV_CACHE_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "backdoor_train")


def stage_data(source_root: str, dest_uri: str, log: Callable[[str], None] = print,
               create_bucket: bool = False, dataset: str = DataConfig.name) -> dict[str, str]:
    """Upload the files of ``dataset`` under ``source_root`` to ``dest_uri`` (s3://...); return
    the manifest."""
    from backdoor_train.storage.s3 import S3Storage

    spec = get_dataset(dataset)
    source_root = os.path.abspath(os.path.expanduser(source_root))
    spec.check_root(source_root)
    for train in (True, False):  # refuse to stage a corrupt copy
        spec.load(source_root, train)
    storage = S3Storage(dest_uri)
    if create_bucket:
        storage.create_bucket()
    storage.check()
    existing: dict[str, str] = {}
    if storage.exists(staged_manifest(spec)):
        existing = json.loads(storage.read_text(staged_manifest(spec)))
    manifest = {}
    for name in spec.files:
        gzipped = os.path.join(spec.folder_path(source_root), name + ".gz")
        if os.path.isfile(gzipped):  # already compressed: upload as is (compressing 47 MB takes seconds)
            with open(gzipped, "rb") as fh:
                data = fh.read()
        else:
            data = gzip.compress(read_raw(spec.find(source_root, name)), mtime=0)
        key = f"{spec.folder}/{name}.gz"
        manifest[key] = _sha256(data)
        if existing.get(key) == manifest[key] and storage.exists(key):
            log(f"{storage.key_uri(key)} is already staged")
            continue
        storage.write_bytes(key, data)
        log(f"staged {storage.key_uri(key)} ({len(data)} bytes)")
    # The manifest goes last: readers trust only files it lists.
    storage.write_text(staged_manifest(spec), json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def wait_for_staged(storage: Storage, uri: str, spec: DatasetSpec, wait_seconds: float,
                    log: Callable[[str], None] = print) -> dict:
    """The manifest of the copy staged at ``uri``, waiting up to ``wait_seconds`` for it to
    appear, and for the storage to answer (a MinIO pod still starting); a ``DataError`` when
    it does not, or at once when the storage refuses us (credentials)."""
    from backdoor_train.storage import StorageError

    started, said = time.monotonic(), False
    deadline = started + wait_seconds
    while True:
        try:
            text = storage.read_text(staged_manifest(spec))
            try:
                return json.loads(text)
            except ValueError:
                raise DataError(f"data.root: {storage.key_uri(staged_manifest(spec))} is not JSON: stage the "
                                f"data again") from None
        except StorageError as exc:
            left = deadline - time.monotonic()
            if exc.kind not in ("missing", "unreachable") or left <= 0:
                # Say how long it did wait: a refusal ends the wait at once, whatever wait_seconds allows.
                spent = time.monotonic() - started
                waited = f" after waiting {spent:.1f}s (data.wait_seconds: {wait_seconds:g})" if spent >= 0.1 else ""
                raise DataError(f"data.root: no staged {spec.title} at {uri}{waited} ({exc}); "
                                f"run `backdoor-train stage-data` first") from None
            if not said:
                said = True
                log(f"waiting up to {wait_seconds:g}s (data.wait_seconds) for {spec.title} to be staged at {uri} "
                    f"(by `backdoor-train stage-data`; in Kubernetes the stage-mnist Job): {exc}")
            time.sleep(min(5.0, left))


def staged_keys(spec: DatasetSpec) -> set[str]:
    """The keys ``stage_data`` writes for ``spec`` (besides the manifest)."""
    return {f"{spec.folder}/{name}.gz" for name in spec.files}


def check_staged_manifest(manifest: Any, spec: DatasetSpec, where: str) -> dict[str, str]:
    """``manifest`` if it is what ``stage_data`` writes: exactly ``spec``'s keys, each with a
    sha256. Its keys become local paths, so a bucket's writer must not choose them (a key
    ``../../.bashrc`` would write outside the cache)."""
    ok = isinstance(manifest, dict) and set(manifest) == staged_keys(spec) and all(
        isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for v in manifest.values())
    if not ok:
        raise DataError(f"data.root: {where} is not a manifest of {spec.title} as stage-data writes it (it must "
                        f"map exactly {', '.join(sorted(staged_keys(spec)))} to sha256 digests): stage the data again")
    return manifest


def _fetch_staged(uri: str, spec: DatasetSpec, wait_seconds: float = 0.0) -> str:
    """Download the staged copy at ``uri`` into this node's cache (once); return the local root."""
    from backdoor_train.storage.s3 import S3Storage, split_s3_uri

    bucket, prefix = split_s3_uri(uri)
    local_root = os.path.join(cache_dir(), "s3", bucket, *([p for p in prefix.split("/") if p]))
    os.makedirs(local_root, exist_ok=True)
    # Reads fail fast: a wrong endpoint is bad input, found before any training.
    storage = S3Storage(uri, retry_seconds=0)
    with open(os.path.join(local_root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = check_staged_manifest(wait_for_staged(storage, uri, spec, wait_seconds), spec,
                                         storage.key_uri(staged_manifest(spec)))
        for key, digest in sorted(manifest.items()):
            dest = os.path.join(local_root, *key.split("/"))
            if os.path.isfile(dest):
                with open(dest, "rb") as fh:
                    if _sha256(fh.read()) == digest:
                        continue
            data = storage.read_bytes(key)
            if _sha256(data) != digest:
                raise DataError(f"data.root: {storage.key_uri(key)} does not match its sha256 in "
                                f"{storage.key_uri(staged_manifest(spec))}")
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            tmp = dest + ".part"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, dest)
    return local_root


def resolve_data_root(cfg: ExperimentConfig) -> str:
    """A local directory in torchvision's layout of ``data.name`` for ``data.root``."""
    if cfg.data.root.startswith("s3://"):
        from backdoor_train.storage import StorageError

        try:
            return _fetch_staged(cfg.data.root, cfg.dataset, cfg.data.wait_seconds)
        except StorageError as exc:
            raise DataError(f"data.root: {exc}") from None
    root = os.path.abspath(os.path.expanduser(cfg.data.root))
    cfg.dataset.check_root(root, cfg.data.download)
    return root


def load_splits(cfg: ExperimentConfig) -> tuple[Split, Split]:
    """The training and test splits of ``cfg``'s dataset, cut to ``data.*_samples``."""
    root = resolve_data_root(cfg)
    download = cfg.data.download and not cfg.data.root.startswith("s3://")
    train = load_split(cfg.dataset, root, train=True, limit=cfg.data.train_samples, download=download)
    test = load_split(cfg.dataset, root, train=False, limit=cfg.data.test_samples, download=download)
    return train, test
