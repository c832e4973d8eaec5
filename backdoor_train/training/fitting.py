"""Launching Ray Train fits: one TorchTrainer per model variant, all of an experiment's at once.

The variants of an experiment (clean, poisoned, detection's filtered-* retrains) are
independent trainings, so they run at the same time on the one cluster, each its own
TorchTrainer with its own worker group: as many at once as the cluster's CPUs and GPUs hold
(``scaling.gpus_per_worker: 0.5`` puts two on one GPU). Each fit is driven from a thread of the
driver, as Ray Tune drives a TorchTrainer from its trainable. The first failure aborts the
others through their controllers (Train's own graceful abort), and so does Ctrl-C; the error
raised names the variant that failed. Before a fit starts, training/resume.py decides where it resumes;
its controller writes Ray's run snapshot durably (resume.write_snapshot). The trainer class, which
reaches into Ray Train's private API for that, is training/rayinternals.py's.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from backdoor_train.config import ExperimentConfig
from backdoor_train.training.failures import FitFailed, fit_failed, quiet_controller_tracebacks
from backdoor_train.training.rayinternals import abortable_trainer_class
from backdoor_train.training.raysession import apply_train_env, fits_at_once
from backdoor_train.training.resume import prepare_resume, write_snapshot
from backdoor_train.storage.runstore import RunStore
from backdoor_train.storage import Storage
from backdoor_train.training.worker import train_loop_per_worker


@dataclass(frozen=True)
class ChainLink:
    """One experiment of a chained fit (training/chained.py): its config, the sha256 its workers
    must rebuild, its poisoned count, and where its checkpoints go: the Ray storage root of its
    experiment (``Storage.ray_storage``) and the variant's folder there."""

    experiment: ExperimentConfig
    train_sha256: str
    n_poisoned: int
    root: str
    prefix: str

    def loop_config(self) -> dict[str, Any]:
        return {"experiment": self.experiment.to_dict(), "train_sha256": self.train_sha256,
                "n_poisoned": self.n_poisoned, "root": self.root, "prefix": self.prefix}


@dataclass(frozen=True)
class FitSpec:
    """One variant to train: its name, the sha256 its workers must rebuild, its poisoned
    count (for the metrics) and the training samples it leaves out (detection's retrains).
    With ``chain``, the variant of several experiments trained one after another by one worker
    group (``group`` tells the chains of one launch apart); its own hash and count are unused."""

    variant: str
    train_sha256: str
    n_poisoned: int
    exclude: tuple[int, ...] = ()
    chain: tuple[ChainLink, ...] = ()
    group: int = 0

    @property
    def key(self) -> str:
        """The fit's name among those launched together, and its Ray run folder's."""
        return f"chain{self.group}-{self.variant}" if self.chain else self.variant


def fit_demand(cfg: ExperimentConfig) -> dict[str, float]:
    """The resources one fit's worker group holds."""
    s = cfg.scaling
    return {"CPU": s.num_workers * s.cpus_per_worker, "GPU": s.num_workers * s.gpus_per_worker if s.use_gpu else 0}


# How long aborted fits get to stop their workers (Ray Train's graceful abort) before their
# controllers are killed.
ABORT_GRACE_S = 20.0

SCALING_KEYS = "scaling.num_workers x scaling.cpus_per_worker (scaling.gpus_per_worker with use_gpu)"


def check_cluster(cfg: ExperimentConfig, wanted: int = 1, total: dict[str, float] | None = None) -> int:
    """How many of ``cfg``'s fits the cluster (default: the connected one) holds at once, at
    most ``wanted``; a ``ClusterError`` naming the scaling keys when not even one: it would
    wait forever."""
    return fits_at_once(fit_demand(cfg), wanted, SCALING_KEYS, total)


def make_trainer(cfg: ExperimentConfig, spec: FitSpec, storage: Storage, run_id: str,
                 resume_from: str | None = None, fit_index: int = 0, fits: int = 1) -> Any:
    """The trainer of ``spec``, fit ``fit_index`` of the ``fits`` launched together (their
    workers' metrics ports interleave); its workers load checkpoint ``resume_from`` (a folder
    name in the variant's run folder) when Ray has no run snapshot to resume from."""
    import ray.train

    from backdoor_train.training.chained import train_chain
    from backdoor_train.training.rendezvous import StoreBoundTorchConfig

    apply_train_env()
    storage_path, filesystem = storage.ray_storage()
    resources: dict[str, float] = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    loop_config = {"experiment": cfg.to_dict(), "variant": spec.variant, "run_id": run_id,
                   "train_sha256": spec.train_sha256, "n_poisoned": spec.n_poisoned,
                   "exclude": list(spec.exclude), "resume_from": resume_from,
                   "fit_index": fit_index, "fits": fits}
    if spec.chain:
        # The links' filesystem: the storage's own (pyarrow's S3 with its settings), None for local.
        loop_config.update(chain=[link.loop_config() for link in spec.chain], filesystem=filesystem)
    trainer = abortable_trainer_class(write_snapshot, quiet_controller_tracebacks)(
        train_chain if spec.chain else train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=StoreBoundTorchConfig(),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=RunStore(storage, cfg.name).variant_prefix(spec.key),
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=3),
            # Train's INFO lines repeat every report; the worker loop prints its own progress.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    trainer.retry_seconds = cfg.storage.retry_seconds
    return trainer


