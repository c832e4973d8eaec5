"""Checkpoints in S3 (moto_server) on a real local Ray cluster: a run's layout in the bucket,
surviving a killed worker, resuming by rerunning the name, and corrupt checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import threading
import time

import pytest
import yaml

from backdoor_train.training.checkpoint import checkpoint_epoch
from backdoor_train.cli import EXIT_BAD_INPUT, main
from backdoor_train.runs.experiment import run_experiment
from backdoor_train.runs.seeds import run_seeds

from conftest import OutageProxy, bucket_keys, fresh_s3_client, ray_snapshot, resumed_epochs, s3_env_vars, small_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    import ray

    # Workers inherit the driver's environment, S3 settings included, as pods get them from a Secret.
    os.environ.update(s3_env_vars(s3_server))
    if ray.is_initialized():  # a CLI test earlier in this process left its session up
        ray.shutdown()
    ray.init(num_cpus=2, log_to_driver=True)
    yield
    ray.shutdown()


def _cfg(mnist_root, bucket, name, **train):
    return small_config(mnist_root, f"s3://{bucket}/runs", name=name, variants=["poisoned"],
                        train={"epochs": 3, "checkpoint_every": 1, **train})


def _worker_pids() -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"RayTrainWorker" in fh.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def _kill_a_worker_when(ready) -> tuple[threading.Thread, dict]:
    """A thread that SIGKILLs a Ray Train worker once ``ready()`` returns a dict (what to record
    of the moment), within 300 s; and the record: that dict, the pid killed and the time (``at``)."""
    killed: dict = {}

    def killer() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            pids = _worker_pids()
            if pids and (found := ready()) is not None:
                killed.update(found, at=time.time())
                os.kill(pids[-1], signal.SIGKILL)
                killed["pid"] = pids[-1]
                return
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    return thread, killed


def test_s3_run_layout_kill_resume_and_corruption(ray_cluster, s3_env, s3_server, mnist_root, capfd, tmp_path):
    bucket = s3_env
    # 1. An uninterrupted run: everything lands in the bucket.
    base = run_experiment(_cfg(mnist_root, bucket, "steady"))
    keys = bucket_keys(s3_server, bucket, "runs/steady/")
    for expected in ("runs/steady/poison_manifest.json", "runs/steady/results.json",
                     "runs/steady/config.json", "runs/steady/poisoned/model.pt",
                     "runs/steady/poisoned/checkpoint_epoch_0003/state.pt",
                     "runs/steady/poisoned/checkpoint_epoch_0003/state.pt.sha256"):
        assert expected in keys, keys
    results = json.loads(fresh_s3_client(s3_server).get_object(
        Bucket=bucket, Key="runs/steady/results.json")["Body"].read())
    assert results["variants"]["poisoned"]["clean_accuracy"] == base.variants["poisoned"].clean_accuracy

    # 2. Kill a worker process once a checkpoint is committed (Ray has written its snapshot of
    #    the run's checkpoints to the bucket): the run resumes from it. Files of a newer
    #    checkpoint may already be uploaded while Ray has not yet registered it (the other rank
    #    has not reported); that one is not committed, so the snapshot, not the files, says
    #    which epoch must survive the kill.
    snapshot_key = "runs/crash/poisoned/checkpoint_manager_snapshot.json"

    def committed_epoch() -> int:
        body = fresh_s3_client(s3_server).get_object(Bucket=bucket, Key=snapshot_key)["Body"].read()
        latest = json.loads(body).get("latest_checkpoint_result") or {}
        return checkpoint_epoch(latest.get("checkpoint_dir_name", "")) or 0

    def committed() -> dict | None:
        # The snapshot is read before the kill: a lower bound on what must survive it.
        if snapshot_key in bucket_keys(s3_server, bucket, "runs/crash/poisoned/") and (epoch := committed_epoch()):
            return {"checkpoints": epoch}
        return None

    thread, killed = _kill_a_worker_when(committed)
    crash = run_experiment(_cfg(mnist_root, bucket, "crash", max_failures=2))
    thread.join(timeout=5)
    out = capfd.readouterr().out
    assert "pid" in killed, "the worker was never killed"
    resumed = resumed_epochs(out, "crash")
    assert resumed, out[-3000:]
    # At most one checkpoint interval is lost: it resumes from the newest committed checkpoint.
    assert resumed[0] >= killed["checkpoints"], (resumed, killed)
    history = crash.variants["poisoned"].history
    assert [h.epoch for h in history] == [1, 2, 3]
    assert abs(crash.variants["poisoned"].clean_accuracy
               - base.variants["poisoned"].clean_accuracy) < 0.01

    # 3. Corrupt the newest checkpoint, then rerun the same name for one more epoch: it says so,
    #    falls back to the previous checkpoint, and goes on from there.
    client = fresh_s3_client(s3_server)
    client.put_object(Bucket=bucket, Key="runs/steady/poisoned/checkpoint_epoch_0003/state.pt", Body=b"garbage")
    more = run_experiment(_cfg(mnist_root, bucket, "steady", epochs=4))
    out = capfd.readouterr().out
    assert "checkpoint_epoch_0003" in out and "falling back to the previous checkpoint" in out
    assert "[steady/poisoned] resuming after epoch 2" in out
    assert [h.epoch for h in more.variants["poisoned"].history] == [1, 2, 3, 4]

    # 4. Every checkpoint corrupt: the CLI refuses before any training, exit status 2.
    for key in bucket_keys(s3_server, bucket, "runs/crash/poisoned/"):
        if key.endswith("state.pt"):
            client.put_object(Bucket=bucket, Key=key, Body=b"garbage")
    path = tmp_path / "crash.yaml"
    path.write_text(yaml.safe_dump(_cfg(mnist_root, bucket, "crash", epochs=5).to_dict()))
    assert main(["run", str(path)]) == EXIT_BAD_INPUT
    err = capfd.readouterr().err
    assert "is corrupt" in err and "refusing to resume" in err, err


def test_changed_setting_under_the_same_name_is_refused(s3_env, mnist_root, tmp_path, capsys):
    from backdoor_train.config import ConfigError
    from backdoor_train.runs.experiment import check_existing_run, record_config
    from backdoor_train.storage import open_storage

    cfg = _cfg(mnist_root, s3_env, "named")
    storage = open_storage(cfg.storage)
    check_existing_run(cfg, storage, log=print)
    record_config(cfg, storage)
    check_existing_run(_cfg(mnist_root, s3_env, "named", epochs=7), storage, log=print)  # longer: fine
    changed = small_config(mnist_root, f"s3://{s3_env}/runs", name="named", variants=["poisoned"],
                           poison={"rate": 0.02})
    with pytest.raises(ConfigError, match=r"poison.rate: 0.05 -> 0.02"):
        check_existing_run(changed, storage, log=print)


def test_a_rerun_after_an_interrupted_write_resumes_from_the_newest_valid_checkpoint(
        ray_cluster, s3_env, s3_server, mnist_root, capfd):
    bucket = s3_env
    client = fresh_s3_client(s3_server)
    snapshot = "runs/snap/poisoned/checkpoint_manager_snapshot.json"
    run_experiment(_cfg(mnist_root, bucket, "snap", epochs=2))
    capfd.readouterr()

    # 1. The snapshot at 0 bytes, as Ray's in-place rewrite left it on a full disk: Ray could not
    #    start from it; the rerun sets it aside and goes on from the newest checkpoint.
    client.put_object(Bucket=bucket, Key=snapshot, Body=b"")
    more = run_experiment(_cfg(mnist_root, bucket, "snap", epochs=3))
    out = capfd.readouterr().out
    assert "checkpoint_manager_snapshot.json is empty (0 bytes: an interrupted write); moved aside" in out, out[-3000:]
    assert f"poisoned: resuming after epoch 2 from s3://{bucket}/runs/snap/poisoned/checkpoint_epoch_0002" in out
    assert resumed_epochs(out, "snap") == [2]  # what the driver said is what the workers did
    assert [h.epoch for h in more.variants["poisoned"].history] == [1, 2, 3]

    # 2. A snapshot naming an older checkpoint than the newest (a crash between checkpoint 3's
    #    upload and the snapshot's update): the driver said "from 0003" while Ray used 0002.
    client.put_object(Bucket=bucket, Key=snapshot, Body=ray_snapshot("checkpoint_epoch_0002").encode())
    more = run_experiment(_cfg(mnist_root, bucket, "snap", epochs=4))
    out = capfd.readouterr().out
    assert ("names checkpoint_epoch_0002 as the latest, but the newest valid checkpoint is "
            "checkpoint_epoch_0003; moved aside") in out, out[-3000:]
    assert resumed_epochs(out, "snap") == [3]
    assert [h.epoch for h in more.variants["poisoned"].history] == [1, 2, 3, 4]
    aside = [k for k in bucket_keys(s3_server, bucket, "runs/snap/poisoned/") if ".invalid-" in k]
    assert len(aside) == 2, aside  # both kept for a post-mortem

    # 3. A finished run whose snapshot is gone: nothing left to train, the newest checkpoint
    #    is the model (Ray registers none).
    client.delete_object(Bucket=bucket, Key=snapshot)
    again = run_experiment(_cfg(mnist_root, bucket, "snap", epochs=4))
    assert "poisoned: resuming after epoch 4 from" in capfd.readouterr().out
    assert again.variants["poisoned"].checkpoint.endswith("checkpoint_epoch_0004")
    assert again.variants["poisoned"].clean_accuracy == more.variants["poisoned"].clean_accuracy


def _output_until(capfd, text: str, timeout: float = 20) -> str:
    """Captured stdout until it holds ``text``: Ray forwards actors' lines with a delay."""
    out = ""
    deadline = time.monotonic() + timeout
    while text not in out and time.monotonic() < deadline:
        out += capfd.readouterr().out
        time.sleep(0.5)
    return out


