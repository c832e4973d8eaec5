"""Sweeps: a grid of experiments (poison rate x trigger x seed ...) run in parallel on Ray.

A sweep file names a base experiment and a grid of dotted keys to values::

    name: rate-sweep
    base: article.yaml            # relative to this file
    overrides: {variants: [poisoned]}
    grid:
      poison.rate: [0, 0.0005, 0.001, 0.005, 0.01, 0.02]
      seed: [1, 2]
    max_concurrent: 2

Every grid point is one trial: a full experiment with its own name, manifest and results,
stored under ``<storage.path>/<sweep name>/``. Trials run as Ray tasks that each launch a
TorchTrainer, at most ``max_concurrent`` at once; they all read the same data root. The
summary groups trials that differ only in ``seed`` and gives mean, standard deviation, min
and max of clean accuracy and ASR.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from backdoor_train.config import ConfigError, ExperimentConfig, _apply_override, load_config
from backdoor_train.experiment import absolute_paths
from backdoor_train.fitting import check_cluster
from backdoor_train.storage import Storage, open_storage

SUMMARY_KEY = "summary.json"


@dataclass(frozen=True)
class SweepConfig:
    name: str
    base: ExperimentConfig
    grid: dict[str, list[Any]]
    max_concurrent: int = 2
    trials: list[ExperimentConfig] = field(default_factory=list)

    def storage(self) -> Storage:
        """The sweep's folder: every trial's ``storage.path``, and where the summary goes."""
        return open_storage(self.trials[0].storage)


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("kind", "x") + "".join(f"-{v}" for k, v in sorted(value.items()) if k != "kind")
    return str(value)


def load_sweep(path: str, overrides: list[str] | None = None) -> SweepConfig:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"sweep file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep file {path} is not valid YAML: {exc}") from None
    unknown = set(data) - {"name", "base", "overrides", "grid", "max_concurrent"}
    if unknown:
        raise ConfigError(f"unknown key {sorted(unknown)[0]} in sweep file (allowed: base, grid, max_concurrent, "
                          f"name, overrides)")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError("sweep name must be a non-empty string")
    if not isinstance(data.get("base"), str):
        raise ConfigError("sweep base must name an experiment YAML file")
    base_path = os.path.join(os.path.dirname(os.path.abspath(path)), data["base"])
    base_overrides = [f"{k}={json.dumps(v)}" for k, v in (data.get("overrides") or {}).items()]
    base = load_config(base_path, base_overrides + list(overrides or []))
    grid = data.get("grid")
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError("sweep grid must map dotted keys to non-empty lists of values")
    max_concurrent = data.get("max_concurrent", 2)
    if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int) or max_concurrent < 1:
        raise ConfigError(f"sweep max_concurrent must be an integer >= 1 (got {max_concurrent!r})")

    base = absolute_paths(base)
    storage = base.storage.path.rstrip("/") + "/" + name
    trials = []
    for point in itertools.product(*grid.values()):
        trial_data = base.to_dict()
        label = []
        for key, value in zip(grid, point):
            try:
                _apply_override(trial_data, f"{key}={json.dumps(value)}")
            except ConfigError as exc:
                raise ConfigError(f"sweep grid {key}: {exc}") from None
            label.append(f"{key.split('.')[-1]}={_short(value)}")
        trial_data["name"] = "_".join(label).replace("=", "-")[:100]
        trial_data["storage"]["path"] = storage
        try:
            trials.append(ExperimentConfig.from_dict(trial_data))
        except ConfigError as exc:
            raise ConfigError(f"sweep grid point {dict(zip(grid, point))}: {exc}") from None
    return SweepConfig(name=name, base=base, grid=grid, max_concurrent=max_concurrent, trials=trials)


def _run_trial(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    from backdoor_train.experiment import run_experiment

    cfg = ExperimentConfig.from_dict(cfg_dict)
    return run_experiment(cfg, log=lambda m: print(f"[{cfg.name}] {m}", flush=True))


def run_sweep(sweep: SweepConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every trial (as Ray tasks launching TorchTrainers) and write the summary."""
    import ray

    storage = sweep.storage()
    storage.check()
    at_once = trials_at_once(sweep)
    # num_cpus=0: the task only drives its trainers; the trainers' workers hold the CPUs.
    remote = ray.remote(num_cpus=0, max_retries=0)(_run_trial)
    pending = list(sweep.trials)
    running: dict[Any, ExperimentConfig] = {}
    results: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    log(f"sweep {sweep.name}: {len(pending)} trials, {at_once} at once (max_concurrent {sweep.max_concurrent}; "
        f"what the cluster holds with every variant of a trial training at once)")
    while pending or running:
        while pending and len(running) < at_once:
            cfg = pending.pop(0)
            running[remote.remote(cfg.to_dict())] = cfg
        done, _ = ray.wait(list(running), num_returns=1)
        cfg = running.pop(done[0])
        try:
            results[cfg.name] = ray.get(done[0])
            log(f"trial {cfg.name} finished ({len(results) + len(failures)}/{len(sweep.trials)})")
        except Exception as exc:
            failures[cfg.name] = f"{type(exc).__name__}: {exc}"[:2000]
            log(f"trial {cfg.name} FAILED: {failures[cfg.name][:300]}")
    summary = summarize(sweep, results)
    summary["failures"] = failures
    storage.write_text(SUMMARY_KEY, json.dumps(summary, indent=1, sort_keys=True))
    summary["summary_uri"] = storage.key_uri(SUMMARY_KEY)
    return summary


