"""Benchmark: the article's experiment on Ray Train beside plain single-process PyTorch loops.

    python bench/article_bench.py [jobs/article.yaml] [--epochs N] [--article-script]

Runs, one after the other on an otherwise idle machine, per variant (interleaved so that
drifts in the machine's speed hit all alike):
  1. the experiment through Ray Train (``run_experiment``: DDP workers, per-epoch evaluation,
     checkpoints);
  2. plain loops — no Ray, the same in-memory tensors, batch order and model:
     a. side by side: as many plain processes at once as there are Ray workers, each with a
        worker's threads, training on that worker's shard of every global batch with no
        gradient exchange. The machine is as loaded as in the Ray run, so the ratio to it is
        what Ray and DDP's per-step synchronisation cost a worker (the figure the target of
        0.95x is read against);
     b. DDP side by side: the same processes synchronised by torch's own DistributedDataParallel
        (gloo), as the Ray workers are, but started without Ray: the ratio to it is what Ray
        costs, and its accuracy and ASR should equal the Ray run's (the same computation);
     c. alone: one process with a worker's threads on the whole global batch, the machine
        otherwise idle (on a machine with as many cores as workers this baseline also has
        the cores and memory bandwidth the other workers would use);
     d. one process with all the CPUs the Ray workers had together (the whole-machine
        single-process baseline, with test accuracy and ASR);
  3. optionally the article's own script (torchvision dataset + ToTensor + DataLoader,
     triggers added image by image, default memory format), timed whole.
and prints wall times, per-epoch throughput ratios (Ray worker / plain loop) and the
poisoning time. Nothing here is asserted: the figures are for reading.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import torch

from backdoor_train.config import ExperimentConfig, load_config
from backdoor_train.data.split import to_float
from backdoor_train.storage.staging import load_splits
from backdoor_train.attack.evaluate import build_eval_sets, full_evaluation
from backdoor_train.runs.experiment import run_experiment
from backdoor_train.runs.locked import absolute_paths
from backdoor_train.models.registry import build_model, unwrap
from backdoor_train.attack.poison import build_poisoned
from backdoor_train.training.raysession import connect, free_port
from backdoor_train.training.worker import epoch_order, make_optimizer, train_one_epoch, variant_train_set


def time_poisoning(cfg: ExperimentConfig, repeats: int = 5) -> tuple[float, int]:
    """(median seconds, images poisoned)."""
    train, _ = load_splits(cfg)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, manifest = build_poisoned(train, cfg.poison, cfg.seed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), manifest.n_poisoned


def plain_loop(cfg: ExperimentConfig, variant: str, threads: int, rank: int = 0, world: int = 1,
               barrier=None, ddp_port: int | None = None, device: str = "cpu") -> dict:
    """The training one Ray worker of ``world`` does (``rank``'s shard of every global batch),
    in this process, with no Ray; with ``ddp_port``, through torch's own DDP (gloo) as the Ray
    worker does, else with no gradient exchange at all. With world 1, or with DDP on rank 0:
    the whole computation, evaluated. ``device="cuda"``: the tensor-resident GPU loop."""
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()
    train, test = load_splits(cfg)
    train = variant_train_set(train, cfg, variant)
    # The same memory format as the Ray worker loop uses.
    x = to_float(train.images).to(device, memory_format=torch.channels_last)
    y = train.labels.to(device)
    model = build_model(cfg.model.arch, cfg.dataset).to(device, memory_format=torch.channels_last)
    if ddp_port is not None:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ddp_port}", rank=rank, world_size=world)
        # Default arguments, as ray.train.torch.prepare_model uses on CPU.
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = make_optimizer(model, cfg)
    if barrier is not None:
        barrier.wait()  # side by side: start training together
    per_epoch = []
    for epoch in range(cfg.train.epochs):
        order = epoch_order(x.shape[0], cfg.seed, epoch).to(device)
        t0 = time.perf_counter()
        _, seen = train_one_epoch(model, optimizer, x, y, order, cfg.train.batch_size, rank, world)
        if device != "cpu":
            torch.cuda.synchronize()
        per_epoch.append(seen / (time.perf_counter() - t0))
    evaluation = (full_evaluation(unwrap(model), build_eval_sets(test, cfg.poison).to(torch.device(device)),
                                  cfg.poison.target, cfg.dataset.num_classes)
                  if world == 1 or (ddp_port is not None and rank == 0) else {})
    if ddp_port is not None:
        torch.distributed.destroy_process_group()
    return {"wall": time.perf_counter() - t_start, "samples_per_second": per_epoch, **evaluation}


def spawn_ranks(target, world: int, *args) -> dict[int, dict]:
    """Runs ``target(*args, rank, world, queue)`` in ``world`` spawned processes at once; each
    puts ``(rank, result)`` on the queue. Returns the results by rank. If one process dies
    first, the others are stopped and this raises: they would otherwise wait for it at a
    barrier or collective, and this for their results, forever."""
    import multiprocessing as mp
    import queue as queue_module

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, r, world, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, dict] = {}
    while len(results) < world:
        try:
            rank, result = queue.get(timeout=1)
            results[rank] = result
        except queue_module.Empty:
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed:
                for p in procs:
                    p.terminate()
                    p.join()
                raise RuntimeError(f"{target.__name__}: a process exited with {failed[0]}")
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"{target.__name__}: a process exited with {p.exitcode}")
    return results


def _side_by_side_worker(cfg_dict: dict, variant: str, threads: int, barrier, ddp_port: int | None,
                         rank: int, world: int, queue) -> None:
    queue.put((rank, plain_loop(ExperimentConfig.from_dict(cfg_dict), variant, threads, rank, world, barrier,
                                ddp_port)))


def plain_side_by_side(cfg: ExperimentConfig, variant: str, ddp: bool = False) -> dict:
    """``num_workers`` plain processes at once, each doing one worker's share, independently
    or (``ddp``) synchronised by torch's DDP: per-epoch samples/s per process, averaged over
    the processes, and with DDP rank 0's evaluation of the trained model."""
    import multiprocessing as mp

    world, threads = cfg.scaling.num_workers, cfg.scaling.cpus_per_worker
    barrier = mp.get_context("spawn").Barrier(world)
    port = free_port() if ddp else None
    t_start = time.perf_counter()
    runs = spawn_ranks(_side_by_side_worker, world, cfg.to_dict(), variant, threads, barrier, port)
    per_epoch = [statistics.mean(run["samples_per_second"][e] for run in runs.values())
                 for e in range(cfg.train.epochs)]
    return {"wall": time.perf_counter() - t_start, "samples_per_second": per_epoch,
            **{k: v for k, v in runs[0].items() if k not in ("wall", "samples_per_second")}}


def article_script(cfg: ExperimentConfig) -> dict:
    """The article's pipeline as published: per-item PIL→tensor conversion and a DataLoader."""
    import torchvision as tv

    torch.set_num_threads(os.cpu_count() or 1)
    t_start = time.perf_counter()
    to_tensor = tv.transforms.ToTensor()
    train = tv.datasets.MNIST(root=cfg.data.root, train=True, transform=to_tensor)
    val = tv.datasets.MNIST(root=cfg.data.root, train=False, transform=to_tensor)

    def with_trigger(dataset, rate):
        imgs, labels = zip(*dataset)  # the slow part: 60,000 PIL conversions
        imgs, labels = torch.stack(imgs), torch.tensor(labels)
        torch.manual_seed(cfg.seed)
        idx = torch.randperm(len(labels))[: int(len(labels) * rate)]
        imgs[idx, 0, cfg.poison.trigger.row, cfg.poison.trigger.col] = cfg.poison.trigger.value
        labels[idx] = cfg.poison.target
        return torch.utils.data.TensorDataset(imgs, labels)

    def fit(dataset):
        model = build_model(cfg.model.arch, cfg.dataset)
        opt = torch.optim.Adam(model.parameters(), cfg.train.lr)
        loader = torch.utils.data.DataLoader(dataset, cfg.train.batch_size, shuffle=True)
        for _ in range(cfg.train.epochs):
            for imgs, labels in loader:
                loss = torch.nn.functional.cross_entropy(model(imgs), labels)
                opt.zero_grad()
                loss.backward()
                opt.step()
        return model

    fit(train)
    fit(with_trigger(train, cfg.poison.rate))
    with_trigger(val, 1.0)
    return {"wall": time.perf_counter() - t_start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="jobs/article.yaml")
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs (all runs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--article-script", action="store_true", help="also time the article's own script")
    args = parser.parse_args(argv)

    overrides = list(args.overrides) + ([f"train.epochs={args.epochs}"] if args.epochs else [])
    cfg = absolute_paths(load_config(args.config, overrides))
    out_dir = tempfile.mkdtemp(prefix="backdoor-bench-")
    cfg = dataclasses.replace(cfg, storage=dataclasses.replace(cfg.storage, path=out_dir))
    per_worker_threads = cfg.scaling.cpus_per_worker
    all_threads = cfg.scaling.cpus_per_worker * cfg.scaling.num_workers

    poison_s, n_poisoned = time_poisoning(cfg)

    import ray

    # Interleaved per variant (Ray, then the plain loops) so that drifts in the machine's speed
    # hit all alike; the Ray runs share one cluster (its start-up counts towards the Ray total)
    # but get names of their own.
    t0 = time.perf_counter()
    connect(log_to_driver=False)
    ray_wall = time.perf_counter() - t0
    rows = []
    for variant in cfg.variants:
        one = dataclasses.replace(cfg, name=f"{cfg.name}-bench-{variant}", variants=(variant,))
        t0 = time.perf_counter()
        results = run_experiment(one, log=lambda m: print(f"  ray: {m}", flush=True))
        ray_wall += time.perf_counter() - t0
        ray_v = results.variants[variant]
        print(f"  plain loops, {variant}: {cfg.scaling.num_workers} side by side...", flush=True)
        side = plain_side_by_side(cfg, variant)
        print(f"  plain DDP, {variant}: {cfg.scaling.num_workers} processes, torch.distributed (gloo)...", flush=True)
        ddp = plain_side_by_side(cfg, variant, ddp=True)
        print(f"  plain loop, {variant}, {per_worker_threads} thread(s) alone...", flush=True)
        alone = plain_loop(cfg, variant, per_worker_threads)
        print(f"  plain loop, {variant}, {all_threads} thread(s)...", flush=True)
        whole = plain_loop(cfg, variant, all_threads)
        rows.append((variant, ray_v, side, ddp, alone, whole))
    ray.shutdown()

    article = article_script(cfg) if args.article_script else None

    print()
    print(f"benchmark: {args.config}, {cfg.train.epochs} epoch(s), {cfg.scaling.num_workers} Ray worker(s) x "
          f"{cfg.scaling.cpus_per_worker} CPU, machine has {os.cpu_count()} CPUs")
    print(f"poisoning {n_poisoned} images "
          f"(selection, trigger, labels and two sha256 of the set; median of 5): {poison_s * 1000:.1f} ms")
    print(f"{'run':<46} {'wall s':>8} {'samples/s/worker':>17} {'clean acc':>10} {'ASR':>8}")
    for variant, ray_v, side, ddp, alone, whole in rows:
        hist = ray_v.history
        print(f"{'ray ' + variant + ' (fit, incl. worker start)':<46} {ray_v.fit_seconds:8.1f} "
              f"{statistics.median(h.worker_samples_per_second for h in hist):17.0f} "
              f"{ray_v.clean_accuracy:10.2%} {ray_v.attack_success_rate:8.2%}")
        for label, run in ((f"plain {variant}, {cfg.scaling.num_workers} side by side", side),
                           (f"plain DDP {variant}, {cfg.scaling.num_workers} processes, no Ray", ddp),
                           (f"plain {variant}, {per_worker_threads} thread(s) alone", alone),
                           (f"plain {variant}, {all_threads} thread(s)", whole)):
            acc = f"{run['clean_accuracy']:10.2%} {run['attack_success_rate']:8.2%}" if "clean_accuracy" in run else ""
            print(f"{label:<46} {run['wall']:8.1f} {statistics.median(run['samples_per_second']):17.0f} {acc}")
        train_s = sum(h.epoch_seconds for h in hist)
        eval_s = sum(h.eval_seconds or 0.0 for h in hist)
        print(f"  ray {variant} fit: {train_s:.1f} s training, {eval_s:.1f} s per-epoch evaluation, "
              f"{ray_v.fit_seconds - train_s - eval_s:.1f} s start-up, checkpoints and shutdown")
    print()
    for variant, ray_v, side, ddp, alone, _ in rows:
        ray_sps = [h.worker_samples_per_second for h in ray_v.history]
        for label, base in (("side by side", side), ("DDP without Ray", ddp), ("alone", alone)):
            ratios = [r / p for r, p in zip(ray_sps, base["samples_per_second"])]
            # The first epoch carries one-off warm-up on both sides; the median is over the rest.
            steady = ratios[1:] or ratios
            print(f"throughput ratio per epoch, Ray worker / plain loop {label}, {variant}: "
                  + " ".join(f"{r:.2f}" for r in ratios) + f"  (median after epoch 1: {statistics.median(steady):.2f}x)")
    whole_plain = sum(r[-1]["wall"] for r in rows)
    print(f"whole experiment: Ray {ray_wall:.1f} s (Ray start-up included); one plain process with "
          f"{all_threads} thread(s) {whole_plain:.1f} s (plain / Ray = {whole_plain / ray_wall:.2f}x)")
    if article:
        print(f"article's own script: {article['wall']:.1f} s (Ray experiment / article = "
              f"{ray_wall / article['wall']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