def test_a_storage_outage_is_ridden_out_and_a_longer_one_ends_the_run_resumable(
        ray_cluster, s3_env, s3_server, mnist_root, capfd, monkeypatch):
    from backdoor_train.training.fitting import FitFailed

    bucket = s3_env
    proxy = OutageProxy(int(s3_server[0].rsplit(":", 1)[1]))
    # The driver builds the S3 clients and the filesystem Ray pickles to the controller and the
    # workers: all of them reach the bucket through the proxy.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    try:
        # 1. A 3-second outage that meets the second checkpoint's upload: the upload, and any
        #    other write that meets it (Ray's snapshot), waits it out; the run completes
        #    (max_failures 0: no restart).
        proxy.outage_on("/runs/blip/poisoned/checkpoint_epoch_0002", 3)
        result = run_experiment(_cfg(mnist_root, bucket, "blip", epochs=4, max_failures=0))
        assert proxy.restored.is_set(), "the outage never began"
        out = _output_until(capfd, "retrying for up to 60s (storage.retry_seconds)")
        assert "retrying for up to 60s (storage.retry_seconds)" in out, out[-3000:]
        assert [h.epoch for h in result.variants["poisoned"].history] == [1, 2, 3, 4]

        # 2. An outage longer than storage.retry_seconds ends the run (exit 1 from the CLI) ...
        cfg = _cfg(mnist_root, bucket, "long", epochs=4, max_failures=0)
        short = dataclasses.replace(cfg, storage=dataclasses.replace(cfg.storage, retry_seconds=2))
        proxy.outage_on("/runs/long/poisoned/checkpoint_epoch_0002", 10)
        with pytest.raises(FitFailed) as failed:
            run_experiment(short)
        # Whichever write met the outage first ended it: a worker's upload or Ray's snapshot.
        assert re.search(r"storage.retry_seconds=2|AWS Error (NETWORK_CONNECTION|UNKNOWN)|curlCode: (7|28|52|56)",
                         str(failed.value)), failed.value
        # One line: the variant, the cause, what a rerun resumes from (the traceback in a file).
        assert re.match(r"(clean|poisoned): .*; kept for a rerun: (clean|poisoned): ", str(failed.value)) and \
            "\n" not in str(failed.value) and "Traceback" not in str(failed.value), str(failed.value)
        out = _output_until(capfd, "retrying for up to 2s (storage.retry_seconds)")
        # The worker's retry line can be lost when Ray stops the aborted worker before forwarding
        # its output (seen once on a loaded machine); the failure itself must then name the bound.
        assert "retrying for up to 2s (storage.retry_seconds)" in out or \
            "storage.retry_seconds=2" in str(failed.value), (str(failed.value), out[-3000:])
        assert proxy.restored.wait(timeout=60)
        # ... and leaves it resumable: rerun once the storage is back.
        again = run_experiment(cfg)
        out = capfd.readouterr().out
        assert resumed_epochs(out, "long") and resumed_epochs(out, "long")[0] >= 1, out[-3000:]
        assert [h.epoch for h in again.variants["poisoned"].history] == [1, 2, 3, 4]
    finally:
        proxy.close()


