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
stored under ``<storage.path>/<sweep name>/``. Trials run as Ray tasks (runs/trials.py), at most
``max_concurrent`` at once; trials finished earlier with the same setting are reused. The
summary groups trials that differ only in ``seed`` and describes each group as a multi-seed
experiment does (runs/seeds.py): mean, standard deviation, 95% t interval, min and max of clean
accuracy and ASR, and the paired clean-accuracy difference.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from backdoor_train.config import ConfigError, ExperimentConfig, apply_override, check_name, load_config, read_yaml
from backdoor_train.results import ExperimentResults, SweepGroup, SweepSummary, TrialRow
from backdoor_train.runs.locked import absolute_paths
from backdoor_train.runs.seeds import format_statistics, seed_row, seed_statistics
from backdoor_train.storage.runstore import SweepStore, child_path
from backdoor_train.storage import Storage, open_storage
from backdoor_train.runs.trials import run_trials
from backdoor_train.attack.triggers import TRIGGERS


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
    data = read_yaml(path, "sweep file") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file {path} must hold a mapping at the top level")
    unknown = set(data) - {"name", "base", "overrides", "grid", "max_concurrent"}
    if unknown:
        raise ConfigError(f"unknown key {sorted(unknown)[0]} in sweep file (allowed: base, grid, max_concurrent, "
                          f"name, overrides)")
    name = data.get("name")
    check_name(name, "sweep name")  # the sweep's folder
    if not isinstance(data.get("base"), str):
        raise ConfigError("sweep base must name an experiment YAML file")
    base_path = os.path.join(os.path.dirname(os.path.abspath(path)), data["base"])
    base_overrides = [f"{k}={json.dumps(v)}" for k, v in (data.get("overrides") or {}).items()]
    base = load_config(base_path, base_overrides + list(overrides or []))
    grid = data.get("grid")
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError("sweep grid must map dotted keys to non-empty lists of values")
    for key, values in grid.items():  # a repeated value would run one trial twice, in one folder
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise ConfigError(f"sweep grid {key} repeats a value ({values})")
    max_concurrent = data.get("max_concurrent", 2)
    if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int) or max_concurrent < 1:
        raise ConfigError(f"sweep max_concurrent must be an integer >= 1 (got {max_concurrent!r})")

    if base.seeds:
        raise ConfigError(f"sweep base {data['base']}: seeds is set; a sweep's seeds are its grid's seed axis "
                          f"(grid: {{seed: {list(base.seeds)}}})")
    base = absolute_paths(base)
    storage = child_path(base.storage.path, name)
    trials = []
    for point in itertools.product(*grid.values()):
        trial_data = base.to_dict()
        label = []
        for key, value in zip(grid, point):
            try:
                apply_override(trial_data, f"{key}={json.dumps(value)}")
            except ConfigError as exc:
                raise ConfigError(f"sweep grid {key}: {exc}") from None
            if key == "poison.trigger.kind" and isinstance(value, str) and value in TRIGGERS:
                # The base's trigger keys another kind lacks (a pixel's row and col for a blend).
                trigger = trial_data["poison"]["trigger"]
                own = {f.name for f in dataclasses.fields(TRIGGERS[value][0])}
                trial_data["poison"]["trigger"] = {k: v for k, v in trigger.items() if k in own}
            label.append(f"{key.split('.')[-1]}={_short(value)}")
        trial_data["name"] = "_".join(label).replace("=", "-")[:100]
        trial_data["storage"]["path"] = storage
        if any(t.name == trial_data["name"] for t in trials):  # names are cut at 100 characters
            raise ConfigError(f"sweep grid point {dict(zip(grid, point))}: its trial name {trial_data['name']!r} "
                              f"is another point's too; shorten the grid's values")
        try:
            trials.append(ExperimentConfig.from_dict(trial_data))
        except ConfigError as exc:
            raise ConfigError(f"sweep grid point {dict(zip(grid, point))}: {exc}") from None
    return SweepConfig(name=name, base=base, grid=grid, max_concurrent=max_concurrent, trials=trials)


def run_sweep(sweep: SweepConfig, log: Callable[[str], None] = print) -> SweepSummary:
    """Run every trial not finished before (as Ray tasks launching TorchTrainers) and write the summary."""
    storage = sweep.storage()
    storage.check()
    log(f"sweep {sweep.name}: {len(sweep.trials)} trials")
    results, failures = run_trials(sweep.trials, sweep.max_concurrent, log)
    summary = dataclasses.replace(summarize(sweep, results), failures=failures)
    return dataclasses.replace(summary, summary_uri=SweepStore(storage).write_summary(summary))


def summarize(sweep: SweepConfig, results: dict[str, ExperimentResults]) -> SweepSummary:
    """Group trials that differ only in seed; mean and spread of each variant's figures."""
    keys = [k for k in sweep.grid if k != "seed"]
    groups: dict[str, tuple[dict[str, Any], list[TrialRow]]] = {}
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
        trial = TrialRow.of(seed_row(cfg.seed, results[cfg.name]), name=cfg.name, point=point)
        groups.setdefault(json.dumps(point, sort_keys=True), (point, []))[1].append(trial)
        trials.append(trial)
    out = []
    for point, members in groups.values():
        stats = seed_statistics([t.variants for t in members])
        out.append(SweepGroup(point=point, trials=tuple(t.name for t in members), n_poisoned=members[0].n_poisoned,
                              variants=stats.variants, clean_accuracy_difference=stats.clean_accuracy_difference))
    return SweepSummary(sweep=sweep.name, grid=sweep.grid, groups=tuple(out), trials=tuple(trials))


def format_summary(summary: SweepSummary) -> str:
    lines = [f"sweep {summary.sweep}: mean ± std [95% t interval] over seeds"]
    for g in summary.groups:
        point = ", ".join(f"{k}={_short(v)}" for k, v in g.point.items()) or "all trials"
        lines += ["", f"{point} ({g.n_poisoned} poisoned images)"]
        lines += format_statistics(g.statistics, indent="  ")
    if summary.failures:
        lines += ["", f"{len(summary.failures)} trial(s) failed: {', '.join(summary.failures)}"]
    return "\n".join(lines)