def _already_trained(cfg: ExperimentConfig, storage: Storage, spec: FitSpec, plan: Any) -> Any:
    """The checkpoint a fit resumed from when it had nothing left to train (all epochs done)
    and Ray, its snapshot set aside, registered none."""
    import ray.train

    if plan.checkpoint is None or plan.epochs_done < cfg.train.epochs:
        return None
    root, filesystem = storage.ray_storage()
    folder = RunStore(storage, cfg.name).variant_prefix(spec.key)
    return ray.train.Checkpoint(path=f"{root}/{folder}/{plan.checkpoint}", filesystem=filesystem)


def fit_variants(cfg: ExperimentConfig, specs: list[FitSpec], storage: Storage, run_id: str,
                 on_done: Callable[[FitSpec, Any, dict[str, float]], None], log: Callable[[str], None] = print,
                 planned: dict[str, Any] | None = None) -> None:
    """Train every spec, as many at once as the cluster holds, each from where ``planned``
    (``check_existing_run``'s resume plans, made under the run lock) or a plan made now says
    it resumes. ``on_done(spec, checkpoint,
    timing)`` runs in the caller's thread as each fit finishes (in finishing order); timing
    holds ``fit_seconds`` and the wall-clock ``fit_started_at`` / ``fit_finished_at``.
    Raises ``FitFailed`` after stopping the others when one fails; ``KeyboardInterrupt``
    after stopping all on Ctrl-C."""
    at_once = check_cluster(cfg, len(specs))
    if len(specs) > 1:
        log(f"{at_once} of the {len(specs)} trainers at once on this cluster")
    store = RunStore(storage, cfg.name)
    plans = {s.key: prepare_resume(storage, store.variant_prefix(s.key), s.key, log,
                                   (planned or {}).get(s.key)) for s in specs}
    trainers = {s.key: make_trainer(cfg, s, storage, run_id, plans[s.key].checkpoint, i, len(specs))
                for i, s in enumerate(specs)}
    stopping = threading.Event()

    def fit(spec: FitSpec) -> tuple[Any, dict[str, float]]:
        if stopping.is_set():
            raise FitFailed(f"{spec.key}: not started, another variant failed")
        started, t0 = time.time(), time.perf_counter()
        result = trainers[spec.key].fit()
        # A chain's checkpoints are its links' own (training/chained.py); Ray keeps none.
        checkpoint = result.checkpoint or _already_trained(cfg, storage, spec, plans[spec.key])
        if checkpoint is None and not spec.chain:
            raise RuntimeError(f"{spec.variant}: training finished without a checkpoint")
        return checkpoint, {"fit_seconds": time.perf_counter() - t0, "fit_started_at": started,
                                   "fit_finished_at": time.time()}

    def abort_all() -> None:
        import ray

        stopping.set()
        # All at once: a controller busy riding out a storage outage answers only after it.
        refs = [ref for trainer in trainers.values() if (ref := trainer.abort()) is not None]
        if refs:  # a controller that exits while answering, or is gone, is aborted too
            ray.wait(refs, num_returns=len(refs), timeout=ABORT_GRACE_S)

    def stop_all() -> None:
        started = time.monotonic()
        abort_all()
        pool.shutdown(wait=False, cancel_futures=True)
        _, running = cf.wait(futures, timeout=max(0.0, ABORT_GRACE_S - (time.monotonic() - started)))
        # An abort that did not take (seen once: a run trained on for a minute after Ctrl-C):
        # the controller goes, and its workers with it; committed checkpoints stay.
        for future in running:
            key = futures[future].key
            log(f"{key}: still training {ABORT_GRACE_S:.0f}s after the abort; its controller and workers are killed")
            trainers[key].kill()
        pool.shutdown(wait=True)

    pool = cf.ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="fit")
    futures = {pool.submit(fit, spec): spec for spec in specs}
    try:
        pending = set(futures)
        while pending:
            # A timeout, so that Ctrl-C reaches this (main) thread while the fits run.
            done, pending = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
            for future in done:
                spec = futures[future]
                exc = future.exception()
                if exc is not None:
                    abort_all()
                    raise fit_failed(spec.key, exc, storage, store, [s.key for s in specs if not s.chain]) from exc
                checkpoint, timing = future.result()
                on_done(spec, checkpoint, timing)
    except BaseException:
        stop_all()
        raise
    pool.shutdown(wait=True)
