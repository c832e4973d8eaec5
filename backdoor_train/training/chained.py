"""A chained fit's worker loop: several experiments' models of one variant (a multi-seed run's
seeds) trained one after another by one worker group.

Each Ray Train fit costs its start (a controller, worker processes that import torch, the
process group: 13-17 s measured for an empty fit on 2 vCPUs) and its end; a multi-seed run that
starts one fit per seed and variant pays that per seed. A chain pays it once per variant. Each
link (a seed) still trains exactly as a fit of its own would: its seed's poisoned set (checked
against the driver's hash), a model and optimizer built from its seed, the same epochs, and its
checkpoints in its own ``seed-<s>/<variant>/`` folder, written by rank 0 with the checksum last.

Ray keeps no checkpoint of a chain (its reports carry metrics only): where a link resumes is
read from its folder when it starts (the newest valid checkpoint, the routine the driver plans
with), so a chain restarted by Ray (``train.max_failures``) or rerun skips the links already
trained and resumes the one that was cut short. A link keeps its newest ``KEEP`` checkpoints.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from typing import Any

import torch

from backdoor_train.config import ExperimentConfig
from backdoor_train.progress import StepClock
from backdoor_train.storage.arrow import ArrowStorage
from backdoor_train.training.checkpoint import (checkpoint_dir_name, checkpoint_epoch, checkpoint_folders,
                                                copy_checkpoint, newest_valid_checkpoint, save_state,
                                                set_rng_state, state_from_bytes)
from backdoor_train.training.worker import (WorkerContext, build_model_and_optimizer, load_data, start_worker,
                                            train_epochs)
from backdoor_train.models.registry import unwrap

KEEP = 3  # checkpoints kept per link, as Ray's CheckpointConfig(num_to_keep=3) keeps per fit


def link_storage(loop_config: dict[str, Any], link: dict[str, Any]) -> ArrowStorage:
    """The storage of a link's experiment, through the filesystem the driver handed over."""
    from pyarrow import fs as pafs

    return ArrowStorage(loop_config["filesystem"] or pafs.LocalFileSystem(), link["root"])


def train_chain(loop_config: dict[str, Any]) -> None:
    w0 = start_worker(loop_config)  # the chain's: metrics sink, rank, device, threads
    links = loop_config["chain"]
    clock = StepClock(len(links), 0)
    for i, link in enumerate(links):
        cfg = ExperimentConfig.from_dict(link["experiment"])
        w = dataclasses.replace(w0, cfg=cfg)
        torch.manual_seed(cfg.seed)  # the link's model starts as its own fit's would
        t0 = time.perf_counter()
        x, y, eval_sets = load_data(w, {**link, "variant": w.variant}, {})
        model, optimizer = build_model_and_optimizer(w)
        store = link_storage(loop_config, link)
        start_epoch, history = restore_link(w, model, optimizer, store, link["prefix"])
        w.say(f"link {i + 1}/{len(links)} of this worker group: set-up {time.perf_counter() - t0:.1f}s",
              progress=True)

        def report(epoch_metrics: dict[str, Any], due: bool, done: int) -> None:
            import ray.train

            if due and w.rank == 0:
                save_link_checkpoint(w, model, optimizer, done, history, store, link["prefix"])
            ray.train.report(epoch_metrics)  # a barrier: every worker waits for rank 0's save

        train_epochs(w, model, optimizer, x, y, eval_sets, start_epoch, history, report)
        clock.step()
        w.say(f"link {i + 1}/{len(links)} done  {clock.summary()}", progress=True)
    w0.metrics.finish()


def restore_link(w: WorkerContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 store: ArrowStorage, prefix: str) -> tuple[int, list[dict[str, Any]]]:
    """The newest valid checkpoint in the link's folder loaded into the model, the optimizer and
    the RNGs: (epochs done, their history); (0, []) with none."""
    found = newest_valid_checkpoint(store, prefix, w.say)
    if found is None:
        return 0, []
    key, data = found
    state = state_from_bytes(data, where=store.key_uri(key))
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    if state["epochs_done"] < w.cfg.train.epochs:
        w.say(f"resuming after epoch {state['epochs_done']} from {store.key_uri(key)}")
    return state["epochs_done"], list(state["history"])


def save_link_checkpoint(w: WorkerContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer, done: int,
                         history: list[dict[str, Any]], store: ArrowStorage, prefix: str) -> None:
    """Rank 0's checkpoint of epoch ``done`` into the link's folder; the older ones beyond ``KEEP`` go."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        nbytes = save_state(tmp, model=unwrap(model), optimizer=optimizer, epochs_done=done, history=history)
        try:
            copy_checkpoint(tmp, store.filesystem, store.full_path(f"{prefix}/{checkpoint_dir_name(done)}"),
                            w.cfg.storage.retry_seconds)
        except Exception:
            w.metrics.checkpoint_failed()
            raise
    w.metrics.checkpoint_saved(time.perf_counter() - t0, nbytes)
    folders = sorted(checkpoint_folders(store, prefix), key=lambda d: checkpoint_epoch(d.rsplit("/", 1)[-1]) or 0)
    for folder in folders[:-KEEP]:
        store.filesystem.delete_dir(store.full_path(folder))
