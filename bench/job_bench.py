"""Benchmark: the whole ``backdoor-train run`` job beside the best plain alternatives, in one invocation.

    python bench/job_bench.py [jobs/article.yaml] [--repeats R] [--set KEY=VALUE ...]
                              [--alt-set KEY=VALUE ...] [--no-article-script] [--plain]

Per repeat, one after the other on an otherwise idle machine (interleaved, so that drifts in
a shared host's speed hit both alike):
  1. the job as a user runs it: ``python -m backdoor_train run CONFIG`` in a fresh process that
     starts its own local Ray (start-up included, in a private RAY_TMPDIR), trains every variant,
     evaluates and writes its results; wall time measured from outside;
  1b. with ``--alt-set``, the same job in another layout (e.g. ``scaling.num_workers=2``: two DDP
     workers per model, the variants then one after the other on 2 CPUs), timed the same way;
  2. the article's own script (``article_bench.article_script``: torchvision dataset, ToTensor,
     DataLoader, the clean then the poisoned model), also in a fresh process, timed the same way.
Prints both wall times, the ratio job / article script per repeat and its median, and from the
job's results.json each fit's breakdown (worker start-up, training, evaluation) and figures.
With ``--plain`` (the GPU check) each variant also trains once in a plain tensor-resident loop
on the config's device, alone, for the per-epoch throughput ratio Ray worker / plain loop.
Nothing is asserted: the figures are for reading (docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from backdoor_train.results import ExperimentResults
from backdoor_train.storage.runstore import RunStore
from backdoor_train.storage import LocalStorage

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPUs ({cpu}), {gpu}, torch {torch.__version__}"


def timed(cmd: list[str], env: dict[str, str], log_path: str) -> float:
    """Wall seconds of ``cmd``; its output goes to ``log_path``; a failure ends the benchmark."""
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        with open(log_path, encoding="utf-8") as fh:
            sys.stderr.write(fh.read()[-4000:])
        raise SystemExit(f"{' '.join(cmd)} exited with {proc.returncode} (log: {log_path})")
    return wall


def run_job(config: str, overrides: list[str], work: str, name: str) -> tuple[float, ExperimentResults]:
    """One whole ``backdoor-train run``: (wall seconds, its results.json)."""
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    sets = [*overrides, f"name={name}", f"storage.path={work}"]
    cmd = [sys.executable, "-m", "backdoor_train", "run", config, *[a for s in sets for a in ("--set", s)]]
    try:
        wall = timed(cmd, env, os.path.join(work, f"{name}.log"))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return wall, RunStore(LocalStorage(work), name).read_experiment_results()


def run_article_script(config: str, overrides: list[str], work: str, repeat: int) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), config, "--article-script-only",
           *[a for s in overrides for a in ("--set", s)]]
    return timed(cmd, dict(os.environ), os.path.join(work, f"article-script-{repeat}.log"))


def print_job(results: ExperimentResults) -> None:
    for variant, v in results.variants.items():
        hist = v.history
        train_s = sum(h.epoch_seconds for h in hist)
        eval_s = sum(h.eval_seconds or 0.0 for h in hist)
        sps = statistics.median(h.worker_samples_per_second for h in hist[1:] or hist)
        print(f"  {variant:>10}: fit {v.fit_seconds:6.1f} s = training {train_s:5.1f} s + evaluation "
              f"{eval_s:4.1f} s + start-up, checkpoints, shutdown {v.fit_seconds - train_s - eval_s:5.1f} s;"
              f" {sps:,.0f} samples/s per worker; clean acc {v.clean_accuracy:.2%}, "
              f"ASR {v.attack_success_rate:.2%}")


def plain_comparison(config: str, overrides: list[str], results: ExperimentResults) -> None:
    """Per-epoch throughput of the job's workers against the plain tensor-resident loop."""
    from article_bench import plain_loop

    from backdoor_train.config import load_config
    from backdoor_train.runs.locked import absolute_paths

    cfg = absolute_paths(load_config(config, overrides))
    device = "cuda" if cfg.scaling.use_gpu else "cpu"
    for variant, v in results.variants.items():
        plain = plain_loop(cfg, variant, cfg.scaling.cpus_per_worker, device=device)
        ray_sps = [h.worker_samples_per_second for h in v.history]
        ratios = [r / p for r, p in zip(ray_sps, plain["samples_per_second"])]
        steady = ratios[1:] or ratios
        print(f"  {variant:>10}: plain loop on {device} {plain['wall']:.1f} s, "
              f"{statistics.median(plain['samples_per_second'][1:] or plain['samples_per_second']):,.0f} samples/s;"
              f" Ray worker / plain per epoch: {' '.join(f'{r:.2f}' for r in ratios)} "
              f"(median after epoch 1: {statistics.median(steady):.2f}x)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="jobs/article.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--alt-set", action="append", default=[], metavar="KEY=VALUE",
                        help="also run the job with these overrides in every repeat (another layout, "
                             "e.g. scaling.num_workers=2), timed the same way")
    parser.add_argument("--no-article-script", action="store_true", help="time the job alone (e.g. on a GPU)")
    parser.add_argument("--plain", action="store_true", help="also the plain tensor-resident loop per variant")
    parser.add_argument("--article-script-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = os.path.abspath(args.config)

    if args.article_script_only:  # the child process of run_article_script
        from article_bench import article_script

        from backdoor_train.config import load_config
        from backdoor_train.runs.locked import absolute_paths

        article_script(absolute_paths(load_config(config, args.overrides)))
        return 0

    work = tempfile.mkdtemp(prefix="backdoor-job-bench-")
    print(f"job benchmark: {args.config} {' '.join(args.overrides)}; {machine()}; logs in {work}", flush=True)
    rows = []
    for repeat in range(1, args.repeats + 1):
        job_wall, results = run_job(config, args.overrides, work, f"bench-job-{repeat}")
        print(f"repeat {repeat}: backdoor-train run {job_wall:.1f} s (Ray start-up included)", flush=True)
        print_job(results)
        alt_wall = None
        if args.alt_set:
            alt_wall, alt_results = run_job(config, args.overrides + args.alt_set, work, f"bench-alt-{repeat}")
            print(f"repeat {repeat}: with {' '.join(args.alt_set)}: {alt_wall:.1f} s; "
                  f"it / default = {alt_wall / job_wall:.2f}x", flush=True)
            print_job(alt_results)
        article_wall = None
        if not args.no_article_script:
            article_wall = run_article_script(config, args.overrides, work, repeat)
            print(f"repeat {repeat}: article's script {article_wall:.1f} s; job / article = "
                  f"{job_wall / article_wall:.2f}x" + (f", with {' '.join(args.alt_set)} / article = "
                                                       f"{alt_wall / article_wall:.2f}x" if alt_wall else ""),
                  flush=True)
        rows.append((job_wall, alt_wall, article_wall))
        if args.plain and repeat == 1:
            plain_comparison(config, args.overrides, results)

    def summary(label: str, walls: list[float]) -> None:
        line = f"{label}: median {statistics.median(walls):.1f} s over {len(walls)} run(s) ({', '.join(f'{w:.1f}' for w in walls)})"
        if not args.no_article_script:
            ratios = [w / a for w, (_, _, a) in zip(walls, rows)]
            line += f"; / article's script per repeat {', '.join(f'{r:.2f}x' for r in ratios)} (median {statistics.median(ratios):.2f}x)"
        print(line)

    print()
    summary("backdoor-train run", [r[0] for r in rows])
    if args.alt_set:
        summary(f"backdoor-train run with {' '.join(args.alt_set)}", [r[1] for r in rows])
    if not args.no_article_script:
        print(f"article's script: median {statistics.median(r[2] for r in rows):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
