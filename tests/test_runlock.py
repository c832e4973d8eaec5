"""One run per experiment name at a time, on local storage (fcntl) and on S3 (a real S3 API,
moto_server: conditional create, heartbeat, stale takeover)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import re
import tempfile
import threading
import time

import pytest
import yaml

from backdoor_train.storage import runlock
from backdoor_train.cli import EXIT_BAD_INPUT, main
from backdoor_train.storage.runlock import acquire_run_lock, run_lock_holder
from backdoor_train.storage import LocalStorage, Storage, StorageError, open_storage
from backdoor_train.config import StorageConfig

from conftest import stop_process


def test_a_second_run_of_a_name_is_refused_naming_the_first(tmp_path, mnist_root, capsys):
    storage = LocalStorage(str(tmp_path / "runs"))
    lock = acquire_run_lock(storage, "exp", "first-run")
    with pytest.raises(StorageError, match=rf"experiment 'exp' .* is being run right now by run first-run "
                                           rf"\(host .*, pid {os.getpid()}, started "):
        acquire_run_lock(storage, "exp", "second-run")
    acquire_run_lock(storage, "other", "x").release()  # other names are free
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "exp", "data": {"root": mnist_root},
                                    "storage": {"path": str(tmp_path / "runs")}}))
    for command in ("check", "run"):  # refused before Ray starts
        assert main([command, str(path)]) == EXIT_BAD_INPUT
        assert "is being run right now by run first-run" in capsys.readouterr().err
    lock.release()
    lock.release()  # idempotent
    assert run_lock_holder(storage, "exp") is None
    assert main(["check", str(path)]) == 0


def test_a_killed_run_does_not_block_the_next(tmp_path):
    storage = LocalStorage(str(tmp_path / "runs"))
    code = ("import sys, time; from backdoor_train.storage import LocalStorage; "
            "from backdoor_train.storage.runlock import acquire_run_lock; "
            f"acquire_run_lock(LocalStorage({str(tmp_path / 'runs')!r}), 'exp', 'doomed'); "
            "print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert run_lock_holder(storage, "exp")["run_id"] == "doomed"
        proc.kill()  # SIGKILL: no chance to release
        proc.wait(timeout=30)
        acquire_run_lock(storage, "exp", "next").release()
    finally:
        stop_process(proc)


class _MemoryLocks(Storage):
    """A backend of its own kind of lock (neither a file nor an object), which can go stale."""

    uri = "mem://root"
    stale_locks = True

    def __init__(self) -> None:
        self.held: dict[str, dict] = {}

    def acquire_lock(self, key, info, on_lost=None):
        if key in self.held:
            return None, self.held[key]
        self.held[key] = info
        held = self.held

        class Held(runlock.RunLock):
            def release(self) -> None:
                held.pop(key, None)

        return Held(), None

    def lock_holder(self, key):
        return self.held.get(key)


def test_the_lock_is_the_storage_backends_own(tmp_path):
    storage = _MemoryLocks()
    lock = acquire_run_lock(storage, "exp", "first-run")
    assert run_lock_holder(storage, "exp")["run_id"] == "first-run" and list(storage.held) == ["exp/run.lock"]
    with pytest.raises(StorageError, match=r"mem://root/exp is being run right now by run first-run .*\(a run that "
                                           r"died leaves it stale after 60 s\)"):
        acquire_run_lock(storage, "exp", "second-run")
    lock.release()
    assert run_lock_holder(storage, "exp") is None
    local = LocalStorage(str(tmp_path / "runs"))  # the kernel's lock: ends with its holder, never stale
    held = acquire_run_lock(local, "exp", "first-run")
    with pytest.raises(StorageError) as refused:
        acquire_run_lock(local, "exp", "second-run")
    held.release()
    assert "is being run right now by run first-run" in str(refused.value) and "stale" not in str(refused.value)


def _config(tmp_path, **storage):
    from backdoor_train.config import ExperimentConfig

    cfg = ExperimentConfig()
    return dataclasses.replace(cfg, name="exp", data=dataclasses.replace(cfg.data, root="data"),
                               storage=dataclasses.replace(cfg.storage, path="runs", **storage))


def test_locked_run_holds_the_lock_of_the_name_for_the_block(tmp_path, monkeypatch):
    from backdoor_train.runs import locked

    monkeypatch.chdir(tmp_path)
    checked = []
    monkeypatch.setattr(locked, "check_cluster", checked.append)
    with locked.locked_run(_config(tmp_path)) as run:
        assert (run.cfg.storage.path, run.cfg.data.root) == (str(tmp_path / "runs"), str(tmp_path / "data"))
        assert re.fullmatch(r"[0-9a-f]{12}", run.run_id) and run.storage.uri == str(tmp_path / "runs")
        assert run_lock_holder(run.storage, "exp")["run_id"] == run.run_id
        assert checked == [run.cfg]  # the cluster was checked, with the absolute paths
        with pytest.raises(StorageError, match=f"is being run right now by run {run.run_id}"):
            with locked.locked_run(_config(tmp_path), cluster_check=False):
                pass
    assert run_lock_holder(LocalStorage(str(tmp_path / "runs")), "exp") is None
    assert len(checked) == 1  # not with cluster_check=False


def test_locked_run_refuses_a_config_the_cluster_cannot_hold_before_writing_anything(tmp_path, monkeypatch):
    from backdoor_train.runs import locked
    from backdoor_train.training.raysession import ClusterError

    def too_big(cfg):
        raise ClusterError("scaling.num_workers asks for too much")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(locked, "check_cluster", too_big)
    with pytest.raises(ClusterError):
        with locked.locked_run(_config(tmp_path)):
            raise AssertionError("the block ran")
    assert not (tmp_path / "runs").exists()  # storage not even opened


@pytest.mark.integration
def test_the_s3_lock_is_exclusive_beats_and_goes_stale(s3_env, monkeypatch):
    storage = open_storage(StorageConfig(path=f"s3://{s3_env}/runs"))
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.2)
    lock = acquire_run_lock(storage, "exp", "first-run")
    with pytest.raises(StorageError, match="is being run right now by run first-run .*stale after 60 s"):
        acquire_run_lock(storage, "exp", "second-run")
    first = storage.read_json("exp/run.lock")["heartbeat_at"]
    time.sleep(1.0)
    assert storage.read_json("exp/run.lock")["heartbeat_at"] > first  # the holder shows it lives
    lock.release()
    assert not storage.exists("exp/run.lock") and run_lock_holder(storage, "exp") is None

    # A run that died without releasing: after STALE_AFTER_S without a beat, the lock is taken over.
    dead = {**runlock.holder_info("dead-run"), "heartbeat_at": time.time() - runlock.STALE_AFTER_S - 1}
    storage.write_text("exp/run.lock", json.dumps(dead))
    assert run_lock_holder(storage, "exp") is None
    lock = acquire_run_lock(storage, "exp", "taker")
    assert storage.read_json("exp/run.lock")["run_id"] == "taker"
    lock.release()


def _stale_lock(storage, key: str = "exp/run.lock") -> None:
    dead = {**runlock.holder_info("dead-run"), "heartbeat_at": time.time() - runlock.STALE_AFTER_S - 1}
    storage.write_text(key, json.dumps(dead))


@pytest.mark.integration
def test_two_runs_taking_over_a_stale_lock_at_once_one_wins(s3_env, monkeypatch):
    """Both takers read the stale lock (and its ETag) before either writes: the interleaving
    in which delete-then-create let both win. The ETag-conditioned PUT lets exactly one."""
    import threading

    storage = open_storage(StorageConfig(path=f"s3://{s3_env}/runs"))
    _stale_lock(storage)
    both_read = threading.Barrier(2, timeout=20)
    stale, waited = runlock._stale, set()

    def stale_then_wait(holder):  # acquire_s3 asks once it has read the lock and its ETag
        if threading.current_thread().name not in waited:
            waited.add(threading.current_thread().name)
            both_read.wait()
        return stale(holder)

    monkeypatch.setattr(runlock, "_stale", stale_then_wait)
    outcomes: dict[str, object] = {}

    def take(run_id: str) -> None:
        try:
            outcomes[run_id] = acquire_run_lock(storage, "exp", run_id)
        except StorageError as exc:
            outcomes[run_id] = exc

    threads = [threading.Thread(target=take, args=(f"taker-{i}",)) for i in (1, 2)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    won = [r for r, o in outcomes.items() if isinstance(o, runlock.RunLock)]
    lost = [o for o in outcomes.values() if isinstance(o, StorageError)]
    assert len(won) == 1 and len(lost) == 1, outcomes
    assert storage.read_json("exp/run.lock")["run_id"] == won[0]
    assert f"is being run right now by run {won[0]}" in str(lost[0])
    outcomes[won[0]].release()
    assert not storage.exists("exp/run.lock")


@pytest.mark.integration
def test_a_holder_that_cannot_renew_its_lock_until_it_is_stale_stops_before_storage_returns(monkeypatch):
    # Storage stops answering: once the lock is stale another run may take it over as soon as
    # storage is back, so the holder gives it up then, without waiting for a beat to fail.
    class Unreachable:
        def with_retry(self, seconds):
            return self

        def replace_if_match(self, key, body, etag):
            raise ConnectionError("storage does not answer")

        def key_uri(self, key):
            return f"s3://bucket/{key}"

    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(runlock, "STALE_AFTER_S", 0.3)
    lost = threading.Event()
    lock = runlock.S3RunLock(Unreachable(), "exp/run.lock", runlock.holder_info("r1"), "etag-1", on_lost=lost.set)
    assert lost.wait(5)
    assert re.search(r"s3://bucket/exp/run.lock could not be renewed for 0 s \(storage did not answer\) and is "
                     r"stale after 0 s.*stopped its training", lock.lost)
    lock.release()  # nothing to delete: the lock is stale and may be another run's


def test_a_run_that_loses_its_lock_stops_and_never_writes_over_the_new_holder(s3_env, monkeypatch):
    storage = open_storage(StorageConfig(path=f"s3://{s3_env}/runs"))
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.2)
    started = time.monotonic()
    with pytest.raises(runlock.RunLockLost, match=r"the run lock s3://.*/runs/exp/run.lock now belongs to run "
                                                   r"new-holder .*stopped its training and wrote no results"):
        with runlock.run_lock(storage, "exp", "old-holder"):
            # Another run took the lock over (as after an outage longer than STALE_AFTER_S).
            storage.write_text("exp/run.lock", json.dumps(runlock.holder_info("new-holder")))
            time.sleep(30)  # the training: interrupted by the heartbeat that finds the lock gone
    assert time.monotonic() - started < 10
    time.sleep(0.5)  # no beat and no release of the old holder touches the new holder's lock
    assert storage.read_json("exp/run.lock")["run_id"] == "new-holder"


@pytest.mark.integration
def test_a_lock_lost_in_a_run_ends_it_with_exit_1_and_one_line(s3_env, mnist_root, tmp_path, capsys, monkeypatch):
    """The whole path through the CLI (real local Ray): the driver's main thread is interrupted
    while it trains, the run ends with exit 1 and one line."""
    from backdoor_train import cli; from backdoor_train.runs import experiment

    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.2)
    storage = open_storage(StorageConfig(path=f"s3://{s3_env}/runs"))

    def training(cfg, storage_, run_id, log):
        storage.write_text("exp/run.lock", json.dumps(runlock.holder_info("new-holder")))
        time.sleep(60)

    monkeypatch.setattr(experiment, "_run_locked", training)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "exp", "data": {"root": mnist_root, "train_samples": 600},
                                    "storage": {"path": f"s3://{s3_env}/runs"},
                                    "scaling": {"num_workers": 1, "cpus_per_worker": 1}}))
    # Short, for Ray's socket paths; private, so another cluster on the machine is not joined.
    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="rl", dir="/tmp"))
    code = main(["run", str(path), "--address", "local"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_FAILED, err
    ours = [line for line in err.splitlines() if line.startswith("backdoor-train:")]
    assert len(ours) == 1 and "now belongs to run new-holder" in ours[0] and "Traceback" not in err, err
    assert storage.read_json("exp/run.lock")["run_id"] == "new-holder"
