"""Sweeps on a real local Ray cluster, detection with retraining, and the HTML reports."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import yaml

from backdoor_train.cli import EXIT_BAD_INPUT, main
from backdoor_train.config import ConfigError
from backdoor_train.reporting.html import SECTIONS
from backdoor_train.training.raysession import ClusterError
from backdoor_train.runs.sweep import load_sweep
from backdoor_train.runs.trials import trials_at_once

from conftest import REPO_ROOT


def _sweep_file(tmp_path, mnist_path, grid, **extra):
    base = {"name": "base", "data": {"root": mnist_path, "train_samples": 3000, "test_samples": 1000},
            "train": {"epochs": 2, "batch_size": 100, "lr": 0.002}, "variants": ["poisoned"],
            "scaling": {"num_workers": 1}, "storage": {"path": str(tmp_path / "runs")}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny-sweep", "base": "base.yaml", "grid": grid, **extra}))
    return path


def test_the_shipped_sweeps_load():
    rate = load_sweep(f"{REPO_ROOT}/jobs/rate_sweep.yaml")
    assert [t.poison.rate for t in rate.trials][::2] == [0.0, 0.0005, 0.001, 0.005, 0.01, 0.02]
    assert {t.seed for t in rate.trials} == {1, 2} and len({t.name for t in rate.trials}) == 12
    kinds = {t.poison.trigger.kind for t in load_sweep(f"{REPO_ROOT}/jobs/trigger_sweep.yaml").trials}
    assert kinds == {"pixel", "patch", "blend"}
    seeds = load_sweep(f"{REPO_ROOT}/jobs/seed_sweep.yaml").trials
    assert [t.seed for t in seeds] == list(range(1, 9)) and {t.poison.rate for t in seeds} == {0.01}


def test_the_gpu_seed_sweep_packs_16_trainers_on_one_gpu_and_no_sweep_oversubscribes():
    gpu = load_sweep(f"{REPO_ROOT}/jobs/seed_sweep-gpu.yaml")
    assert [t.seed for t in gpu.trials] == list(range(1, 9))
    assert all(t.variants == ("clean", "poisoned") and t.scaling.use_gpu for t in gpu.trials)
    # A 16-CPU, one-GPU host holds all 8 trials x 2 variants at once; a 2-CPU machine 1 trial,
    # and the 2-CPU seed sweep (1 variant, 1 CPU per trial) its 2.
    assert trials_at_once(gpu.trials, gpu.max_concurrent, {"CPU": 16.0, "GPU": 1.0}) == 8
    assert trials_at_once(gpu.trials, gpu.max_concurrent, {"CPU": 4.0, "GPU": 1.0}) == 2
    cpu_only = dataclasses.replace(gpu, trials=[dataclasses.replace(
        t, scaling=dataclasses.replace(t.scaling, use_gpu=False)) for t in gpu.trials])
    assert trials_at_once(cpu_only.trials, cpu_only.max_concurrent, {"CPU": 2.0}) == 1
    assert trials_at_once(load_sweep(f"{REPO_ROOT}/jobs/seed_sweep.yaml").trials, 2, {"CPU": 2.0}) == 2
    with pytest.raises(ClusterError, match="GPU per model"):
        trials_at_once(gpu.trials, gpu.max_concurrent, {"CPU": 16.0})


@pytest.mark.parametrize("grid, extra, message", [
    ({"poison.rate": [0.1, 3]}, {}, "poison.rate must be in [0, 1]"),
    ({"poison.rate": []}, {}, "sweep grid must map dotted keys to non-empty lists"),
    ({"seed": [1, 2, 1]}, {}, "sweep grid seed repeats a value"),
    ({"poison.rate": [0.1]}, {"max_concurrent": 0}, "max_concurrent must be an integer >= 1"),
    ({"poison.rate": [0.1]}, {"parallel": 3}, "unknown key parallel"),
    ({"poison.ratio": [0.1]}, {}, "unknown key poison.ratio"),
])
def test_bad_sweeps_are_refused(tmp_path, mnist_path, grid, extra, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_sweep(str(_sweep_file(tmp_path, mnist_path, grid, **extra)))


@pytest.mark.integration
def test_sweep_detect_retrain_and_reports(tmp_path, mnist_root, capsys):
    path = _sweep_file(tmp_path, mnist_root, {"poison.rate": [0.0, 0.1], "seed": [1, 2]}, max_concurrent=2)
    assert main(["sweep", str(path)]) == 0
    out = capsys.readouterr().out
    assert "sweep tiny-sweep: mean ± std" in out
    summary = json.loads((tmp_path / "runs" / "tiny-sweep" / "summary.json").read_text())
    assert len(summary["trials"]) == 4 and not summary["failures"]
    groups = {g["point"]["poison.rate"]: g for g in summary["groups"]}
    assert set(groups) == {0.0, 0.1}
    assert groups[0.1]["n_poisoned"] == 300 and groups[0.0]["n_poisoned"] == 0
    for g in groups.values():
        assert g["variants"]["poisoned"]["attack_success_rate"]["n"] == 2
    for trial in summary["trials"]:
        folder = tmp_path / "runs" / "tiny-sweep" / trial["name"]
        assert (folder / "results.json").is_file() and (folder / "poison_manifest.json").is_file()

    # Detection (+ retraining without the flagged samples) on the most poisoned trial.
    trial = next(t["name"] for t in summary["trials"] if t["point"]["poison.rate"] == 0.1 and t["seed"] == 1)
    trial_cfg = tmp_path / "trial.yaml"
    cfg = json.loads((tmp_path / "runs" / "tiny-sweep" / trial / "results.json").read_text())["config"]
    cfg["defense"] = {"clean_samples": 500, "cleanse_steps": 40, "strip_blends": 16}  # seconds, not minutes
    trial_cfg.write_text(yaml.safe_dump(cfg))
    assert main(["detect", str(trial_cfg), "--retrain", "spectral_signatures"]) == 0
    detection = json.loads((tmp_path / "runs" / "tiny-sweep" / trial / "detection.json").read_text())
    assert set(detection["methods"]) == {"activation_clustering", "spectral_signatures"}
    # Each method's per-label figure (what the report plots): every label has clean images here.
    labels = {str(c) for c in range(10)}
    assert set(detection["methods"]["activation_clustering"]["clean_share_ratio"]) == labels
    assert set(detection["methods"]["spectral_signatures"]["score_tail"]) == labels
    assert set(detection["retrain"]) == {"spectral_signatures"}
    retrained = detection["retrain"]["spectral_signatures"]
    assert retrained["removed"] == detection["methods"]["spectral_signatures"]["flagged"]
    assert 0.0 <= retrained["attack_success_rate"] <= 1.0
    # The inference-time defenses ran too (as Ray tasks), measured on the 500 test images after the
    # defender's 500.
    cleanse, strip = detection["neural_cleanse"], detection["strip"]
    assert len(cleanse["anomaly_index"]) == 10 and 0 <= cleanse["suspect"] < 10
    assert len(cleanse["suspect_mask"]) == 28 and 0 <= cleanse["suspect_mass_near_trigger"] <= 1
    assert cleanse["unlearning"]["before"]["clean_accuracy"] > 0.5
    assert strip["n_clean"] == 500 and 0 <= strip["far"] <= 1 and 0 <= strip["frr"] <= 1
    assert sum(strip["clean_entropy_histogram"]) == 500

    # Reports: the sweep's and the single experiment's, every section they have present (an
    # experiment has no rate axis), plots inlined.
    # (curves, accuracy vs ASR, examples, detection per label, Neural Cleanse, STRIP; the sweep
    # adds ASR vs rate)
    for source, out_name, plots in ((path, "sweep.html", 7), (trial_cfg, "trial.html", 6)):
        assert main(["report", str(source), "--out", str(tmp_path / out_name)]) == 0
        page = (tmp_path / out_name).read_text()
        for section in SECTIONS:
            expected = out_name == "sweep.html" or section != "ASR vs poison rate"
            assert (f"<h2>{section}</h2>" in page) is expected, (out_name, section)
        assert page.count("data:image/png;base64,") == plots, out_name
    assert "Line: mean over seeds" in (tmp_path / "sweep.html").read_text()
    assert all(s in (tmp_path / "trial.html").read_text() for s in ("spectral_signatures", "Neural Cleanse", "STRIP"))


def test_report_of_a_run_that_never_ran(tmp_path, mnist_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "never", "data": {"root": mnist_path},
                                    "storage": {"path": str(tmp_path / "runs")}}))
    assert main(["report", str(path)]) == EXIT_BAD_INPUT
    assert "has" in capsys.readouterr().err
