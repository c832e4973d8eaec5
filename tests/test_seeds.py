"""Multi-seed experiments: layout, statistics, reuse of finished seeds, agreement with a sweep
over seeds (units on synthetic results; one real run on a local Ray cluster)."""

from __future__ import annotations

import json

import pytest
import yaml

from backdoor_train.cli import EXIT_BAD_INPUT, main
from backdoor_train.config import ConfigError
from backdoor_train.runs.experiment import check_existing_run, finished_run, record_config
from backdoor_train.storage.runstore import RESULTS, RunStore
from backdoor_train.reporting.html import OPTIONAL_SECTIONS, SECTIONS
from backdoor_train.runs.seeds import aggregate, seed_experiments
from backdoor_train.storage import open_storage
from backdoor_train.runs.sweep import load_sweep, summarize

from conftest import small_config
from fake_results import experiment_results


def _results(cfg, clean_acc: float, poisoned_acc: float, asr: list[float]):
    """What run_experiment returns for one seed, with made-up figures."""
    return experiment_results(cfg, {"clean": (clean_acc, [0.01] * 3), "poisoned": (poisoned_acc, asr)})


def test_one_experiment_per_seed_below_the_experiments_folder(tmp_path, mnist_path):
    cfg = small_config(mnist_path, str(tmp_path / "runs"), name="multi", seed=3, seeds=[3, 5])
    children = seed_experiments(cfg)
    assert [(c.name, c.seed, c.seeds) for c in children] == [("seed-3", 3, ()), ("seed-5", 5, ())]
    assert {c.storage.path for c in children} == {str(tmp_path / "runs" / "multi")}
    # Everything else is the experiment's own setting.
    assert all(c.to_dict() | {"name": 0, "seed": 0, "seeds": 0, "storage": 0}
               == cfg.to_dict() | {"name": 0, "seed": 0, "seeds": 0, "storage": 0} for c in children)


def test_aggregate_and_a_sweep_over_the_same_seeds_agree(tmp_path, mnist_path):
    cfg = small_config(mnist_path, str(tmp_path / "runs"), name="multi", seeds=[1, 2, 3])
    figures = {1: (0.990, 0.989, [0.0, 0.3, 0.8]), 2: (0.985, 0.986, [0.0, 0.6, 0.9]), 3: (0.992, 0.990, [0.1, 0.2, 0.4])}
    results = {c.name: _results(c, *figures[c.seed]) for c in seed_experiments(cfg)}
    out = aggregate(cfg, results, {}, started=0.0)
    assert [r.seed for r in out.per_seed] == [1, 2, 3]
    assert [r.variants["poisoned"].asr_reached_epoch for r in out.per_seed] == [3, 2, None]
    asr = out.variants["poisoned"].attack_success_rate
    assert asr.n == 3 and asr.mean == pytest.approx(0.7) and asr.ci95[0] < 0.7 < asr.ci95[1]
    diff = out.clean_accuracy_difference
    assert diff.mean == pytest.approx((-0.001 + 0.001 - 0.002) / 3)
    assert [r.mean for r in out.by_epoch["poisoned"].attack_success_rate] == pytest.approx([1 / 30, 11 / 30, 0.7])

    sweep_file = tmp_path / "sweep.yaml"
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k not in ("seed", "seeds", "name")}))
    sweep_file.write_text(yaml.safe_dump({"name": "multi", "base": "base.yaml", "grid": {"seed": [1, 2, 3]}}))
    sweep = load_sweep(str(sweep_file))
    # The sweep's trials are the multi-seed experiment's seeds: same names, folders and setting.
    assert [t.to_dict() for t in sweep.trials] == [c.to_dict() for c in seed_experiments(cfg)]
    (group,) = summarize(sweep, results).groups
    assert group.variants == out.variants
    assert group.clean_accuracy_difference == out.clean_accuracy_difference


def test_finished_seeds_are_reused_only_with_the_same_setting(tmp_path, mnist_path):
    cfg = small_config(mnist_path, str(tmp_path / "runs"), name="seed-1")
    storage = open_storage(cfg.storage)
    assert finished_run(cfg, storage) is None
    RunStore(storage, "seed-1").write_results(_results(cfg, 0.99, 0.98, [0.9]))
    assert set(finished_run(cfg, storage).variants) == {"clean", "poisoned"}
    only = small_config(mnist_path, str(tmp_path / "runs"), name="seed-1", variants=["poisoned"])
    assert set(finished_run(only, storage).variants) == {"poisoned"}
    more_cpus = small_config(mnist_path, str(tmp_path / "runs"), name="seed-1", scaling={"num_workers": 1})
    assert finished_run(more_cpus, storage) is not None  # how it ran does not change what it trained
    for other in (small_config(mnist_path, str(tmp_path / "runs"), name="seed-1", train={"epochs": 3}),
                  small_config(mnist_path, str(tmp_path / "runs"), name="seed-1", poison={"selection": "numpy"})):
        assert finished_run(other, storage) is None
    storage.write_text(f"seed-1/{RESULTS}", "{not json")
    assert finished_run(cfg, storage) is None


