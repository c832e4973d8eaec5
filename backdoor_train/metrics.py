"""Metrics sinks for the worker loop. The base class does nothing, cheaply."""

from __future__ import annotations

from typing import Any

from backdoor_train.config import ExperimentConfig


class WorkerMetrics:
    """No-op sink: the worker loop calls these hooks whether or not metrics are on."""

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


def make_worker_metrics(cfg: ExperimentConfig, run_id: str, variant: str, rank: int,
                        local_rank: int) -> WorkerMetrics:
    return WorkerMetrics()
