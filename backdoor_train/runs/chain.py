"""A multi-seed run's seeds trained in chains: one worker group per variant trains the seeds one
after another (training/chained.py), instead of one fit per seed and variant.

A fit's start and end cost the same whatever it trains (13-17 s for an empty fit on 2 vCPUs),
and a multi-seed run paid them per seed. Here the seeds still to train are split into as many
chains as the cluster holds seeds at once (every variant of a seed training, as the trials of
runs/trials.py do), and each chain is one fit per variant. Each seed stays an experiment of its
own: its run lock, its setting, manifest, checkpoints, models and results.json in its
``seed-<s>/`` folder, exactly as a fit of its own writes them, so a sweep over ``seed`` and a
rerun find them. A seed whose results exist is not trained again; one cut short resumes from
its checkpoints. When a chain fails, the seeds that finished before keep their results and the
others are reported failed with what they kept for the rerun.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

from backdoor_train.config import ExperimentConfig
from backdoor_train.results import ExperimentResults
from backdoor_train.runs.experiment import PreparedRun, check_existing_run, prepare_run
from backdoor_train.runs.locked import locked_run
from backdoor_train.runs.trials import split_finished, trials_at_once
from backdoor_train.storage import Storage
from backdoor_train.storage.runstore import RunStore
from backdoor_train.training.checkpoint import checkpoint_epoch, newest_valid_checkpoint, state_from_bytes
from backdoor_train.training.failures import FitFailed, kept_checkpoints
from backdoor_train.training.fitting import ChainLink, FitSpec, fit_variants


def run_chained(cfg: ExperimentConfig, storage: Storage, run_id: str, children: list[ExperimentConfig],
                log: Callable[[str], None] = print) -> tuple[dict[str, ExperimentResults], dict[str, str]]:
    """Train the seeds ``children`` (the single-seed experiments below multi-seed ``cfg``) not
    finished before, in chains; return ({name: results}, {name: failure})."""
    results, pending = split_finished(children, log, "seed")
    if not pending:
        return results, {}
    chains = trials_at_once(pending, len(pending))
    groups = [pending[g::chains] for g in range(chains)]
    log(f"{len(pending)} seed(s) to train: {chains} chain(s) of one worker group per variant, each training "
        f"its seeds one after another ({'; '.join(', '.join(c.name for c in g) for g in groups)})")
    failures: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        runs: dict[str, PreparedRun] = {}
        for child in pending:  # each seed its own run: its lock, checks, setting and manifest
            run = stack.enter_context(locked_run(child))
            seed_log = _prefixed(log, child.name)
            check_existing_run(run.cfg, run.storage, seed_log)  # refuses a seed whose checkpoints are all corrupt
            runs[child.name] = prepare_run(run.cfg, run.storage, run.run_id, seed_log)
        specs = [FitSpec(variant, "", 0, chain=tuple(_link(runs[c.name], variant) for c in group), group=g)
                 for g, group in enumerate(groups) for variant in cfg.variants]

        def chain_done(spec: FitSpec, _checkpoint: Any, timing: dict[str, float]) -> None:
            started = timing["fit_started_at"]
            for link in spec.chain:
                run = runs[link.experiment.name]
                if not _finish(run, spec.variant, started):
                    raise RuntimeError(f"{run.cfg.name}/{spec.variant}: the chain ended without its final checkpoint")
                started = run.variants[spec.variant].fit_finished_at
                if set(run.variants) == set(run.cfg.variants):
                    results[run.cfg.name] = run.write_results()
                    log(f"{run.cfg.name} finished: {len(results)} of {len(children)} seeds have results")

        try:
            fit_variants(cfg, specs, storage, run_id, chain_done, log)
        except FitFailed as exc:
            for name, run in runs.items():
                if name not in results:
                    failure = _salvage(run, exc, results)
                    if failure:
                        failures[name] = failure
                        log(f"{name} failed: {failure}")
        except BaseException:
            for run in runs.values():
                run.failed()
            raise
    return results, failures


def _link(run: PreparedRun, variant: str) -> ChainLink:
    spec = next(s for s in run.specs if s.variant == variant)
    root, _ = run.storage.ray_storage()
    return ChainLink(run.cfg, spec.train_sha256, spec.n_poisoned, root,
                     RunStore(run.storage, run.cfg.name).variant_prefix(variant))


def _finish(run: PreparedRun, variant: str, started: float) -> bool:
    """Evaluate and record ``variant`` of ``run`` from its final checkpoint; False when it has
    none (its link did not finish). The link's time is its share of the chain: from ``started``
    (the chain's start, or the previous link's end) to its last epoch's end."""
    import ray.train

    prefix = RunStore(run.storage, run.cfg.name).variant_prefix(variant)
    found = newest_valid_checkpoint(run.storage, prefix, run.log)
    if found is None or checkpoint_epoch(found[0].rsplit("/", 1)[-1]) != run.cfg.train.epochs:
        return False
    key, data = found
    finished = state_from_bytes(data, where=run.storage.key_uri(key))["history"][-1]["ended_at"]
    root, filesystem = run.storage.ray_storage()
    spec = next(s for s in run.specs if s.variant == variant)
    run.finished(spec, ray.train.Checkpoint(path=f"{root}/{key}", filesystem=filesystem),
                 {"fit_seconds": max(0.0, finished - started), "fit_started_at": min(started, finished),
                  "fit_finished_at": finished})
    return True


def _salvage(run: PreparedRun, exc: FitFailed, results: dict[str, ExperimentResults]) -> str:
    """After a chain failed: ``run``'s results when each of its variants finished before (into
    ``results``: ""), else why it failed and what it keeps for the rerun."""
    try:
        if all(v in run.variants or _finish(run, v, run.started) for v in run.cfg.variants):
            results[run.cfg.name] = run.write_results()
            return ""
    except Exception as err:  # the storage may be why the chain failed
        return f"{exc}; its results could not be written ({type(err).__name__}: {err})"
    run.failed()
    kept = kept_checkpoints(run.storage, RunStore(run.storage, run.cfg.name), list(run.cfg.variants))
    return f"{exc}; kept for a rerun: {kept}"


def _prefixed(log: Callable[[str], None], name: str) -> Callable[[str], None]:
    return lambda message: log(f"[{name}] {message}")
