"""Prometheus metrics: exposition lint (promtool), port handling, and a real Prometheus and
Pushgateway watching a real short training run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from backdoor_train.config import ExperimentConfig
from backdoor_train.training.metrics import (PrometheusWorkerMetrics, RunMetrics, WorkerMetrics, make_run_metrics,
                                    make_worker_metrics, worker_port)

from conftest import free_port, wait_for_port

EPOCH = {"epoch": 1, "train_loss": 0.5, "test_accuracy": 0.9, "attack_success_rate": 0.01,
         "epoch_seconds": 3.2, "worker_samples_per_second": 900.0}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run scripts/setup.sh --test (apt-get install prometheus "
                    f"prometheus-pushgateway)")
    return path


def _sample(text: str, name: str, labels: dict[str, str]) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    found = [s.value for fam in text_string_to_metric_families(text) for s in fam.samples
             if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def test_metrics_off_is_the_no_op_base():
    cfg = ExperimentConfig()
    sink = make_worker_metrics(cfg, "r1", "clean", 0, 0)
    assert type(sink) is WorkerMetrics and sink.port is None
    sink.observe_epoch(EPOCH, 10)  # does nothing, raises nothing
    assert type(make_run_metrics(cfg, "r1")) is RunMetrics


@pytest.mark.integration  # promtool: a system binary
def test_exposition_passes_promtool_and_carries_the_labels():
    sink = PrometheusWorkerMetrics("exp", "run1", "poisoned", rank=1, port=0)
    sink.set_poisoned_samples(600)
    sink.observe_epoch(EPOCH, 30000)
    sink.checkpoint_saved(0.4, 1_100_000)
    sink.checkpoint_failed()
    sink.finish()
    text = _get(f"http://127.0.0.1:{sink.port}/metrics")
    check = subprocess.run([_tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), check.stdout + check.stderr
    labels = {"experiment": "exp", "run_id": "run1", "variant": "poisoned", "rank": "1"}
    for name, extra, value in (("backdoor_train_samples_processed_total", {}, 30000),
                               ("backdoor_train_poisoned_samples", {}, 600),
                               ("backdoor_train_checkpoint_failures_total", {}, 1),
                               ("backdoor_train_checkpoint_written_bytes_total", {}, 1.1e6),
                               ("backdoor_train_attack_success_ratio", {}, 0.01),
                               ("backdoor_train_run_status", {"status": "succeeded"}, 1),
                               ("backdoor_train_run_status", {"status": "failed"}, 0)):
        assert _sample(text, name, {**labels, **extra}) == value, name
    assert "backdoor_train_epoch_duration_seconds_bucket" in text


def _free_ports(n: int) -> int:
    """A port that is free now with the next ``n - 1`` free too (the other workers'); a bare
    free port's neighbours may belong to other processes on the machine."""
    import socket

    while True:
        port = free_port()
        try:
            for k in range(1, n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + k))
            return port
        except OSError:
            continue


def test_workers_sharing_a_node_do_not_clash():
    port = _free_ports(2)
    cfg = ExperimentConfig.from_dict({"metrics": {"enabled": True, "port": port}})
    a = make_worker_metrics(cfg, "r", "clean", rank=0, local_rank=0)
    b = make_worker_metrics(cfg, "r", "clean", rank=1, local_rank=1)
    assert (a.port, b.port) == (port, port + 1)
    # A port someone else holds: the sink takes a free one instead of failing the run.
    c = make_worker_metrics(cfg, "r", "clean", rank=2, local_rank=0)
    assert c.port not in (port, port + 1)
    for sink in (a, b, c):
        assert "backdoor_train_epoch" in _get(f"http://127.0.0.1:{sink.port}/metrics")


def test_fits_sharing_a_node_take_the_ports_the_manifests_scrape():
    # The gpu overlay trains both models in one pod, one worker each (local rank 0 in both fits):
    # the clean model's worker serves 9100 (train-metrics), the poisoned model's 9101
    # (train-metrics-1); with several workers per node no two of any fit meet.
    assert [worker_port(9100, 0, k, 2) for k in (0, 1)] == [9100, 9101]
    ports = {worker_port(9100, r, k, 3) for r in range(4) for k in range(3)}
    assert ports == set(range(9100, 9112))
    assert worker_port(0, 1, 1, 2) == 0  # 0: any free port


