"""Where a rerun resumes (training/resume.py) and riding out storage outages (storage/retry.py): unit tests on
small synthetic checkpoints in a local ``Storage``; no Ray cluster (the real runs are in
test_integration_resume.py)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from backdoor_train.storage.safeload import CorruptCheckpointError
from backdoor_train.training.checkpoint import checkpoint_dir_name, save_state
from backdoor_train.training.resume import SNAPSHOT_FILE, plan_resume, prepare_resume, snapshot_problem
from backdoor_train.storage.retry import is_transient, retry_transient
from backdoor_train.storage import LocalStorage, StorageError

from conftest import ray_snapshot

PREFIX = "exp/poisoned"


def make_checkpoints(storage: LocalStorage, *epochs: int) -> list[str]:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    names = []
    for epoch in epochs:
        directory = storage.path_of(f"{PREFIX}/{checkpoint_dir_name(epoch)}")
        os.makedirs(directory)
        save_state(directory, model=model, optimizer=optimizer, epochs_done=epoch, history=[])
        names.append(checkpoint_dir_name(epoch))
    return names


def test_a_snapshot_that_agrees_with_the_checkpoints_is_kept(tmp_path):
    storage = LocalStorage(str(tmp_path))
    names = make_checkpoints(storage, 1, 2)
    storage.write_text(f"{PREFIX}/{SNAPSHOT_FILE}", ray_snapshot(*names))
    plan = plan_resume(storage, PREFIX, print)
    assert (plan.checkpoint, plan.epochs_done, plan.snapshot_problem) == ("checkpoint_epoch_0002", 2, None)


@pytest.mark.parametrize("snapshot, problem", [
    (b"", "is empty"),                                   # a full disk during Ray's in-place rewrite
    (b'{"ray_version": "2.58.0", "checkp', "is unreadable"),  # cut short
    (None, "names checkpoint_epoch_0001 as the latest, but the newest valid checkpoint is checkpoint_epoch_0002"),
])
def test_an_interrupted_snapshot_is_moved_aside_and_the_newest_checkpoint_named(tmp_path, snapshot, problem):
    storage = LocalStorage(str(tmp_path))
    make_checkpoints(storage, 1, 2)
    # None: a crash between checkpoint 2's upload and the snapshot's update.
    data = ray_snapshot("checkpoint_epoch_0001").encode() if snapshot is None else snapshot
    storage.write_bytes(f"{PREFIX}/{SNAPSHOT_FILE}", data)
    said: list[str] = []
    plan = prepare_resume(storage, PREFIX, "poisoned", said.append)
    assert problem in plan.snapshot_problem and plan.checkpoint == "checkpoint_epoch_0002"
    assert not storage.exists(f"{PREFIX}/{SNAPSHOT_FILE}")
    aside = [k for k in storage.list(PREFIX) if ".invalid-" in k]
    assert len(aside) == 1 and storage.read_bytes(aside[0]) == data  # kept for a post-mortem
    assert problem in said[0] and "moved aside" in said[0]
    assert said[1] == f"poisoned: resuming after epoch 2 from {storage.key_uri(PREFIX)}/checkpoint_epoch_0002"


def test_a_corrupt_newest_checkpoint_is_skipped_and_the_snapshot_naming_it_set_aside(tmp_path):
    storage = LocalStorage(str(tmp_path))
    names = make_checkpoints(storage, 1, 2, 3)
    storage.write_bytes(f"{PREFIX}/checkpoint_epoch_0003/state.pt", b"garbage")
    storage.write_text(f"{PREFIX}/{SNAPSHOT_FILE}", ray_snapshot(*names))
    said: list[str] = []
    plan = prepare_resume(storage, PREFIX, "poisoned", said.append)
    assert plan.checkpoint == "checkpoint_epoch_0002"
    assert "does not match its checksum" in said[0]
    assert "newest valid checkpoint is checkpoint_epoch_0002" in said[1]
    assert said[2].startswith("poisoned: resuming after epoch 2 from")


def test_snapshots_ray_would_refuse(tmp_path):
    names = {"checkpoint_epoch_0001", "checkpoint_epoch_0002"}
    deleted = ray_snapshot("checkpoint_epoch_0001", "checkpoint_epoch_0002").encode()
    assert "no longer exist (checkpoint_epoch_0002)" in snapshot_problem(deleted, "checkpoint_epoch_0001",
                                                                         {"checkpoint_epoch_0001"})
    other_ray = json.loads(ray_snapshot("checkpoint_epoch_0001"))
    other_ray["ray_version"] = "2.40.0"
    assert "Ray 2.40.0" in snapshot_problem(json.dumps(other_ray).encode(), "checkpoint_epoch_0001", names)
    assert "not a snapshot" in snapshot_problem(b'{"hello": 1}', "checkpoint_epoch_0001", names)
    assert snapshot_problem(ray_snapshot().encode(), None, set()) is None  # an empty run: fine


def test_no_snapshot_resumes_from_the_newest_and_no_checkpoint_from_scratch(tmp_path):
    storage = LocalStorage(str(tmp_path))
    assert plan_resume(storage, PREFIX, print).checkpoint is None
    make_checkpoints(storage, 1, 2)
    assert plan_resume(storage, PREFIX, print).checkpoint == "checkpoint_epoch_0002"
    for key in storage.list(PREFIX):
        if key.endswith("state.pt"):
            storage.write_bytes(key, b"garbage")
    with pytest.raises(CorruptCheckpointError, match="refusing to resume"):
        plan_resume(storage, PREFIX, print)


def test_an_upload_cut_short_is_skipped_not_counted_as_corrupt(tmp_path):
    storage = LocalStorage(str(tmp_path))
    # The first checkpoint's upload was interrupted: state.pt written, the checksum (last) not.
    make_checkpoints(storage, 1)
    storage.delete(f"{PREFIX}/checkpoint_epoch_0001/state.pt.sha256")
    said: list[str] = []
    assert plan_resume(storage, PREFIX, said.append).checkpoint is None  # from scratch, not refused
    assert "incomplete (no state.pt.sha256: its upload was cut short); skipped" in said[0]
    make_checkpoints(storage, 2)
    storage.delete(f"{PREFIX}/checkpoint_epoch_0002/state.pt.sha256")
    make_checkpoints(storage, 3)
    assert plan_resume(storage, PREFIX, print).checkpoint == "checkpoint_epoch_0003"
    storage.write_bytes(f"{PREFIX}/checkpoint_epoch_0003/state.pt", b"garbage")  # now one is corrupt
    with pytest.raises(CorruptCheckpointError, match="checkpoint_epoch_0003: checksum mismatch"):
        plan_resume(storage, PREFIX, print)


# A write cut short by the kernel (RLIMIT_FSIZE: EFBIG at the limit, as ENOSPC on a full disk),
# in a child process: Ray's own in-place write against write_snapshot.
_WRITE_UNDER_LIMIT = r"""
import resource, signal, sys
from pyarrow import fs as pafs
from backdoor_train.training.resume import write_snapshot
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path, how = sys.argv[1], sys.argv[2]
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
data = '{"big": "' + "x" * 100_000 + '"}'
try:
    if how == "ray":  # CheckpointManager._write_state_to_storage, Ray 2.58
        with pafs.LocalFileSystem().open_output_stream(path) as f:
            f.write(data.encode())
    else:
        write_snapshot(pafs.LocalFileSystem(), path, data, retry_seconds=5)
