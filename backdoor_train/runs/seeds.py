"""Multi-seed experiments: the paired clean/poisoned experiment once per seed, and its figures
over seeds.

One seed says little: the backdoor is learned abruptly, somewhere between epochs 5 and 10,
and when depends on the seed. ``seeds: [1, 2, ...]`` (or ``--seeds 1-16``) runs the experiment once per
seed and reports, per variant, mean, standard deviation and 95% t interval of clean accuracy
and ASR, the paired difference in clean accuracy, the per-epoch ASR over seeds and the epoch
at which each seed's ASR first reaches 50%. Stored (storage/runstore.py) as ``<name>/config.json``
(the multi-seed config: seeds may be added on a rerun), ``<name>/seed-<s>/`` (one full
experiment per seed) and ``<name>/results.json`` (per-seed rows and the statistics).

A sweep named ``<name>`` whose grid is ``seed: [...]`` over the same base stores its trials in
exactly these folders, and both describe seeds with ``seed_statistics``: a sweep over seeds
and a multi-seed experiment reuse each other's seeds and cannot disagree.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

from backdoor_train.config import ExperimentConfig
from backdoor_train.results import (EpochBands, ExperimentResults, MultiSeedResults, SeedFigures, SeedRow,
                                    SeedStatistics, VariantStatistics)
from backdoor_train.runs.chain import run_chained
from backdoor_train.runs.experiment import check_existing_run, record_config, refuse_other_setting
from backdoor_train.runs.locked import locked_run
from backdoor_train.storage.runlock import refuse_if_running
from backdoor_train.storage.runstore import RunStore, child_path
from backdoor_train.runs.stats import by_epoch, describe, first_epoch_at, fmt_pct, fmt_pp, fmt_range, paired_difference
from backdoor_train.storage import open_storage

ASR_REACHED = 0.5  # "the backdoor is learned": the first epoch whose ASR reaches this


def seed_name(seed: int) -> str:
    return f"seed-{seed}"  # what a sweep over ``seed`` calls its trials too


def seed_experiments(cfg: ExperimentConfig) -> list[ExperimentConfig]:
    """One single-seed experiment per seed, stored below the multi-seed experiment's folder."""
    storage = dataclasses.replace(cfg.storage, path=child_path(cfg.storage.path, cfg.name))
    return [dataclasses.replace(cfg, name=seed_name(s), seed=s, seeds=(), storage=storage) for s in cfg.seeds]


def check_seed_folders(children: list[ExperimentConfig]) -> None:
    """Refuse (exit 2) when a seed's folder holds a run of another setting or one running now."""
    for child in children:
        storage = open_storage(child.storage)
        refuse_if_running(storage, child.name)
        refuse_other_setting(child, storage)


def seed_row(seed: int, results: ExperimentResults) -> SeedRow:
    """One seed's figures (from its experiment's results) as the statistics need them."""
    return SeedRow(seed=seed, n_poisoned=results.n_poisoned, results_uri=results.results_uri, variants={
        v: SeedFigures(clean_accuracy=r.clean_accuracy, attack_success_rate=r.attack_success_rate,
                       asr_reached_epoch=first_epoch_at(r.history, "attack_success_rate", ASR_REACHED))
        for v, r in results.variants.items()})


def seed_statistics(per_seed: list[dict[str, SeedFigures]]) -> SeedStatistics:
    """Figures over seeds from each seed's ``{variant: figures}``: per variant ``describe`` of
    clean accuracy and ASR, and, with both variants, the paired difference in clean accuracy
    (poisoned - clean, seed by seed)."""
    variants = [v for v in per_seed[0] if all(v in seed for seed in per_seed)]
    difference = None
    if "clean" in variants and "poisoned" in variants:
        difference = paired_difference([seed["clean"].clean_accuracy for seed in per_seed],
                                       [seed["poisoned"].clean_accuracy for seed in per_seed])
    return SeedStatistics(variants={v: VariantStatistics(
        clean_accuracy=describe([seed[v].clean_accuracy for seed in per_seed]),
        attack_success_rate=describe([seed[v].attack_success_rate for seed in per_seed])) for v in variants},
        clean_accuracy_difference=difference)


def by_epoch_over_seeds(results: list[ExperimentResults]) -> dict[str, EpochBands]:
    """Per variant, the test accuracy and ASR of every epoch described over seeds."""
    variants = [v for v in results[0].variants if all(v in r.variants for r in results)]
    return {v: EpochBands(**{key: by_epoch([r.variants[v].history for r in results], key)
                             for key in ("test_accuracy", "attack_success_rate")}) for v in variants}


