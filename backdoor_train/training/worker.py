"""The Ray Train worker loop: one model variant (clean or poisoned), data-parallel with DDP.

Every worker loads the same dataset tensors, rebuilds the same poisoned set from the seed and
checks its sha256 against the driver's manifest, then trains on its own shard of every
global batch: the global batch stays ``train.batch_size`` whatever the worker count.
Reads top to bottom: set-up, restore, epochs (train, evaluate, checkpoint, report).
"""

from __future__ import annotations

import math
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from backdoor_train.training.checkpoint import (checkpoint_dir_name, load_state, load_with_fallback, save_state,
                                          set_rng_state, upload_checkpoint)
from backdoor_train.config import ExperimentConfig
from backdoor_train.data.split import Split, to_float
from backdoor_train.attack.evaluate import build_eval_sets, eval_counts
from backdoor_train.training.failures import quiet_worker_tracebacks
from backdoor_train.training.precision import autocast, check_worker_device
from backdoor_train.training.rayinternals import checkpoint_destination, quiet_report_log
from backdoor_train.models.registry import build_model, unwrap
from backdoor_train.attack.poison import build_poisoned
from backdoor_train.progress import StepClock, quiet


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled sample order of one epoch, the same on every worker (so shards are disjoint)
    and a pure function of (seed, epoch) (so a resumed run sees the same order)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def train_one_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                    y: torch.Tensor, order: torch.Tensor, batch_size: int,
                    rank: int = 0, world: int = 1, precision: str = "fp32") -> tuple[float, int]:
    """One pass over ``order`` in global batches; this worker takes every ``world``-th sample of
    each, its forward pass and loss at ``precision`` (the weights and their updates stay fp32).
    Returns (sum of this worker's per-sample losses, samples this worker saw)."""
    model.train()
    loss_sum, seen = 0.0, 0
    for start in range(0, order.numel(), batch_size):
        global_idx = order[start:start + batch_size]
        local_idx = global_idx[rank::world]
        with autocast(precision, x.device):
            logits = model(x[local_idx])
            per_sample = F.cross_entropy(logits, y[local_idx], reduction="sum")
        # DDP averages gradients over workers; scaling by world / global batch makes the result
        # the exact mean over the global batch even when the shards differ in size by one.
        loss = per_sample * (world / global_idx.numel())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += per_sample.item()
        seen += local_idx.numel()
    return loss_sum, seen


def make_optimizer(model: torch.nn.Module, cfg: ExperimentConfig) -> torch.optim.Optimizer:
    if cfg.train.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    return torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=0.9)


def variant_train_set(train: Split, cfg: ExperimentConfig, variant: str,
                      exclude: tuple[int, ...] | list[int] = ()) -> Split:
    """The training set of a variant: clean, poisoned, or poisoned minus ``exclude`` (the
    samples a detection method flagged, for the "filtered-*" retraining variants)."""
    if variant != "clean":
        train, _ = build_poisoned(train, cfg.poison, cfg.seed)
    return without(train, exclude)


def without(split: Split, exclude: tuple[int, ...] | list[int]) -> Split:
    """``split`` minus the samples at ``exclude`` (the split itself when there are none)."""
    if not exclude:
        return split
    keep = torch.ones(len(split), dtype=torch.bool)
    keep[torch.as_tensor(list(exclude), dtype=torch.long)] = False
    return Split(split.images[keep], split.labels[keep])


@dataclass(frozen=True)
class WorkerContext:
    """What every step of one worker's loop reads: the config, the variant, its place in the
    worker group, its device and its metrics sink."""

    cfg: ExperimentConfig
    variant: str
    rank: int
    world: int
    device: torch.device
    metrics: Any

    def say(self, msg: str, progress: bool = False) -> None:
        """``msg`` as the variant's line, printed by rank 0 only; a ``progress`` line (set-up
        and epochs) not with ``--quiet``."""
        if self.rank == 0 and not (progress and quiet()):
            print(f"[{self.cfg.name}/{self.variant}] {msg}", flush=True)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    setup_started = time.perf_counter()
    w = start_worker(loop_config)
    setup = {"start": time.perf_counter() - setup_started}
    x, y, eval_sets = load_data(w, loop_config, setup)
    t0 = time.perf_counter()
    model, optimizer = build_model_and_optimizer(w)
    start_epoch, history, ckpt_suffix = restore(w, model, optimizer, loop_config.get("resume_from"))
    setup["model"] = time.perf_counter() - t0
    w.say(f"worker set-up {time.perf_counter() - setup_started:.1f}s ("
          + ", ".join(f"{k} {v:.2f}s" for k, v in setup.items()) + ")", progress=True)

    def report(epoch_metrics: dict[str, Any], due: bool, done: int) -> None:
        _report(epoch_metrics, due and w.rank == 0, model, optimizer, done, history, w.metrics,
                checkpoint_dir_name(done, ckpt_suffix), w.cfg.storage.retry_seconds)

    train_epochs(w, model, optimizer, x, y, eval_sets, start_epoch, history, report)
    w.metrics.finish()


