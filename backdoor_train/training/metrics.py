"""Prometheus metrics: live per-worker /metrics endpoints and a Pushgateway push of results.

Sinks plug into no-op bases (``WorkerMetrics``, ``RunMetrics``): with ``metrics.enabled:
false`` the worker loop and the driver call the same hooks and nothing happens, cheaply.
Names follow Prometheus conventions: a ``backdoor_train_`` prefix, base units (seconds,
bytes, ratios in [0, 1]), ``_total`` on counters. Every series carries the labels
``experiment``, ``run_id``, ``variant`` and, on workers, ``rank``.
"""

from __future__ import annotations

import time
from typing import Any

from backdoor_train.config import ExperimentConfig

PREFIX = "backdoor_train"
WORKER_LABELS = ("experiment", "run_id", "variant", "rank")
RUN_LABELS = ("experiment", "run_id", "variant")
RUN_STATES = ("running", "succeeded", "failed")
PUSH_JOB = "backdoor_train"


class MetricsError(RuntimeError):
    """A configured metrics endpoint cannot be reached."""


class WorkerMetrics:
    """No-op sink: the worker loop calls these hooks whether or not metrics are on."""

    port: int | None = None

    def set_poisoned_samples(self, n: int) -> None:
        pass

    def observe_epoch(self, epoch_metrics: dict[str, Any], samples: int) -> None:
        pass

    def checkpoint_saved(self, seconds: float, nbytes: int) -> None:
        pass

    def checkpoint_failed(self) -> None:
        pass

    def finish(self) -> None:
        pass


class PrometheusWorkerMetrics(WorkerMetrics):
    """One worker's series in a registry of its own, served on ``port`` while it trains."""

    def __init__(self, experiment: str, run_id: str, variant: str, rank: int, port: int) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"experiment": experiment, "run_id": run_id, "variant": variant, "rank": str(rank)}

        def make(cls: Any, name: str, doc: str, **kw: Any) -> Any:
            return cls(f"{PREFIX}_{name}", doc, list(WORKER_LABELS), registry=self.registry, **kw).labels(**labels)

        self.loss = make(Gauge, "training_loss", "Mean training loss of the last epoch (all workers).")
        self.samples = make(Counter, "samples_processed", "Training samples this worker has processed.")
        self.epoch_duration = make(Histogram, "epoch_duration_seconds", "Wall time of one training epoch.",
                                   buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, float("inf")))
        self.throughput = make(Gauge, "throughput_samples_per_second",
                               "Training samples per second of this worker in the last epoch.")
        self.epoch = make(Gauge, "epoch", "Epochs finished.")
        self.accuracy = make(Gauge, "test_accuracy_ratio", "Clean test accuracy after the last epoch.")
        self.asr = make(Gauge, "attack_success_ratio",
                        "Share of triggered non-target test images classified as the target.")
        self.poisoned = make(Gauge, "poisoned_samples", "Poisoned images in this variant's training set.")
        self.ckpt_duration = make(Histogram, "checkpoint_save_duration_seconds",
                                  "Time to write and persist one checkpoint.",
                                  buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, float("inf")))
        self.ckpt_bytes = make(Counter, "checkpoint_written_bytes", "Bytes of checkpoints written.")
        self.ckpt_size = make(Gauge, "checkpoint_size_bytes", "Size of the last checkpoint.")
        self.ckpt_failures = make(Counter, "checkpoint_failures", "Checkpoints that failed to save.")
        self.status = _Status(self.registry, WORKER_LABELS, labels)
        self.last_success = make(Gauge, "last_success_timestamp_seconds",
                                 "Unix time of the last successfully finished run.")
        self.status.state("running")
        self.port, self._server = _serve(self.registry, port, node_address())

    def set_poisoned_samples(self, n: int) -> None:
        self.poisoned.set(n)

    def observe_epoch(self, m: dict[str, Any], samples: int) -> None:
        self.loss.set(m["train_loss"])
        self.samples.inc(samples)
        self.epoch_duration.observe(m["epoch_seconds"])
        self.throughput.set(m["worker_samples_per_second"])
        self.epoch.set(m["epoch"])
        self.accuracy.set(m["test_accuracy"])
        self.asr.set(m["attack_success_rate"])

    def checkpoint_saved(self, seconds: float, nbytes: int) -> None:
        self.ckpt_duration.observe(seconds)
        self.ckpt_bytes.inc(nbytes)
        self.ckpt_size.set(nbytes)

    def checkpoint_failed(self) -> None:
        self.ckpt_failures.inc()
        self.status.state("failed")

    def finish(self) -> None:
        self.status.state("succeeded")
        self.last_success.set(time.time())