def aggregate(cfg: ExperimentConfig, results: dict[str, ExperimentResults], failures: dict[str, str],
              started: float) -> MultiSeedResults:
    """The multi-seed results: per-seed rows, statistics over them, the config."""
    done = [(s, results[seed_name(s)]) for s in cfg.seeds if seed_name(s) in results]
    rows = tuple(seed_row(s, r) for s, r in done)
    out = MultiSeedResults(experiment=cfg.name, seeds=cfg.seeds, started_at=started, finished_at=time.time(),
                           per_seed=rows, failures=failures, config=cfg)
    if not rows:
        return out
    stats = seed_statistics([row.variants for row in rows])
    return dataclasses.replace(out, n_poisoned=rows[0].n_poisoned, variants=stats.variants,
                               clean_accuracy_difference=stats.clean_accuracy_difference,
                               by_epoch=by_epoch_over_seeds([r for _, r in done]))


def run_seeds(cfg: ExperimentConfig, log: Callable[[str], None] = print) -> MultiSeedResults:
    """Run the experiment once per seed in ``cfg.seeds`` (seeds finished earlier are reused),
    in chains of seeds trained one after another by one worker group per variant (runs/chain.py),
    as many chains at once as the cluster holds; write and return the multi-seed results."""
    # The whole, for its config.json and results.json; each seed's run takes its own as well.
    with locked_run(cfg) as run:  # checks the cluster before anything is written or trained
        cfg, storage = run.cfg, run.storage
        check_existing_run(cfg, storage, log)
        children = seed_experiments(cfg)
        check_seed_folders(children)
        record_config(cfg, storage)
        started = time.time()
        log(f"{len(cfg.seeds)} seeds: the experiment runs once per seed, below {storage.key_uri(cfg.name)}")
        results, failures = run_chained(cfg, storage, run.run_id, children, log)
        out = aggregate(cfg, results, failures, started)
        uri = RunStore(storage, cfg.name).write_results(out)
    return dataclasses.replace(out, results_uri=uri)


def format_statistics(stats: SeedStatistics, indent: str = "") -> list[str]:
    """Table rows of ``seed_statistics``: mean ± std [95% interval], and the ASR's range."""
    lines = [f"{indent}{'variant':<10} {'seeds':>5}  {'clean accuracy':<34} {'ASR':<34} {'ASR min–max':>13}"]
    for variant, figs in stats.variants.items():
        acc, asr = figs.clean_accuracy, figs.attack_success_rate
        lines.append(f"{indent}{variant:<10} {acc.n:>5}  {fmt_pct(acc):<34} {fmt_pct(asr):<34} "
                     f"{fmt_range(asr):>13}")
    if stats.clean_accuracy_difference is not None:
        lines.append(f"{indent}clean accuracy, poisoned − clean, paired by seed: "
                     f"{fmt_pp(stats.clean_accuracy_difference)}")
    return lines


def format_seed_results(out: MultiSeedResults) -> str:
    cfg = out.config
    lines = [f"experiment {out.experiment}: {len(out.per_seed)} of {len(out.seeds)} seeds, "
             f"{'?' if out.n_poisoned is None else out.n_poisoned} poisoned training images, target "
             f"{cfg.poison.target}, {cfg.poison.selection} selection", "",
             "mean ± std [95% t interval] over seeds:"]
    if out.statistics is not None:
        lines += format_statistics(out.statistics)
        variants = list(out.statistics.variants)
        lines += ["", f"per seed (ASR ≥ {ASR_REACHED:.0%} first at epoch; '-' never):",
                  f"{'seed':>6}  " + "  ".join(f"{v + ' acc':>13} {v + ' ASR':>13} {'epoch':>5}" for v in variants)]
        for row in out.per_seed:
            cells = []
            for v in variants:
                r = row.variants[v]
                epoch = r.asr_reached_epoch
                cells.append(f"{r.clean_accuracy:>13.2%} {r.attack_success_rate:>13.2%} "
                             f"{'-' if epoch is None else epoch:>5}")
            lines.append(f"{row.seed:>6}  " + "  ".join(cells))
    if out.failures:
        lines += ["", f"{len(out.failures)} seed(s) failed: {', '.join(out.failures)}"]
    lines += ["", f"results: {out.results_uri or '(not saved)'}"]
    return "\n".join(lines)
