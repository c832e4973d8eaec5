"""End to end on a real local Ray cluster: the CLI trains both variants with 2 DDP workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from backdoor_train.config import ExperimentConfig
from backdoor_train.data.registry import load_split
from backdoor_train.data.mnist import MNIST
from backdoor_train.attack.evaluate import build_eval_sets, full_evaluation
from backdoor_train.models.registry import build_model
from backdoor_train.attack.poison import select_poison_indices

from conftest import small_config

pytestmark = pytest.mark.integration


def test_cli_trains_clean_and_poisoned_with_two_workers(tmp_path, mnist_root):
    runs = tmp_path / "runs"
    cfg = small_config(mnist_root, str(runs), train={"epochs": 3}).to_dict()
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "backdoor_train", "run", str(path)],
                          capture_output=True, text=True, timeout=900, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for variant in ("clean", "poisoned"):
        for epoch in (1, 2, 3):
            assert f"[tiny/{variant}] epoch {epoch}/3" in out, "progress lines are shown while it runs"
    assert "per-class clean accuracy" in out

    results = json.loads((runs / "tiny" / "results.json").read_text())
    for variant in ("clean", "poisoned"):
        v = results["variants"][variant]
        accs = [h["test_accuracy"] for h in v["history"]]
        assert [h["epoch"] for h in v["history"]] == [1, 2, 3]
        assert all(h["world_size"] == 2 for h in v["history"])
        assert accs[-1] > accs[0] and v["clean_accuracy"] > 0.9, accs
        assert (runs / "tiny" / variant / "checkpoint_epoch_0003" / "state.pt").is_file()

    # The manifest records exactly the seeded choice.
    manifest = json.loads((runs / "tiny" / "poison_manifest.json").read_text())
    train = load_split(MNIST, mnist_root, train=True, limit=6000)
    assert manifest["n_poisoned"] == 300
    assert manifest["indices"] == select_poison_indices(train.labels, 0.05, seed=1).tolist()

    # The saved final model reproduces the reported figures.
    model = build_model("article_cnn", MNIST)
    model.load_state_dict(torch.load(runs / "tiny" / "poisoned" / "model.pt"))
    exp = ExperimentConfig.from_dict(cfg)
    sets = build_eval_sets(load_split(MNIST, mnist_root, train=False, limit=2000), exp.poison)
    again = full_evaluation(model, sets, target=8, num_classes=10)
    assert again["clean_accuracy"] == results["variants"]["poisoned"]["clean_accuracy"]
    assert again["attack_success_rate"] == results["variants"]["poisoned"]["attack_success_rate"]
