"""How many trainers a cluster holds at once, and the Ray settings every trainer runs with (no Ray)."""

from __future__ import annotations

import os

import pytest

from backdoor_train.config import ExperimentConfig
from backdoor_train.training.fitting import fit_demand
from backdoor_train.training.raysession import TRAIN_ENV, ClusterError, apply_train_env, fits_at_once


@pytest.mark.parametrize("demand, total, wanted, expected", [
    ({"CPU": 1, "GPU": 0}, {"CPU": 2.0}, 2, 2),            # the article job on 2 cores: both at once
    ({"CPU": 2, "GPU": 0}, {"CPU": 2.0}, 2, 1),            # 2 DDP workers per model: one after the other
    ({"CPU": 1, "GPU": 0.5}, {"CPU": 16.0, "GPU": 1.0}, 2, 2),
    ({"CPU": 1, "GPU": 0.0625}, {"CPU": 16.0, "GPU": 1.0}, 40, 16),
    ({"CPU": 1, "GPU": 1 / 3}, {"CPU": 16.0, "GPU": 1.0}, 5, 3),  # float rounding does not lose a slot
])
def test_fits_at_once(demand, total, wanted, expected):
    assert fits_at_once(demand, wanted, "scaling", total) == expected


def test_a_fit_larger_than_the_cluster_is_refused_naming_the_keys_and_what_there_is():
    with pytest.raises(ClusterError, match=r"scaling\.\* asks for 4 CPU per model, but the Ray cluster has 2 CPU"):
        fits_at_once({"CPU": 4}, 2, "scaling.*", {"CPU": 2.0})
    with pytest.raises(ClusterError, match=r"asks for 1 GPU per model, but the Ray cluster has 0 GPU"):
        fits_at_once({"CPU": 1, "GPU": 1}, 2, "scaling.*", {"CPU": 8.0})


def test_fit_demand_counts_gpus_only_with_use_gpu():
    cfg = ExperimentConfig.from_dict({"scaling": {"num_workers": 2, "cpus_per_worker": 3, "gpus_per_worker": 0.5}})
    assert fit_demand(cfg) == {"CPU": 6, "GPU": 0}
    gpu = ExperimentConfig.from_dict({"scaling": {"num_workers": 2, "use_gpu": True, "gpus_per_worker": 0.5}})
    assert fit_demand(gpu) == {"CPU": 2, "GPU": 1.0}


def test_train_env_sets_defaults_and_keeps_what_the_user_exported(monkeypatch):
    for name in TRAIN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    apply_train_env()
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    assert os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert float(TRAIN_ENV["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]) <= 0.1


def test_the_projects_progress_lines_escape_rays_log_dedup():
    # Ray drops every word with a digit before comparing lines: both variants' lines of a seed
    # would look alike and one would vanish. Its allow regex keeps the project's lines whole.
    import re

    from ray._private.ray_logging import _canonicalise_log_line

    from backdoor_train.training.raysession import DRIVER_ENV

    clean = "[seed-1/clean] epoch 3/10  loss 0.0691  test acc 98.44%  ASR 0.11%  9.8s  6097 samples/s"
    poisoned = clean.replace("clean]", "poisoned]")
    assert _canonicalise_log_line(clean) == _canonicalise_log_line(poisoned)
    allow = re.compile(DRIVER_ENV["RAY_DEDUP_LOGS_ALLOW_REGEX"])
    for line in (clean, poisoned, "[article] loaded MNIST", "[rate-0.01_seed-2/poisoned] worker set-up 2.0s"):
        assert allow.search(line), line
    assert not allow.search("(raylet) a line of Ray's own [x] y")


def test_the_cli_sets_the_dedup_allowance_before_ray_is_imported(tmp_path, monkeypatch, mnist_root):
    import yaml

    from backdoor_train.cli import main
    from backdoor_train.training.raysession import DRIVER_ENV

    monkeypatch.delenv("RAY_DEDUP_LOGS_ALLOW_REGEX", raising=False)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"data": {"root": mnist_root}, "storage": {"path": str(tmp_path / "runs")}}))
    assert main(["check", str(path)]) == 0  # the first thing main does; it imports no Ray before
    assert os.environ["RAY_DEDUP_LOGS_ALLOW_REGEX"] == DRIVER_ENV["RAY_DEDUP_LOGS_ALLOW_REGEX"]


def test_an_address_where_nothing_answers_is_refused_in_seconds(tmp_path, mnist_root):
    import subprocess
    import sys
    import time

    import yaml

    from backdoor_train.training.raysession import probe
    from conftest import free_port

    port = free_port()
    with pytest.raises(ClusterError, match=rf"cannot reach the Ray cluster at '127.0.0.1:{port}'.*3 attempts"):
        probe(f"127.0.0.1:{port}")
    with pytest.raises(ClusterError, match="is not host:port"):
        probe("ray://:x")
    # The whole command: exit 2 naming the address, long before Ray's own minutes of retries.
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"data": {"root": mnist_root}, "storage": {"path": str(tmp_path / "runs")}}))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "backdoor_train", "run", str(path), "--address", f"ray://127.0.0.1:{port}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"cannot reach the Ray cluster at 'ray://127.0.0.1:{port}'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and time.monotonic() - started < 60
    assert not (tmp_path / "runs" / "experiment").exists()
