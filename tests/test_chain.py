"""Seeds trained in chains (runs/chain.py, training/chained.py): a link's checkpoints (kept,
pruned, resumed from) on synthetic tensors; on a local Ray cluster, a chain trains each seed as
a fit of its own would, keeps the seeds before a failed link, and resumes each seed where it
stopped."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import pytest
import torch
import yaml

from backdoor_train.cli import EXIT_FAILED, main
from backdoor_train.config import ExperimentConfig
from backdoor_train.storage.arrow import ArrowStorage
from backdoor_train.training.chained import KEEP, restore_link, save_link_checkpoint
from backdoor_train.training.checkpoint import CHECKSUM_FILE, checkpoint_folders
from backdoor_train.training.metrics import WorkerMetrics


@pytest.fixture(scope="module", autouse=True)
def _stop_ray_after_the_module():
    """The CLI calls below start a local Ray cluster in this process and leave it up (as a
    notebook would want); stop it after the module, so that the modules after this one do not
    share the two cores with an idle cluster (their own runs start their own)."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@dataclass
class _Worker:  # what save_link_checkpoint and restore_link read of a WorkerContext
    cfg: ExperimentConfig
    metrics: WorkerMetrics
    rank: int = 0

    def say(self, msg: str, progress: bool = False) -> None:
        print(msg)


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_a_link_keeps_its_newest_checkpoints_and_resumes_from_the_newest_valid_one(tmp_path):
    from pyarrow import fs as pafs

    store = ArrowStorage(pafs.LocalFileSystem(), str(tmp_path))
    w = _Worker(ExperimentConfig.from_dict({"name": "seed-1", "train": {"epochs": 6}}), WorkerMetrics())
    model, optimizer = _model_and_optimizer(0)
    history = []
    for done in range(1, 6):
        history.append({"epoch": done})
        save_link_checkpoint(w, model, optimizer, done, list(history), store, "seed-1/clean")
    kept = sorted(checkpoint_folders(store, "seed-1/clean"))
    assert kept == [f"seed-1/clean/checkpoint_epoch_{e:04d}" for e in (3, 4, 5)] and KEEP == 3
    assert sorted(os.listdir(tmp_path / "seed-1" / "clean")) == [os.path.basename(k) for k in kept]

    # The newest checkpoint cut short (no checksum): the link resumes from the one before.
    os.remove(tmp_path / "seed-1" / "clean" / "checkpoint_epoch_0005" / CHECKSUM_FILE)
    fresh, fresh_opt = _model_and_optimizer(1)
    assert restore_link(w, fresh, fresh_opt, store, "seed-1/clean") == (4, [{"epoch": e} for e in (1, 2, 3, 4)])
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert restore_link(w, fresh, fresh_opt, store, "seed-2/clean") == (0, [])  # nothing there: from scratch


def _seed_results(folder, seed: int) -> dict:
    return json.loads((folder / f"seed-{seed}" / "results.json").read_text())


def _figures(results: dict) -> dict:
    """What training decides, per variant: the final figures and each epoch's."""
    return {v: (r["clean_accuracy"], r["attack_success_rate"], r["per_class_accuracy"],
                [(h["train_loss"], h["test_accuracy"], h["attack_success_rate"]) for h in r["history"]])
            for v, r in results["variants"].items()}


def test_a_chain_trains_each_seed_as_its_own_fit_keeps_seeds_before_a_failure_and_resumes(tmp_path, mnist_root,
                                                                                          capsys):
    exp = {"name": "chained", "data": {"root": mnist_root, "train_samples": 1000, "test_samples": 500},
           "train": {"epochs": 4, "batch_size": 100, "lr": 0.002}, "poison": {"rate": 0.1},
           "scaling": {"num_workers": 1}, "storage": {"path": str(tmp_path / "runs")}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    folder = tmp_path / "runs" / "chained"

    # A file where seed 2's first poisoned checkpoint goes: that link fails, seed 1 keeps its results.
    (folder / "seed-2" / "poisoned").mkdir(parents=True)
    (folder / "seed-2" / "poisoned" / "checkpoint_epoch_0001").write_text("in the way")
    assert main(["run", str(path), "--seeds", "1-2"]) == EXIT_FAILED
    results = json.loads((folder / "results.json").read_text())
    assert [r["seed"] for r in results["per_seed"]] == [1] and list(results["failures"]) == ["seed-2"]
    assert "kept for a rerun: clean: " in results["failures"]["seed-2"]
    assert "poisoned: no checkpoint" in results["failures"]["seed-2"]
    seed1 = _seed_results(folder, 1)
    capsys.readouterr()

    # The obstacle gone, a rerun trains seed 2 only.
    (folder / "seed-2" / "poisoned" / "checkpoint_epoch_0001").unlink()
    assert main(["run", str(path), "--seeds", "1-2"]) == 0
    assert "not trained again: seed-1" in capsys.readouterr().err
    assert _seed_results(folder, 1) == seed1
    seed2 = _seed_results(folder, 2)
    for variant in ("clean", "poisoned"):  # the newest KEEP checkpoints of each link, the last one final
        kept = sorted(os.listdir(folder / "seed-2" / variant))
        assert [k for k in kept if k.startswith("checkpoint_")] == [f"checkpoint_epoch_{e:04d}" for e in (2, 3, 4)]
        assert (folder / "seed-2" / variant / "model.pt").exists()

    # Seed 2 cut short after its third epoch: the rerun trains its fourth only, to the same figures.
    (folder / "seed-2" / "results.json").unlink()
    for variant in ("clean", "poisoned"):
        shutil.rmtree(folder / "seed-2" / variant / "checkpoint_epoch_0004")
    assert main(["run", str(path), "--seeds", "1-2"]) == 0
    resumed = _seed_results(folder, 2)
    assert _figures(resumed) == _figures(seed2)
    for variant in ("clean", "poisoned"):
        before, after = seed2["variants"][variant]["history"], resumed["variants"][variant]["history"]
        assert [h["ended_at"] for h in after[:3]] == [h["ended_at"] for h in before[:3]]  # not trained again
        assert after[3]["ended_at"] > before[3]["ended_at"]

    # The same seeds as fits of their own (a sweep over seed, under another name): the same figures.
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"name": "one-fit-each", "base": "exp.yaml",
                                                         "grid": {"seed": [1, 2]}}))
    assert main(["sweep", str(tmp_path / "sweep.yaml")]) == 0
    for seed, chained in ((1, seed1), (2, seed2)):
        alone = _seed_results(tmp_path / "runs" / "one-fit-each", seed)
        assert _figures(alone) == _figures(chained)