def train_epochs(w: WorkerContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                 y: torch.Tensor, eval_sets: Any, start_epoch: int, history: list[dict[str, Any]],
                 report: Callable[[dict[str, Any], bool, int], None]) -> None:
    """The epochs from ``start_epoch`` on, each trained, evaluated, appended to ``history`` and
    handed to ``report(metrics, checkpoint due, epochs done)`` (a barrier of all workers)."""
    cfg = w.cfg
    # The ETA: the mean wall time of the epochs trained now (a resumed run's earlier ones left out).
    clock = StepClock(cfg.train.epochs, start_epoch)
    for epoch in range(start_epoch, cfg.train.epochs):
        epoch_metrics, seen = run_epoch(w, model, optimizer, x, y, eval_sets, epoch)
        history.append(epoch_metrics)
        w.metrics.observe_epoch(epoch_metrics, seen)
        clock.step()
        w.say(f"epoch {epoch + 1}/{cfg.train.epochs}  loss {epoch_metrics['train_loss']:.4f}  "
              f"test acc {epoch_metrics['test_accuracy']:.2%}  ASR {epoch_metrics['attack_success_rate']:.2%}  "
              f"{epoch_metrics['epoch_seconds']:.1f}s  {epoch_metrics['samples_per_second']:.0f} samples/s  "
              f"{clock.summary()}", progress=True)
        done = epoch + 1
        report(epoch_metrics, done % cfg.train.checkpoint_every == 0 or done == cfg.train.epochs, done)


# --- set-up: Ray's logging, the config, the worker's place in the group, the seed, metrics ---------