def test_unreachable_pushgateway_is_refused_before_the_run(tmp_path, capsys, mnist_root):
    from backdoor_train.cli import EXIT_BAD_INPUT, main

    path = tmp_path / "exp.yaml"
    url = f"http://127.0.0.1:{free_port()}"
    path.write_text(yaml.safe_dump({"data": {"root": mnist_root}, "storage": {"path": str(tmp_path / "runs")},
                                    "metrics": {"enabled": True, "pushgateway": url}}))
    assert main(["check", str(path)]) == EXIT_BAD_INPUT
    assert f"metrics.pushgateway: {url} does not answer" in capsys.readouterr().err


@pytest.fixture
def pushgateway(tmp_path):
    port = free_port()
    proc = subprocess.Popen([_tool("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.integration
def test_prometheus_scrapes_a_training_run_and_the_pushgateway_keeps_results(tmp_path, mnist_root, pushgateway):
    # Two models x two workers on this one node: four ports (the clean model's ranks 0 and 1
    # and the poisoned model's, interleaved by fit), as metrics.worker_port gives them.
    base = _free_ports(4)
    targets = sorted({f"127.0.0.1:{worker_port(base, r, k, 2)}" for r in (0, 1) for k in (0, 1)})
    assert len(targets) == 4
    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": "backdoor-train-workers", "static_configs": [{"targets": targets}]}],
    }))
    prom = subprocess.Popen([_tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(prom_port)
        cfg = {"name": "watched", "data": {"root": mnist_root, "train_samples": 6000, "test_samples": 2000},
               "train": {"epochs": 4, "batch_size": 200, "lr": 0.002},
               "poison": {"rate": 0.05}, "scaling": {"num_workers": 2},
               "storage": {"path": str(tmp_path / "runs")},
               "metrics": {"enabled": True, "port": base, "pushgateway": pushgateway}}
        path = tmp_path / "watched.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        run = subprocess.run([sys.executable, "-m", "backdoor_train", "run", str(path)],
                             capture_output=True, text=True, timeout=900, env=env)
        assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
        results = json.loads((tmp_path / "runs" / "watched" / "results.json").read_text())
        run_id = results["run_id"]
        time.sleep(2)  # let the last scrape land

        def query(q: str) -> list[dict]:
            body = _get(f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": q}))
            return json.loads(body)["data"]["result"]

        # The workers are gone now; the series they exposed while training are in Prometheus.
        series = query("last_over_time(backdoor_train_samples_processed_total[15m])")
        seen = {(s["metric"]["variant"], s["metric"]["rank"]) for s in series}
        assert seen == {("clean", "0"), ("clean", "1"), ("poisoned", "0"), ("poisoned", "1")}, series
        assert all(s["metric"]["experiment"] == "watched" and s["metric"]["run_id"] == run_id for s in series)
        epochs = query('max_over_time(backdoor_train_epoch{variant="poisoned"}[15m])')
        assert max(float(s["value"][1]) for s in epochs) >= 3
        assert query('last_over_time(backdoor_train_poisoned_samples{variant="poisoned"}[15m])')[0]["value"][1] == "300"

        # The Pushgateway holds the final figures after the run has ended.
        pushed = _get(f"{pushgateway}/metrics")
        for variant in ("clean", "poisoned"):
            v = results["variants"][variant]
            for metric, value in (("final_test_accuracy_ratio", v["clean_accuracy"]),
                                  ("final_attack_success_ratio", v["attack_success_rate"])):
                line = next(l for l in pushed.splitlines() if l.startswith(f"backdoor_train_{metric}{{")
                            and f'variant="{variant}"' in l and f'run_id="{run_id}"' in l)
                assert float(line.rsplit(" ", 1)[1]) == pytest.approx(value)
    finally:
        prom.terminate()
        prom.wait(timeout=20)


def test_dashboard_queries_only_metrics_the_code_exports():
    import re

    from conftest import REPO_ROOT

    with open(os.path.join(REPO_ROOT, "k8s", "components", "monitoring", "grafana-dashboard.json")) as fh:
        dashboard = json.load(fh)
    used = {m for p in dashboard["panels"] for t in p["targets"]
            for m in re.findall(r"backdoor_train_[a-z_]+", t["expr"])}
    sink = PrometheusWorkerMetrics("e", "r", "clean", rank=0, port=0)
    exported = set(re.findall(r"^(backdoor_train_[a-z_]+)", _get(f"http://127.0.0.1:{sink.port}/metrics"), re.M))
    exported |= {"backdoor_train_final_test_accuracy_ratio", "backdoor_train_final_attack_success_ratio"}
    assert used and used <= exported, used - exported
    assert len(dashboard["panels"]) == len({p["id"] for p in dashboard["panels"]})
