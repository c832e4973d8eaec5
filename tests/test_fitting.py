"""Variants trained at once on one Ray cluster: overlap, no report delay, abort on the first
failure, resources checked up front, and runs immune to another Ray cluster on the machine."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from backdoor_train.config import ExperimentConfig
from backdoor_train.training.raysession import API_SERVER_ENV, ClusterError, fits_at_once

from conftest import free_port, stop_process, small_config

pytestmark = pytest.mark.integration
BIN = os.path.dirname(sys.executable)


def _ray_processes(name: str) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if name.encode() in fh.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


@pytest.fixture(scope="module")
def cluster():
    """This module's own 2-CPU local cluster (the project's connect: the API server pinned)."""
    import ray

    from backdoor_train.training.raysession import connect

    if ray.is_initialized():
        ray.shutdown()
    connect(num_cpus=2)
    yield
    ray.shutdown()


def test_the_variants_train_at_once_and_reports_do_not_wait_for_the_poll(cluster, tmp_path, mnist_root):
    from backdoor_train.runs.experiment import run_experiment

    cfg = small_config(mnist_root, str(tmp_path / "runs"), train={"epochs": 4},
                       scaling={"num_workers": 1, "cpus_per_worker": 1})
    results = run_experiment(cfg, log=print)
    clean, poisoned = results.variants["clean"], results.variants["poisoned"]
    # Two 1-CPU trainers on a 2-CPU cluster: the fits overlap in time.
    assert clean.fit_started_at < poisoned.fit_finished_at
    assert poisoned.fit_started_at < clean.fit_finished_at
    for v in (clean, poisoned):
        h = v.history
        assert [e.epoch for e in h] == [1, 2, 3, 4] and v.clean_accuracy > 0.9
        # Between two epochs a worker only reports (and writes a small checkpoint). With Train's
        # default 2 s controller poll each report waited up to 2 s; with the project's 0.1 s it is
        # a fraction of a second.
        waits = [h[i].ended_at - h[i].epoch_seconds - h[i].eval_seconds - h[i - 1].ended_at
                 for i in range(1, len(h))]
        assert statistics.median(waits) < 1.0, waits
    assert list(results.variants) == ["clean", "poisoned"]  # the config's order


def test_the_first_failure_aborts_the_other_variants(cluster, tmp_path, mnist_root):
    from backdoor_train.storage.staging import load_splits
    from backdoor_train.training.fitting import FitFailed, FitSpec, fit_variants
    from backdoor_train.attack.poison import dataset_sha256
    from backdoor_train.storage import open_storage

    cfg = small_config(mnist_root, str(tmp_path / "runs"), train={"epochs": 50},
                       scaling={"num_workers": 1, "cpus_per_worker": 1})
    storage = open_storage(cfg.storage)
    train, _ = load_splits(cfg)
    good = FitSpec("clean", dataset_sha256(train), 0)
    bad = FitSpec("poisoned", "0" * 64, 300)  # its workers refuse a training set of another hash
    finished = []
    t0 = time.monotonic()
    with pytest.raises(FitFailed, match="(?s)poisoned.*hashes to"):
        fit_variants(cfg, [good, bad], storage, "abort-test", lambda spec, *_: finished.append(spec), print)
    assert finished == []
    # 50 epochs of the clean model take minutes; it was aborted instead, its workers gone.
    assert time.monotonic() - t0 < 120
    deadline = time.monotonic() + 30
    while _ray_processes("RayTrainWorker") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ray_processes("RayTrainWorker")


def test_a_config_the_cluster_cannot_hold_is_refused_naming_the_keys(cluster):
    from backdoor_train.training.fitting import check_cluster

    too_big = ExperimentConfig.from_dict({"scaling": {"num_workers": 3, "cpus_per_worker": 1}})
    with pytest.raises(ClusterError, match=r"scaling\.num_workers.*3 CPU per model.*2 CPU in all"):
        check_cluster(too_big)
    gpu = ExperimentConfig.from_dict({"scaling": {"num_workers": 1, "use_gpu": True, "gpus_per_worker": 0.5}})
    with pytest.raises(ClusterError, match=r"0\.5 GPU per model.*0 GPU in all"):
        check_cluster(gpu)
    assert check_cluster(ExperimentConfig.from_dict({"scaling": {"num_workers": 1}}), wanted=5) == 2
    assert fits_at_once({"CPU": 2, "GPU": 0}, 3, "x") == 1


def test_a_rerun_of_one_variant_keeps_the_other_and_a_diverging_run_says_so(cluster, tmp_path, mnist_root, capsys):
    from backdoor_train.cli import EXIT_FAILED, main

    base = small_config(mnist_root, str(tmp_path / "runs"), name="merge", train={"epochs": 1},
                        data={"train_samples": 2000, "test_samples": 500}, scaling={"num_workers": 1})
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(base.to_dict()))
    assert main(["run", str(path), "--set", "variants=[clean]"]) == 0
    first = json.loads((tmp_path / "runs" / "merge" / "results.json").read_text())
    assert main(["run", str(path), "--set", "variants=[poisoned]"]) == 0
    results = json.loads((tmp_path / "runs" / "merge" / "results.json").read_text())
    assert list(results["variants"]) == ["clean", "poisoned"]
    assert results["variants"]["clean"] == first["variants"]["clean"]
    assert results["kept_from_earlier_runs"] == {"clean": first["run_id"]}
    capsys.readouterr()

    # SGD at an absurd learning rate: the loss is NaN after one epoch; the run stops and says why.
    assert main(["run", str(path), "--set", "name=diverge", "--set", "variants=[clean]",
                 "--set", "train.optimizer=sgd", "--set", "train.lr=1.0e+30"]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "training loss became nan in epoch 1: training diverged" in err, err[-2000:]
    assert not (tmp_path / "runs" / "diverge" / "results.json").exists()


def test_a_run_is_immune_to_another_ray_cluster_on_the_machine(tmp_path, mnist_root):
    """Train's PlacementGroupCleaner finds "the" cluster by itself: with a second cluster started
    by `ray start` in the same temp dir it asked that one, found no controller, and removed the
    running fit's placement group. The project pins the state API to its own cluster."""
    # Shared by both clusters, private to this test; short, for Ray's socket paths.
    temp = pathlib.Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", API_SERVER_ENV)}
    env["RAY_TMPDIR"] = str(temp)
    other = subprocess.Popen([os.path.join(BIN, "ray"), "start", "--head", "--block", f"--port={free_port()}",
                              f"--dashboard-port={free_port()}", "--num-cpus=1", f"--temp-dir={temp}"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (temp / "ray_current_cluster").exists():  # what the cleaner's auto-detection reads
            assert other.poll() is None and time.monotonic() < deadline, "ray start --head failed"
            time.sleep(0.5)
        cfg = small_config(mnist_root, str(tmp_path / "runs"), train={"epochs": 3},
                           scaling={"num_workers": 1, "cpus_per_worker": 1}).to_dict()
        path = tmp_path / "tiny.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = subprocess.run([sys.executable, "-m", "backdoor_train", "run", str(path)], env=env,
                              capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:]
        results = json.loads((tmp_path / "runs" / "tiny" / "results.json").read_text())
        assert set(results["variants"]) == {"clean", "poisoned"}
        # A healthy run shows the project's lines, none of Ray's error-level ones.
        assert " E " not in out and "Traceback" not in out and "ERROR" not in out, out[-4000:]
    finally:
        stop_process(other)
        shutil.rmtree(temp, ignore_errors=True)


def _start_run(tmp_path, mnist_root, name: str, ray_tmp: str, until: str):
    """`backdoor-train run` of a 30-epoch tiny experiment in its own process and local Ray,
    read until both variants printed ``until``; (process, lines read, command, environment)."""
    cfg = small_config(mnist_root, str(tmp_path / "runs"), name=name, train={"epochs": 30},
                       scaling={"num_workers": 1, "cpus_per_worker": 1}).to_dict()
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    cmd = [sys.executable, "-m", "backdoor_train", "run", str(path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if sum(until in s for s in seen) == 2:
            break
    return proc, seen, cmd, env


def test_sigterm_stops_a_run_within_seconds_without_a_traceback(tmp_path, mnist_root):
    import signal

    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    try:
        proc, seen, _, _ = _start_run(tmp_path, mnist_root, "term", ray_tmp, "epoch 1/30")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # what `kill` and Kubernetes send
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 143, "".join(seen) + rest
        assert "terminated; rerun the same command to resume" in rest and "Traceback" not in rest, rest
        assert time.monotonic() - sent < 30
        assert not (tmp_path / "runs" / "term" / "results.json").exists()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_ctrl_c_stops_every_variant_and_a_rerun_resumes(tmp_path, mnist_root):
    import signal

    ray_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    try:
        # Until both variants have committed a checkpoint.
        proc, seen, cmd, env = _start_run(tmp_path, mnist_root, "tiny", ray_tmp, "epoch 2/30")
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, "".join(seen) + rest
        assert "interrupted" in rest and "Traceback" not in rest, rest

        # The same name again, now 3 epochs: both variants resume instead of starting over.
        cmd += ["--set", "train.epochs=3"]
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        out = again.stdout + again.stderr
        assert again.returncode == 0, out[-4000:]
        for variant in ("clean", "poisoned"):
            assert f"{variant}: resuming after epoch" in out, out[-4000:]
            assert f"[tiny/{variant}] resuming after epoch" in out, out[-4000:]
        results = json.loads((tmp_path / "runs" / "tiny" / "results.json").read_text())
        assert all(len(v["history"]) == 3 for v in results["variants"].values())
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
