"""One run per experiment name at a time, on local storage (fcntl) and on S3 (a real S3 API,
moto_server: conditional create, heartbeat, stale takeover)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from backdoor_train import runlock
from backdoor_train.cli import EXIT_BAD_INPUT, main
from backdoor_train.runlock import acquire_run_lock, run_lock_holder
from backdoor_train.storage import LocalStorage, StorageError, open_storage
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
            "from backdoor_train.runlock import acquire_run_lock; "
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
