"""Benchmark: a multi-seed run in chains beside the same seeds run one fit per seed, in one invocation.

    python bench/seeds_bench.py [jobs/article.yaml] [--seeds 1-4] [--repeats R] [--set KEY=VALUE ...]

Per repeat, one after the other on an otherwise idle machine (the order alternates between
repeats, so that drifts in a shared host's speed hit both alike), each in a fresh process that
starts its own local Ray (start-up included, in a private RAY_TMPDIR), wall time measured from
outside:
  1. ``backdoor-train run CONFIG --seeds S``: the seeds in chains (runs/chain.py), one worker
     group per variant training the seeds one after another;
  2. ``backdoor-train sweep`` over ``seed: S`` of the same config, ``max_concurrent`` as many
     seeds: one fit per seed and variant, as a multi-seed run trained before chains (the same
     runs/trials.py path; the sweep's summary is the only other work it does).
Prints both wall times and the ratio chain / one fit per seed; where the time goes (the models'
training and evaluation seconds summed, over the CPUs that ran them at once: the floor no
scheduling removes); and whether every seed's figures are identical both ways (they must be:
a chain trains each seed as its own fit would). Nothing is asserted: the figures are for
reading (docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

import yaml

from job_bench import REPO, machine, timed

from backdoor_train.config import load_config, parse_seeds
from backdoor_train.storage import LocalStorage
from backdoor_train.storage.runstore import RunStore


def _ray_env() -> tuple[dict[str, str], str]:
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    return env, ray_tmp


def run_chained(config: str, seeds: str, overrides: list[str], work: str, name: str) -> float:
    env, ray_tmp = _ray_env()
    sets = [*overrides, f"name={name}", f"storage.path={work}"]
    cmd = [sys.executable, "-m", "backdoor_train", "run", config, "--seeds", seeds,
           *[a for s in sets for a in ("--set", s)]]
    try:
        return timed(cmd, env, os.path.join(work, f"{name}.log"))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def run_one_fit_each(config: str, seeds: list[int], overrides: list[str], work: str, name: str) -> float:
    """The sweep over ``seeds`` of ``config`` with ``overrides``, every seed allowed at once."""
    base = load_config(config, overrides).to_dict()
    base.update(name=name, storage={**base["storage"], "path": work}, seeds=[])
    base["data"]["root"] = os.path.abspath(os.path.join(REPO, base["data"]["root"])) \
        if not os.path.isabs(base["data"]["root"]) else base["data"]["root"]
    base_path = os.path.join(work, f"{name}-base.yaml")
    with open(base_path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(base, fh)
    sweep_path = os.path.join(work, f"{name}.yaml")
    with open(sweep_path, "w", encoding="utf-8") as fh:
        yaml.safe_dump({"name": name, "base": os.path.basename(base_path), "grid": {"seed": seeds},
                        "max_concurrent": len(seeds)}, fh)
    env, ray_tmp = _ray_env()
    try:
        return timed([sys.executable, "-m", "backdoor_train", "sweep", sweep_path], env,
                     os.path.join(work, f"{name}.log"))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def seed_figures(work: str, name: str, seeds: list[int]) -> dict[int, dict]:
    """Per seed and variant: final figures and each epoch's, and the seconds spent training and
    evaluating."""
    out = {}
    for seed in seeds:
        results = RunStore(LocalStorage(os.path.join(work, name)), f"seed-{seed}").read_experiment_results()
        out[seed] = {v: {"figures": (r.clean_accuracy, r.attack_success_rate,
                                     [(h.train_loss, h.test_accuracy, h.attack_success_rate) for h in r.history]),
                         "compute": sum(h.epoch_seconds + (h.eval_seconds or 0.0) for h in r.history)}
                     for v, r in results.variants.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default="jobs/article.yaml")
    parser.add_argument("--seeds", default="1-4")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    seeds = list(parse_seeds(args.seeds))
    cfg = load_config(args.config, args.overrides)
    cpus = 2 * cfg.scaling.num_workers * cfg.scaling.cpus_per_worker  # clean and poisoned at once
    print(f"machine: {machine()}")
    print(f"seeds {args.seeds} of {args.config} {' '.join(args.overrides)}; the two variants at once, "
          f"{cpus} CPU(s) between them")
    rows = []
    for repeat in range(args.repeats):
        work = tempfile.mkdtemp(prefix=f"seeds-bench-{repeat}-")
        walls: dict[str, float] = {}
        order = ("chain", "one fit each") if repeat % 2 == 0 else ("one fit each", "chain")
        for way in order:
            if way == "chain":
                walls[way] = run_chained(args.config, args.seeds, args.overrides, work, "chained")
            else:
                walls[way] = run_one_fit_each(args.config, seeds, args.overrides, work, "one-fit-each")
            print(f"repeat {repeat}: {way}: {walls[way]:.1f} s", flush=True)
        chained, alone = seed_figures(work, "chained", seeds), seed_figures(work, "one-fit-each", seeds)
        same = all(chained[s][v]["figures"] == alone[s][v]["figures"] for s in seeds for v in chained[s])
        compute = sum(f["compute"] for s in seeds for f in chained[s].values())
        floor = compute / 2  # the two variants' workers train at once (one worker each on 2 CPUs)
        ratio = walls["chain"] / walls["one fit each"]
        print(f"repeat {repeat}: chain / one fit each = {ratio:.2f}x; the models' training + evaluation "
              f"{compute:.0f} s of worker time, {floor:.0f} s of wall at best with both variants at once: "
              f"{walls['chain'] - floor:.0f} s of the chain's wall and {walls['one fit each'] - floor:.0f} s of "
              f"one fit each's are start-up, waiting, checkpoints and the end; every seed's figures identical "
              f"both ways: {same}", flush=True)
        for seed in seeds:
            print(f"  seed {seed}: " + "; ".join(
                f"{v}: clean accuracy {f['figures'][0]:.2%}, ASR {f['figures'][1]:.2%}" for v, f in chained[seed].items()))
        rows.append(ratio)
        shutil.rmtree(work, ignore_errors=True)
    print(f"chain / one fit per seed: {', '.join(f'{r:.2f}x' for r in rows)} (median {statistics.median(rows):.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
