"""Benchmark: what DDP's per-step gradient exchange costs a worker, without Ray.

    python bench/ddp_overhead.py [jobs/article.yaml] [--epochs N] [--repeats R]

Starts ``scaling.num_workers`` plain processes (``scaling.cpus_per_worker`` threads each) on
the article's model, tensors and global batch, and times them per mode, modes interleaved and
repeated so that drifts in the machine's speed hit all alike:

  independent        each process trains on its shard, no gradient exchange (the baseline);
  ddp                torch's DistributedDataParallel with default arguments (as Ray's
                     ``prepare_model`` uses on CPU), gloo;
  ddp_one_bucket     DDP with a 100 MB bucket: one all-reduce per step;
  allreduce_after    no DDP: one all-reduce of the flattened gradients after backward;
  allreduce_alone    the all-reduce of a gradient-sized tensor by itself, no training.

Prints samples/s per worker (mean of epochs after the first) and the ratio to the independent
baseline of the same repeat, plus per-step forward+backward time and its jitter.
Nothing is asserted: the figures are for reading (docs/RESULTS.md, Benchmark).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

# Run as a script, bench/ is on the path: the process helpers live beside the main benchmark.
from article_bench import spawn_ranks
from backdoor_train.config import ExperimentConfig, load_config
from backdoor_train.data.split import to_float
from backdoor_train.storage.staging import load_splits
from backdoor_train.runs.locked import absolute_paths
from backdoor_train.models.registry import build_model
from backdoor_train.training.raysession import free_port
from backdoor_train.training.worker import epoch_order, make_optimizer

MODES = ("independent", "ddp", "ddp_one_bucket", "allreduce_after")


def _worker(cfg_dict: dict, mode: str, epochs: int, port: int, rank: int, world: int, queue) -> None:
    cfg = ExperimentConfig.from_dict(cfg_dict)
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.arch, cfg.dataset).to(memory_format=torch.channels_last)
    params = list(model.parameters())
    if mode == "allreduce_alone":
        flat = torch.zeros(sum(p.numel() for p in params))
        for _ in range(5):
            dist.all_reduce(flat)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(100):
            dist.all_reduce(flat)
        queue.put((rank, {"allreduce_ms": (time.perf_counter() - t0) * 10}))
        dist.destroy_process_group()
        return
    train, _ = load_splits(cfg)
    x, y = to_float(train.images).contiguous(memory_format=torch.channels_last), train.labels
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif mode == "ddp_one_bucket":
        model = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=100)
    optimizer = make_optimizer(model, cfg)
    rates, compute = [], []
    for epoch in range(epochs):
        order = epoch_order(x.shape[0], cfg.seed, epoch)
        dist.barrier()  # every epoch starts together, whatever the mode
        t_epoch, seen = time.perf_counter(), 0
        for start in range(0, order.numel(), cfg.train.batch_size):
            idx = order[start:start + cfg.train.batch_size][rank::world]
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if mode == "allreduce_after":
                compute.append(time.perf_counter() - t0)
                flat = torch.cat([p.grad.reshape(-1) for p in params])
                dist.all_reduce(flat)
                flat /= world
                offset = 0
                for p in params:
                    p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
                    offset += p.numel()
            elif mode == "independent":
                compute.append(time.perf_counter() - t0)
            optimizer.step()
            seen += idx.numel()
        rates.append(seen / (time.perf_counter() - t_epoch))
    out = {"samples_per_second": statistics.mean(rates[1:] or rates)}
    if compute:
        out["compute_ms"] = statistics.mean(compute) * 1000
        out["compute_jitter_ms"] = statistics.stdev(compute) * 1000
    queue.put((rank, out))
    dist.destroy_process_group()


def run_mode(cfg: ExperimentConfig, mode: str, epochs: int) -> dict:
    """One mode on ``num_workers`` processes: each figure averaged over the processes."""
    results = list(spawn_ranks(_worker, cfg.scaling.num_workers, cfg.to_dict(), mode, epochs, free_port()).values())
    return {k: statistics.mean(r[k] for r in results) for k in results[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="jobs/article.yaml")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per mode (the first is not counted)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    cfg = absolute_paths(load_config(args.config))
    print(f"{cfg.scaling.num_workers} processes x {cfg.scaling.cpus_per_worker} thread(s), global batch "
          f"{cfg.train.batch_size}, machine has {os.cpu_count()} CPUs", flush=True)
    alone = run_mode(cfg, "allreduce_alone", 0)
    print(f"all-reduce of the gradients alone: {alone['allreduce_ms']:.2f} ms", flush=True)
    for repeat in range(args.repeats):
        base = None
        for mode in MODES:
            r = run_mode(cfg, mode, args.epochs)
            base = base or r["samples_per_second"]
            extra = (f"  forward+backward {r['compute_ms']:.1f} ± {r['compute_jitter_ms']:.1f} ms"
                     if "compute_ms" in r else "")
            print(f"repeat {repeat + 1} {mode:<16} {r['samples_per_second']:8.0f} samples/s per worker  "
                  f"{r['samples_per_second'] / base:5.2f}x independent{extra}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