def trials_at_once(sweep: SweepConfig, total: dict[str, float] | None = None) -> int:
    """``max_concurrent``, or fewer where the cluster cannot hold every trainer of that many
    trials at once: an oversubscribed trainer waits for resources and times out its worker
    group's start (Train retries it, with a traceback each minute) instead of queueing."""
    if total is None:
        import ray

        total = ray.cluster_resources()  # once, not per trial
    at_once = sweep.max_concurrent
    for trial in sweep.trials:
        trainers = check_cluster(trial, sweep.max_concurrent * len(trial.variants), total)
        at_once = min(at_once, max(1, trainers // len(trial.variants)))
    return at_once


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarize(sweep: SweepConfig, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Group trials that differ only in seed; mean and spread of each variant's figures."""
    keys = [k for k in sweep.grid if k != "seed"]
    groups: dict[str, dict[str, Any]] = {}
    trials = []
    for cfg in sweep.trials:
        if cfg.name not in results:
            continue
        flat = cfg.to_dict()
        point = {}
        for key in keys:
            node: Any = flat
            for part in key.split("."):
                node = node[part]
            point[key] = node
        gid = json.dumps(point, sort_keys=True)
        group = groups.setdefault(gid, {"point": point, "trials": []})
        group["trials"].append(cfg.name)
        res = results[cfg.name]
        trials.append({"name": cfg.name, "seed": cfg.seed, "point": point, "n_poisoned": res["n_poisoned"],
                       "variants": {v: {"clean_accuracy": r["clean_accuracy"],
                                        "attack_success_rate": r["attack_success_rate"]}
                                    for v, r in res["variants"].items()}})
    for group in groups.values():
        members = [t for t in trials if t["name"] in group["trials"]]
        group["n_poisoned"] = members[0]["n_poisoned"]
        group["variants"] = {}
        for variant in members[0]["variants"]:
            group["variants"][variant] = {
                metric: _stats([t["variants"][variant][metric] for t in members])
                for metric in ("clean_accuracy", "attack_success_rate")}
    return {"sweep": sweep.name, "grid": sweep.grid, "groups": list(groups.values()), "trials": trials}


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"sweep {summary['sweep']}: mean ± std (min–max) over seeds", ""]
    keys = list(summary["groups"][0]["point"]) if summary["groups"] else []
    head = " ".join(f"{k:>14}" for k in keys)
    lines.append(f"{head} {'poisoned':>8} {'variant':>9} {'seeds':>5} {'clean acc':>24} {'ASR':>24}")
    for g in summary["groups"]:
        for variant, figs in g["variants"].items():
            cells = " ".join(f"{_short(g['point'][k]):>14}" for k in keys)
            acc, asr = figs["clean_accuracy"], figs["attack_success_rate"]
            lines.append(f"{cells} {g['n_poisoned']:>8} {variant:>9} {acc['n']:>5} "
                         f"{_fmt(acc):>24} {_fmt(asr):>24}")
    if summary.get("failures"):
        lines += ["", f"{len(summary['failures'])} trial(s) failed: {', '.join(summary['failures'])}"]
    return "\n".join(lines)


def _fmt(s: dict[str, float]) -> str:
    return f"{s['mean']:.2%} ± {s['std']:.2%} ({s['min']:.1%}–{s['max']:.1%})"