def test_a_name_is_either_one_seed_or_many(tmp_path, mnist_path):
    runs = str(tmp_path / "runs")
    multi = small_config(mnist_path, runs, name="x", seeds=[1, 2])
    storage = open_storage(multi.storage)
    check_existing_run(multi, storage, log=print)
    assert not storage.exists("x/config.json")  # checking writes nothing
    record_config(multi, storage)
    more = small_config(mnist_path, runs, name="x", seeds=[1, 2, 3])
    check_existing_run(more, storage, log=print)  # more seeds
    record_config(more, storage)
    with pytest.raises(ConfigError, match=r"seeds: \[1, 2, 3\] -> \[\]"):
        check_existing_run(small_config(mnist_path, runs, name="x"), storage, log=print)
    with pytest.raises(ConfigError, match="train.lr"):
        check_existing_run(small_config(mnist_path, runs, name="x", seeds=[1], train={"lr": 0.1}), storage, print)
    # A run recorded before poison.selection existed drew with numpy: the article's draw differs.
    single = small_config(mnist_path, runs, name="old")
    old = single.to_dict()
    del old["poison"]["selection"], old["seeds"]
    storage.write_text("old/config.json", json.dumps(old))
    with pytest.raises(ConfigError, match="poison.selection: 'numpy' -> 'article'"):
        check_existing_run(single, storage, log=print)


def test_a_seed_folder_of_another_setting_is_refused_before_any_training(tmp_path, mnist_path):
    from backdoor_train.runs.trials import run_trials

    cfg = small_config(mnist_path, str(tmp_path / "runs"), name="multi", seeds=[1, 2])
    first, second = seed_experiments(cfg)
    other = small_config(mnist_path, first.storage.path, name="seed-2", seed=2, poison={"selection": "numpy"})
    record_config(other, open_storage(other.storage))  # e.g. an old sweep's trial
    with pytest.raises(ConfigError, match="experiment 'seed-2' already exists .*poison.selection: 'numpy' -> 'article'"):
        run_trials([first, second], 2, log=print)  # raised before Ray is needed: no cluster here


def test_a_sweep_base_with_seeds_is_refused(tmp_path, mnist_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"seeds": [1, 2], "data": {"root": mnist_path}}))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"name": "s", "base": "base.yaml", "grid": {"poison.rate": [0.1]}}))
    with pytest.raises(ConfigError, match="seeds is set; a sweep's seeds are its grid's seed axis"):
        load_sweep(str(tmp_path / "sweep.yaml"))


def test_detect_refuses_a_multi_seed_experiment(tmp_path, mnist_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "m", "seeds": [1, 2], "data": {"root": mnist_path},
                                    "storage": {"path": str(tmp_path / "runs")}}))
    assert main(["detect", str(path)]) == EXIT_BAD_INPUT
    assert "seeds: detect works on one trained experiment" in capsys.readouterr().err


@pytest.mark.integration
def test_multi_seed_run_resume_sweep_and_report(tmp_path, mnist_root, capsys):
    exp = {"name": "multi", "data": {"root": mnist_root, "train_samples": 3000, "test_samples": 1000},
           "train": {"epochs": 2, "batch_size": 100, "lr": 0.002}, "poison": {"rate": 0.1},
           "scaling": {"num_workers": 1}, "storage": {"path": str(tmp_path / "runs")}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    folder = tmp_path / "runs" / "multi"

    assert main(["run", str(path), "--seeds", "1-2"]) == 0
    out = capsys.readouterr().out
    assert "mean ± std [95% t interval] over seeds" in out and "paired by seed" in out
    results = json.loads((folder / "results.json").read_text())
    assert [r["seed"] for r in results["per_seed"]] == [1, 2] and not results["failures"]
    assert results["variants"]["poisoned"]["attack_success_rate"]["n"] == 2
    assert len(results["by_epoch"]["poisoned"]["attack_success_rate"]) == 2
    seed1 = json.loads((folder / "seed-1" / "results.json").read_text())
    manifest = json.loads((folder / "seed-1" / "poison_manifest.json").read_text())
    assert manifest["selection"] == "article" and manifest["seed"] == 1 and manifest["n_poisoned"] == 300
    assert seed1["variants"]["poisoned"]["attack_success_rate"] == \
        results["per_seed"][0]["variants"]["poisoned"]["attack_success_rate"]

    # A sweep over the same seeds of the same base, under the same name, trains nothing and agrees.
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"name": "multi", "base": "exp.yaml",
                                                         "grid": {"seed": [1, 2]}}))
    assert main(["sweep", str(tmp_path / "sweep.yaml")]) == 0
    out = capsys.readouterr().err  # a log line: stderr
    assert "2 trial(s) finished earlier with the same setting, not trained again: seed-1, seed-2" in out
    (group,) = json.loads((folder / "summary.json").read_text())["groups"]
    assert group["variants"] == results["variants"]
    assert group["clean_accuracy_difference"] == results["clean_accuracy_difference"]

    # One more seed: only it trains; the first two are reused as they were.
    assert main(["run", str(path), "--seeds", "1-3"]) == 0
    out = capsys.readouterr().err
    assert "not trained again: seed-1, seed-2" in out and "1 seed(s) to train" in out
    assert json.loads((folder / "seed-1" / "results.json").read_text())["run_id"] == seed1["run_id"]
    assert [r["seed"] for r in json.loads((folder / "results.json").read_text())["per_seed"]] == [1, 2, 3]

    # The report: statistics, per-seed table, the per-epoch band, examples.
    assert main(["report", str(path), "--seeds", "1-3", "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert [s for s in SECTIONS if f"<h2>{s}</h2>" in page] == [s for s in SECTIONS if s not in OPTIONAL_SECTIONS]
    assert page.count("data:image/png;base64,") == 3 and "seed 1: " in page  # each seed's run id
    assert "95% t interval" in page and "ASR ≥ 50% at epoch" in page