class _Status:
    """``backdoor_train_run_status{status="..."}``: 1 for the current state, 0 for the others
    (an enum as Prometheus recommends, with a plain ``status`` label)."""

    def __init__(self, registry: Any, label_names: tuple[str, ...], labels: dict[str, str]) -> None:
        from prometheus_client import Gauge

        gauge = Gauge(f"{PREFIX}_run_status", "State of this training run (1 = current).",
                      [*label_names, "status"], registry=registry)
        self._children = {state: gauge.labels(**labels, status=state) for state in RUN_STATES}

    def state(self, current: str) -> None:
        for state, child in self._children.items():
            child.set(1 if state == current else 0)


def node_address() -> str:
    """The address this Ray node is reached at (the pod's IP on Kubernetes, the loopback address
    on a laptop's local cluster), where Prometheus scrapes; loopback outside Ray."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def _serve(registry: Any, port: int, addr: str) -> tuple[int, Any]:
    """Serve ``registry`` on ``addr:port`` (not every interface, prometheus-client's default);
    if that port is taken, on a free one (and say which)."""
    from prometheus_client import start_http_server

    try:
        server, _ = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        if port == 0:
            raise
        server, _ = start_http_server(0, addr=addr, registry=registry)
        print(f"metrics: port {port} is taken ({exc.strerror}); serving on {server.server_port} instead",
              flush=True)
    return server.server_port, server


def worker_port(base: int, local_rank: int, fit_index: int = 0, fits: int = 1) -> int:
    """The port of one worker's /metrics: ``base`` for the first fit's first worker on a node.

    The fits launched together (clean and poisoned) can put workers on the same node (the
    gpu overlay puts both models in one pod), and each fit numbers its local ranks from 0:
    interleaving by fit gives every worker of a node its own port, and the node's first worker
    of fit k the port ``base + k``, the ports the manifests declare and scrape (9100, 9101).
    0 asks for any free port."""
    return base + local_rank * fits + fit_index if base else 0


def make_worker_metrics(cfg: ExperimentConfig, run_id: str, variant: str, rank: int,
                        local_rank: int, fit_index: int = 0, fits: int = 1) -> WorkerMetrics:
    if not cfg.metrics.enabled:
        return WorkerMetrics()
    port = worker_port(cfg.metrics.port, local_rank, fit_index, fits)
    sink = PrometheusWorkerMetrics(cfg.name, run_id, variant, rank, port)
    print(f"metrics: worker {rank} ({variant}) serves /metrics on port {sink.port}", flush=True)
    return sink


class RunMetrics:
    """No-op sink for the driver's final figures."""

    def check(self) -> None:
        pass

    def variant_finished(self, variant: str, evaluation: dict[str, Any], n_poisoned: int) -> None:
        pass

    def variant_failed(self, variant: str) -> None:
        pass


class PushgatewayRunMetrics(RunMetrics):
    """Pushes each variant's final figures to a Pushgateway, grouped by experiment, run and
    variant, so a finished batch job's results stay visible after its pods are gone."""

    def __init__(self, url: str, experiment: str, run_id: str) -> None:
        self.url, self.experiment, self.run_id = url.rstrip("/"), experiment, run_id

    def check(self) -> None:
        """Fail fast, naming metrics.pushgateway, when the Pushgateway does not answer."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.url}/-/healthy", timeout=5) as resp:
                resp.read()
        except (urllib.error.URLError, OSError) as exc:
            raise MetricsError(f"metrics.pushgateway: {self.url} does not answer ({exc})") from None

    def _push(self, variant: str, fill: Any) -> None:
        from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

        registry = CollectorRegistry()
        labels = {"experiment": self.experiment, "run_id": self.run_id, "variant": variant}

        def gauge(name: str, doc: str) -> Any:
            return Gauge(f"{PREFIX}_{name}", doc, list(RUN_LABELS), registry=registry).labels(**labels)

        status = _Status(registry, RUN_LABELS, labels)
        fill(gauge, status)
        push_to_gateway(self.url, job=PUSH_JOB, registry=registry, timeout=10,
                        grouping_key=labels)

    def variant_finished(self, variant: str, evaluation: dict[str, Any], n_poisoned: int) -> None:
        def fill(gauge: Any, status: Any) -> None:
            gauge("final_test_accuracy_ratio", "Clean test accuracy of the final model.").set(
                evaluation["clean_accuracy"])
            gauge("final_attack_success_ratio", "ASR of the final model on triggered non-target images.").set(
                evaluation["attack_success_rate"])
            gauge("poisoned_samples", "Poisoned images in this variant's training set.").set(n_poisoned)
            gauge("last_success_timestamp_seconds", "Unix time of the last successfully finished run.").set(
                time.time())
            status.state("succeeded")

        self._push(variant, fill)

    def variant_failed(self, variant: str) -> None:
        self._push(variant, lambda gauge, status: status.state("failed"))


def make_run_metrics(cfg: ExperimentConfig, run_id: str) -> RunMetrics:
    if cfg.metrics.enabled and cfg.metrics.pushgateway:
        return PushgatewayRunMetrics(cfg.metrics.pushgateway, cfg.name, run_id)
    return RunMetrics()
