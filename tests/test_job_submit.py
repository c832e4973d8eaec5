"""`ray start --head`, then `ray job submit` and `backdoor-train submit` of short experiments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from backdoor_train.cli import EXIT_BAD_INPUT, main

from conftest import free_port, stop_process

pytestmark = pytest.mark.integration
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real single-node Ray cluster started the way users start one, stopped afterwards."""
    gcs, dash = free_port(), free_port()
    temp = tmp_path_factory.mktemp("ray")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # As with an activated virtual environment: jobs find `backdoor-train` on the PATH.
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    # On SIGTERM a node drains for 30 s by default; nothing here needs it.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "1"
    proc = subprocess.Popen([os.path.join(BIN, "ray"), "start", "--head", "--block", f"--port={gcs}",
                             f"--dashboard-port={dash}", "--num-cpus=2", "--include-dashboard=true",
                             f"--temp-dir={temp}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_until_jobs_run(address, proc)
        yield address
    finally:
        stop_process(proc)


def _wait_until_jobs_run(address: str, proc: subprocess.Popen) -> None:
    """The dashboard answers before its job agent has registered; a first job proves both are up."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 240
    while True:
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("ray start --head did not bring up the dashboard")
            time.sleep(1)
    client = JobSubmissionClient(address)
    while True:
        try:
            probe = client.submit_job(entrypoint="true")
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)
    while str(client.get_job_status(probe)).split(".")[-1] not in ("SUCCEEDED", "FAILED", "STOPPED"):
        time.sleep(1)


def _experiment(tmp_path, mnist_root, name, variants):
    cfg = {"name": name, "variants": variants,
           "data": {"root": mnist_root, "train_samples": 3000, "test_samples": 1000},
           "train": {"epochs": 2, "batch_size": 200, "lr": 0.002},
           "scaling": {"num_workers": 2}, "storage": {"path": str(tmp_path / "runs")}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_ray_job_submit_runs_an_experiment(ray_head, tmp_path, mnist_root):
    path = _experiment(tmp_path, mnist_root, "submitted", ["poisoned"])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([os.path.join(BIN, "ray"), "job", "submit", f"--address={ray_head}",
                           f"--working-dir={tmp_path}", "--", "backdoor-train", "run", path.name],
                          capture_output=True, text=True, timeout=900, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out.lower() and "[submitted/poisoned] epoch 2/2" in out
    results = json.loads((tmp_path / "runs" / "submitted" / "results.json").read_text())
    assert set(results["variants"]) == {"poisoned"} and results["variants"]["poisoned"]["clean_accuracy"] > 0.8


def test_backdoor_train_submit_uploads_the_resolved_config(ray_head, tmp_path, mnist_root, capsys):
    from ray.job_submission import JobSubmissionClient

    path = _experiment(tmp_path, mnist_root, "via-cli", ["clean"])
    env = tmp_path / "runtime-env.yaml"
    env.write_text("env_vars: {BACKDOOR_TRAIN_TEST_MARK: submitted}\n")
    # A multi-seed experiment of one seed: --seeds travels in the uploaded file (seed and seeds).
    assert main(["submit", str(path), "--address", ray_head, "--set", "train.epochs=1", "--seeds", "2",
                 "--runtime-env", str(env), "--submission-id", "via-cli-1"]) == 0
    captured = capsys.readouterr()
    out = captured.out + captured.err  # the job's log is progress: on stderr when stdout holds results only
    # The log comes through the tail websocket: each line once.
    assert "job via-cli-1: SUCCEEDED" in out and out.count("[seed-2/clean] epoch 1/1") == 1
    runtime_env = JobSubmissionClient(ray_head).get_job_info("via-cli-1").runtime_env
    assert runtime_env["env_vars"] == {"BACKDOOR_TRAIN_TEST_MARK": "submitted"} and "working_dir" in runtime_env
    assert main(["submit", "/elsewhere.yaml", "--address", ray_head, "--no-upload",
                 "--submission-id", "via-cli-1"]) == EXIT_BAD_INPUT
    assert "--submission-id via-cli-1: a job with that id already exists" in capsys.readouterr().err
    results = json.loads((tmp_path / "runs" / "via-cli" / "seed-2" / "results.json").read_text())
    assert [h["epoch"] for h in results["variants"]["clean"]["history"]] == [1] and results["config"]["seed"] == 2
    assert [r["seed"] for r in json.loads((tmp_path / "runs" / "via-cli" / "results.json").read_text())["per_seed"]] == [2]


def test_submit_refuses_bad_config_and_unreachable_clusters(tmp_path, mnist_root, capsys):
    path = _experiment(tmp_path, mnist_root, "bad", ["clean"])
    assert main(["submit", str(path), "--address", "http://127.0.0.1:1", "--set", "poison.rate=7"]) == EXIT_BAD_INPUT
    assert "poison.rate must be in [0, 1]" in capsys.readouterr().err
    assert main(["submit", str(path), "--address", "http://127.0.0.1:1", "--seeds", "3-1", "--no-upload"]) == EXIT_BAD_INPUT
    assert "--seeds must look like" in capsys.readouterr().err
    assert main(["submit", str(path), "--address", f"http://127.0.0.1:{free_port()}"]) == EXIT_BAD_INPUT
    assert "cannot submit to the Ray cluster" in capsys.readouterr().err
