"""Running many experiments ("trials") on one Ray cluster: a sweep's grid points, a multi-seed
experiment's seeds.

Each trial is a Ray task that runs ``run_experiment`` (which trains the trial's variants at
once); as many trials run at once as the cluster holds with every variant training. A trial
whose results already exist with the same setting is not trained again, so an interrupted
sweep or multi-seed run, rerun, trains only what is missing (and a half-trained trial resumes
from its checkpoints). Sweeps and multi-seed experiments share this code, so they train and
skip the same way.
"""

from __future__ import annotations

from typing import Any, Callable

from backdoor_train.config import ExperimentConfig
from backdoor_train.progress import Tally
from backdoor_train.results import ExperimentResults
from backdoor_train.runs.experiment import finished_run, refuse_other_setting
from backdoor_train.training.fitting import check_cluster
from backdoor_train.storage import open_storage


def trials_at_once(trials: list[ExperimentConfig], max_concurrent: int,
                   total: dict[str, float] | None = None) -> int:
    """``max_concurrent``, or fewer where the cluster cannot hold every trainer of that many
    trials at once: an oversubscribed trainer waits for resources and times out its worker
    group's start (Train retries it, with a traceback each minute) instead of queueing."""
    if total is None:
        import ray

        total = ray.cluster_resources()  # once, not per trial
    at_once = max_concurrent
    for trial in trials:
        trainers = check_cluster(trial, max_concurrent * len(trial.variants), total)
        at_once = min(at_once, max(1, trainers // len(trial.variants)))
    return at_once


def split_finished(trials: list[ExperimentConfig], log: Callable[[str], None],
                   what: str) -> tuple[dict[str, ExperimentResults], list[ExperimentConfig]]:
    """({name: results} of the trials finished earlier with the same setting, the others); a
    ``ConfigError`` when one's folder holds another setting: refused before any training."""
    results: dict[str, ExperimentResults] = {}
    pending = []
    for cfg in trials:
        earlier = finished_run(cfg, open_storage(cfg.storage))
        if earlier is None:
            pending.append(cfg)
        else:
            results[cfg.name] = earlier
    if results:
        log(f"{len(results)} {what}(s) finished earlier with the same setting, not trained again: "
            f"{', '.join(results)}")
    for cfg in pending:
        refuse_other_setting(cfg, open_storage(cfg.storage))
    return results, pending


def _run_trial(cfg_dict: dict[str, Any]) -> ExperimentResults:
    from backdoor_train.runs.experiment import run_experiment

    cfg = ExperimentConfig.from_dict(cfg_dict)
    return run_experiment(cfg, log=lambda m: print(f"[{cfg.name}] {m}", flush=True))


def run_trials(trials: list[ExperimentConfig], max_concurrent: int, log: Callable[[str], None] = print,
               what: str = "trial") -> tuple[dict[str, ExperimentResults], dict[str, str]]:
    """Run every trial not finished before; return ({name: results}, {name: failure})."""
    import ray

    results, pending = split_finished(trials, log, what)
    if not pending:
        return results, {}
    at_once = trials_at_once(pending, max_concurrent)
    log(f"{len(pending)} {what}(s) to train, {at_once} at once (at most {max_concurrent}; what the cluster "
        f"holds with every variant of a {what} training at once)")
    # num_cpus=0: the task only drives its trainers; the trainers' workers hold the CPUs.
    remote = ray.remote(num_cpus=0, max_retries=0)(_run_trial)
    running: dict[Any, ExperimentConfig] = {}
    failures: dict[str, str] = {}
    # k/N with the elapsed time, an ETA and who runs: a bar on a terminal, else a line per trial.
    tally = Tally(what, len(trials), log, slots=at_once, earlier=len(results))
    try:
        while pending or running:
            while pending and len(running) < at_once:
                cfg = pending.pop(0)
                running[remote.remote(cfg.to_dict())] = cfg
                tally.start(cfg.name)
            done, _ = ray.wait(list(running), num_returns=1)
            cfg = running.pop(done[0])
            try:
                results[cfg.name] = ray.get(done[0])
                tally.finish(cfg.name)
            except Exception as exc:
                failures[cfg.name] = f"{type(exc).__name__}: {exc}"[:2000]
                tally.finish(cfg.name, error=failures[cfg.name][:300])
    except BaseException:
        # Ctrl-C: a cancelled task gets KeyboardInterrupt and aborts its trainers, whose
        # checkpoints stay for the rerun; wait a little for that to happen.
        for ref in running:
            ray.cancel(ref)
        if running:
            ray.wait(list(running), num_returns=len(running), timeout=30)
        raise
    finally:
        tally.close()
    return results, failures