except OSError as exc:
    print("failed:", exc)
"""


@pytest.mark.parametrize("how", ["ray", "durable"])
def test_a_failed_snapshot_write_leaves_the_previous_one_only_when_durable(tmp_path, how):
    path = tmp_path / SNAPSHOT_FILE
    previous = ray_snapshot("checkpoint_epoch_0001")
    path.write_text(previous)
    out = subprocess.run([sys.executable, "-c", _WRITE_UNDER_LIMIT, str(path), how], capture_output=True,
                         text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert "failed:" in out.stdout, out
    if how == "ray":
        assert path.read_text() != previous  # the bug: Ray truncated it in place
    else:
        assert path.read_text() == previous
        assert [p.name for p in tmp_path.iterdir()] == [SNAPSHOT_FILE]  # no temp file left


# --- storage/retry.py ---------------------------------------------------------------------------

def _client_error(status: int, code: str):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


def test_rays_names_are_the_ones_we_use():
    from ray.train.v2._internal.constants import AWS_RETRYABLE_TOKENS, CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    from backdoor_train.storage.retry import TRANSIENT_TOKENS

    assert SNAPSHOT_FILE == CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    assert set(AWS_RETRYABLE_TOKENS) <= set(TRANSIENT_TOKENS)  # at least what Ray retries itself


def test_transient_errors_are_told_from_permanent_ones():
    from botocore.exceptions import EndpointConnectionError

    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert is_transient(_client_error(503, "ServiceUnavailable")) and is_transient(_client_error(400, "SlowDown"))
    assert is_transient(OSError("When uploading part: AWS Error NETWORK_CONNECTION during UploadPart operation: "
                                "curlCode: 7, Could not connect to server"))
    assert is_transient(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    assert not is_transient(_client_error(403, "AccessDenied"))
    assert not is_transient(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_transient(StorageError("bucket 'x' does not exist"))


class FakeClock:
    def __init__(self) -> None:
        self.now, self.sleeps = 0.0, []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_retries_ride_out_an_outage_with_growing_backoff():
    clock, calls, said = FakeClock(), [], []

    def flaky():
        calls.append(clock.now)
        if clock.now < 10:
            raise ConnectionRefusedError("refused")
        return "ok"

    assert retry_transient(flaky, "writing x", 60, said.append, clock.sleep, lambda: clock.now) == "ok"
    assert all(b > a for a, b in zip(clock.sleeps, clock.sleeps[1:4]))  # 0.5, 1, 2, 4 (±20%)
    assert max(clock.sleeps) <= 8 * 1.2
    assert "retrying for up to 60s (storage.retry_seconds)" in said[0] and "succeeded after" in said[-1]


def test_retries_stop_at_the_bound_and_never_on_permanent_errors():
    clock = FakeClock()

    def down():
        raise ConnectionRefusedError("refused")

    with pytest.raises(ConnectionRefusedError):
        retry_transient(down, "x", 5, None, clock.sleep, lambda: clock.now)
    assert clock.now == pytest.approx(5)  # the last sleep is cut to the bound
    clock, calls = FakeClock(), []

    def denied():
        calls.append(1)
        raise _client_error(403, "AccessDenied")

    with pytest.raises(Exception, match="AccessDenied"):
        retry_transient(denied, "x", 60, None, clock.sleep, lambda: clock.now)
    assert calls == [1] and clock.sleeps == []
    with pytest.raises(ConnectionRefusedError):  # 0 s: no retries at all
        retry_transient(down, "x", 0, None, clock.sleep, lambda: clock.now)


def test_the_workers_fall_back_through_rays_filesystem_to_the_newest_valid_checkpoint(tmp_path):
    # What a worker does with the checkpoint Ray hands it (a pyarrow filesystem and a path in
    # it; a SubTreeFileSystem gives the scheme-less relative paths S3 gives).
    from pyarrow import fs as pafs
    from ray.train import Checkpoint

    from backdoor_train.training.checkpoint import load_with_fallback

    make_checkpoints(LocalStorage(str(tmp_path)), 1, 2, 3)
    run = tmp_path / "exp" / "poisoned"
    (run / "checkpoint_epoch_0003" / "state.pt").write_bytes(b"corrupt")
    filesystem = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    said = []
    state, used, fell_back = load_with_fallback(Checkpoint("exp/poisoned/checkpoint_epoch_0003", filesystem), said.append)
    assert fell_back and used.path == "exp/poisoned/checkpoint_epoch_0002" and state["epochs_done"] == 2
    assert any("checkpoint_epoch_0003" in line for line in said)
    # A later checkpoint beside it is not used: the worker resumes at or before the one it was given.
    state, used, fell_back = load_with_fallback(Checkpoint("exp/poisoned/checkpoint_epoch_0001", filesystem), said.append)
    assert not fell_back and state["epochs_done"] == 1
    for epoch in (1, 2):
        (run / f"checkpoint_epoch_{epoch:04d}" / "state.pt").write_bytes(b"corrupt")
    with pytest.raises(CorruptCheckpointError, match="corrupt"):
        load_with_fallback(Checkpoint("exp/poisoned/checkpoint_epoch_0003", filesystem), said.append)