def start_worker(loop_config: dict[str, Any]) -> WorkerContext:
    import ray.train
    import ray.train.torch

    from backdoor_train.training.metrics import make_worker_metrics

    quiet_report_log()
    quiet_worker_tracebacks()  # the driver says why in one line and keeps the traceback
    cfg = ExperimentConfig.from_dict(loop_config["experiment"])
    variant: str = loop_config["variant"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    check_worker_device(cfg.train.precision, cfg.scaling.use_gpu)  # this node, whatever the driver's probe saw
    if not cfg.scaling.use_gpu:
        torch.set_num_threads(cfg.scaling.cpus_per_worker)
    torch.manual_seed(cfg.seed)
    metrics = make_worker_metrics(cfg, loop_config["run_id"], variant, rank, ctx.get_local_rank(),
                                  loop_config.get("fit_index", 0), loop_config.get("fits", 1))
    return WorkerContext(cfg, variant, rank, world, device, metrics)


# --- data: the same tensors on every worker, checked against the driver's hash --------------------

def load_data(w: WorkerContext, loop_config: dict[str, Any],
              setup: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(images, labels) of the variant's training set on the device, and this worker's shard of
    the evaluation sets; each step's seconds into ``setup``."""
    from backdoor_train.attack.poison import dataset_sha256
    from backdoor_train.storage.staging import load_splits

    cfg = w.cfg
    t0 = time.perf_counter()
    train, test = load_splits(cfg)
    setup["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    train = variant_train_set(train, cfg, w.variant, loop_config.get("exclude", ()))
    sha = dataset_sha256(train)
    if sha != loop_config["train_sha256"]:
        raise RuntimeError(f"worker {w.rank}: the {w.variant} training set hashes to {sha}, the driver's "
                           f"to {loop_config['train_sha256']}: data differ between nodes")
    setup["poison+hash"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    x, y = to_float(train.images).to(w.device, memory_format=torch.channels_last), train.labels.to(w.device)
    eval_sets = build_eval_sets(test, cfg.poison).shard(w.rank, w.world).to(w.device)
    w.metrics.set_poisoned_samples(loop_config["n_poisoned"])
    setup["to device"] = time.perf_counter() - t0
    return x, y, eval_sets


# --- the model, its optimizer, and the state of an interrupted run --------------------------------

def build_model_and_optimizer(w: WorkerContext) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    import ray.train.torch

    # channels_last: oneDNN's (and cuDNN's) faster convolution kernels; measured +15-25% on CPU.
    model = ray.train.torch.prepare_model(build_model(w.cfg.model.arch, w.cfg.dataset)
                                          .to(memory_format=torch.channels_last))
    return model, make_optimizer(model, w.cfg)


def restore(w: WorkerContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            resume_from: Optional[str]) -> tuple[int, list[dict[str, Any]], str]:
    """The checkpoint Ray gives this fit, else the one the driver names (``resume_from``, a
    folder name: it set Ray's run snapshot aside, training/resume.py), loaded into the model,
    the optimizer and the RNGs. Returns (epochs done, their history, the suffix of this fit's
    checkpoint names); (0, [], "") with no checkpoint."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and resume_from:
        filesystem, path = checkpoint_destination(resume_from)
        checkpoint = ray.train.Checkpoint(path=path, filesystem=filesystem)
    if checkpoint is None:
        return 0, [], ""
    state, used, fell_back = load_with_fallback(checkpoint, w.say)
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    # The corrupt checkpoint's directory name is still in Ray's list: new names must differ.
    suffix = "-" + uuid.uuid4().hex[:6] if fell_back else ""
    w.say(f"resuming after epoch {state['epochs_done']} from {used.path}")
    return state["epochs_done"], state["history"], suffix


# --- one epoch: train, evaluate, sum over the workers ---------------------------------------------

def run_epoch(w: WorkerContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
              y: torch.Tensor, eval_sets: Any, epoch: int) -> tuple[dict[str, Any], int]:
    """Epoch ``epoch`` (from 0) trained and evaluated: its metrics, summed over the workers, and
    the samples this worker trained on. Raises when the training loss is no longer finite."""
    cfg = w.cfg
    order = epoch_order(x.shape[0], cfg.seed, epoch).to(w.device)
    t0 = time.perf_counter()
    loss_sum, seen = train_one_epoch(model, optimizer, x, y, order, cfg.train.batch_size, w.rank, w.world,
                                     cfg.train.precision)
    if w.device.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    with autocast(cfg.train.precision, w.device):  # the final figures are fp32, on the driver
        counts = eval_counts(unwrap(model), eval_sets, cfg.poison.target)
    eval_seconds = time.perf_counter() - t0
    totals = torch.tensor([loss_sum, seen], dtype=torch.float64)
    if w.world > 1:
        import torch.distributed as dist

        # gloo reduces CPU tensors; NCCL needs them on the GPU.
        packed = torch.cat([counts, totals]).to(w.device)
        dist.all_reduce(packed)
        counts, totals = packed[:4].cpu(), packed[4:].cpu()
    epoch_metrics = {
        "epoch": epoch + 1,
        "train_loss": float(totals[0] / totals[1]),
        "test_accuracy": float(counts[0] / counts[1]),
        "attack_success_rate": float(counts[2] / counts[3]) if counts[3] else float("nan"),
        "epoch_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "worker_samples_per_second": seen / train_seconds,
        "samples_per_second": float(totals[1]) / train_seconds,
        "world_size": w.world,
        "ended_at": time.time(),  # wall clock: the gaps between epochs show what reporting costs
    }
    if not math.isfinite(epoch_metrics["train_loss"]):
        # Every later epoch would train on NaN weights; stop with the reason (exit 1).
        raise RuntimeError(f"{w.variant}: the training loss became {epoch_metrics['train_loss']} in epoch "
                           f"{epoch + 1}: training diverged (a smaller train.lr may help)")
    return epoch_metrics, seen


# --- reporting: every worker's metrics each epoch, rank 0's checkpoint when one is due -------------

def _report(epoch_metrics: dict[str, Any], save: bool, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer, done: int, history: list[dict[str, Any]],
            metrics: Any, dir_name: str, retry_seconds: float) -> None:
    """Report metrics from every worker (it is a barrier); only rank 0 writes the checkpoint."""
    import ray.train

    if not save:
        ray.train.report(epoch_metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        nbytes = save_state(tmp, model=unwrap(model), optimizer=optimizer, epochs_done=done, history=history)
        try:
            ray.train.report(epoch_metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=dir_name,
                             checkpoint_upload_fn=lambda ckpt, name: upload_checkpoint(ckpt.path, name, retry_seconds))
        except Exception:
            metrics.checkpoint_failed()
            raise
        metrics.checkpoint_saved(time.perf_counter() - t0, nbytes)


def restore_model(checkpoint_dir: str, cfg: ExperimentConfig,
                  device: Optional[str] = "cpu") -> tuple[torch.nn.Module, dict]:
    """A plain model (``cfg``'s architecture and dataset) loaded from a checkpoint directory,
    and the whole checkpoint state."""
    state = load_state(checkpoint_dir, map_location=device)
    model = build_model(cfg.model.arch, cfg.dataset)
    model.load_state_dict(state["model"])
    return model, state