def test_a_chain_on_s3_with_a_worker_killed_resumes_each_seed_from_its_own_checkpoints(
        ray_cluster, s3_env, s3_server, mnist_root, capfd):
    """A multi-seed run's chain (2 DDP workers training seed 1, then seed 2) loses a worker once
    seed 2 has a checkpoint: Ray restarts the worker group, seed 1 is not trained again and seed 2
    goes on from its newest checkpoint; every seed's files are in its own folder in the bucket."""
    bucket = s3_env
    cfg = dataclasses.replace(_cfg(mnist_root, bucket, "chained", max_failures=2), seeds=(1, 2))
    marker = "runs/chained/seed-2/poisoned/checkpoint_epoch_0001/state.pt.sha256"
    thread, killed = _kill_a_worker_when(
        lambda: {} if marker in bucket_keys(s3_server, bucket, "runs/chained/seed-2/") else None)
    out_results = run_seeds(cfg, log=print)
    thread.join(timeout=5)
    out = capfd.readouterr().out
    assert "pid" in killed, "the worker was never killed"
    assert [row.seed for row in out_results.per_seed] == [1, 2] and not out_results.failures
    assert "[seed-2/poisoned] resuming after epoch" in out
    keys = bucket_keys(s3_server, bucket, "runs/chained/")
    for seed in (1, 2):
        for name in ("results.json", "poison_manifest.json", "config.json", "poisoned/model.pt",
                     "poisoned/checkpoint_epoch_0003/state.pt", "poisoned/checkpoint_epoch_0003/state.pt.sha256"):
            assert f"runs/chained/seed-{seed}/{name}" in keys, keys
    seed1 = json.loads(fresh_s3_client(s3_server).get_object(
        Bucket=bucket, Key="runs/chained/seed-1/results.json")["Body"].read())
    # Seed 1 finished before the kill and was not trained again after it.
    history = seed1["variants"]["poisoned"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3] and all(h["ended_at"] < killed["at"] for h in history)
    assert history[-1]["world_size"] == 2
