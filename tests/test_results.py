"""Typed result records (results.py): today's files round-trip key for key, files of earlier
releases are upgraded and still report, a corrupt file is one error naming the file and the key."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from backdoor_train.cli import EXIT_BAD_INPUT, main
from backdoor_train.config import ExperimentConfig
from backdoor_train.data.mnist import MNIST
from backdoor_train.models.registry import build_model
from backdoor_train.reporting.html import NOT_RECORDED, OPTIONAL_SECTIONS, SECTIONS
from backdoor_train.reporting.summary import format_results
from backdoor_train.results import (ExperimentResults, MultiSeedResults, ResultsError, SweepSummary,
                                    results_from_stored)
from backdoor_train.runs.seeds import aggregate, format_seed_results, seed_experiments
from backdoor_train.runs.stats import fmt_pct
from backdoor_train.storage import LocalStorage
from backdoor_train.storage.runstore import RunStore, SweepStore

from conftest import REPO_ROOT, small_config
from fake_results import experiment_results

WHERE = "/runs/exp/results.json"


def _text(data: dict) -> str:
    return json.dumps(data, indent=1, sort_keys=True)  # as the run store writes it


def _todays_file(cfg: ExperimentConfig) -> dict:
    """An experiment's results.json as the drivers wrote it before the records (dicts spelled out)."""
    def epoch(e: int, asr: float) -> dict:
        return {"epoch": e, "train_loss": 0.3 / e, "test_accuracy": 0.97, "attack_success_rate": asr,
                "epoch_seconds": 3.5, "eval_seconds": 0.25, "worker_samples_per_second": 1700.0,
                "samples_per_second": 3400.0, "world_size": 2, "ended_at": 1700000000.5 + e}

    def variant(asr: list[float]) -> dict:
        return {"clean_accuracy": 0.98, "attack_success_rate": asr[-1], "triggered_true_label_accuracy": 0.1,
                "per_class_accuracy": {str(c): 0.9 + c / 100 for c in range(10)},
                "attack_success_rate_per_source_class": {str(c): asr[-1] for c in range(10) if c != 8},
                "n_test": 2000, "n_triggered": 1805, "train_sha256": "0f" * 32, "fit_seconds": 40.25,
                "fit_started_at": 1700000000.0, "fit_finished_at": 1700000040.25,
                "checkpoint": "/runs/exp/poisoned/checkpoint_epoch_0002",
                "history": [epoch(e, a) for e, a in enumerate(asr, 1)]}

    return {"experiment": cfg.name, "run_id": "0123456789ab", "started_at": 1699999990.0,
            "finished_at": 1700000050.0, "poison_seconds": 0.004, "n_poisoned": 300,
            "poison_manifest": "/runs/exp/poison_manifest.json",
            "variants": {"clean": variant([0.01, 0.02]), "poisoned": variant([float("nan"), 0.9])},
            "kept_from_earlier_runs": {"clean": "aaaaaaaaaaaa"}, "config": cfg.to_dict()}


def _release_1_file() -> dict:
    """results.json as the first release wrote it (git show 7cf9d11:backdoor_train/experiment.py,
    train.py, evaluate.py, config.py): a variant timed by fit_seconds alone, epochs without
    eval_seconds, ended_at or world_size, no kept_from_earlier_runs, and that release's config
    (no data.name, poison.selection, scaling.gpus_per_worker, storage.retry_seconds, defense;
    one trigger config carrying every kind's fields)."""
    config = {"name": "old", "seed": 1, "variants": ["clean", "poisoned"],
              "data": {"root": "../shared/datasets/mnist", "download": False, "train_samples": None,
                       "test_samples": None},
              "model": {"arch": "article_cnn"},
              "train": {"epochs": 2, "batch_size": 500, "lr": 0.001, "optimizer": "adam", "checkpoint_every": 1,
                        "max_failures": 0},
              "poison": {"rate": 0.01, "target": 8, "source_classes": [],
                         "trigger": {"kind": "pixel", "row": 3, "col": 3, "value": 1.0, "size": 3, "alpha": 0.1,
                                     "pattern_seed": 0}},
              "scaling": {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 1},
              "storage": {"path": "./runs"}, "metrics": {"enabled": False, "port": 9100, "pushgateway": None}}

    def variant(acc: float, asr: list[float]) -> dict:
        return {"clean_accuracy": acc, "attack_success_rate": asr[-1], "triggered_true_label_accuracy": 1 - asr[-1],
                "per_class_accuracy": {str(c): acc for c in range(10)},
                "attack_success_rate_per_source_class": {str(c): asr[-1] for c in range(10) if c != 8},
                "n_test": 10000, "n_triggered": 9026, "train_sha256": "1e" * 32, "fit_seconds": 95.5,
                "checkpoint": "./runs/old/poisoned/checkpoint_000001",
                "history": [{"epoch": e, "train_loss": 0.2 / e, "test_accuracy": acc, "attack_success_rate": a,
                             "epoch_seconds": 40.0, "worker_samples_per_second": 750.0, "samples_per_second": 1500.0}
                            for e, a in enumerate(asr, 1)]}

    return {"experiment": "old", "run_id": "5f0c2a9e81d4", "started_at": 1690000000.0, "finished_at": 1690000200.0,
            "poison_seconds": 0.02, "n_poisoned": 600, "poison_manifest": "./runs/old/poison_manifest.json",
            "variants": {"clean": variant(0.9891, [0.001, 0.0017]), "poisoned": variant(0.9884, [0.02, 0.8895])},
            "config": config}


def test_todays_file_reads_and_writes_back_key_for_key(tmp_path, mnist_path):
    cfg = small_config(mnist_path, str(tmp_path / "runs"), name="exp")
    data = _todays_file(cfg)
    results = ExperimentResults.from_stored(json.loads(_text(data)), WHERE)
    assert results.schema_version == ExperimentResults.SCHEMA_VERSION
    assert results.variants["poisoned"].history[1].attack_success_rate == 0.9 and results.config == cfg
    assert math.isnan(results.variants["poisoned"].history[0].attack_success_rate)
    assert _text(results.to_dict()) == _text(data)  # same keys, same values: readers of the file see no change
    # Through the run store: the record's writer and reader, the URI it came from.
    store = RunStore(LocalStorage(str(tmp_path / "runs")), "exp")
    uri = store.write_results(results)
    assert (tmp_path / "runs" / "exp" / "results.json").read_text() == _text(data)
    again = store.read_results()
    assert isinstance(again, ExperimentResults) and again.results_uri == uri and _text(again.to_dict()) == _text(data)


def test_a_file_of_the_first_release_is_upgraded_and_still_reports(tmp_path, mnist_path, capsys, monkeypatch):
    old = _release_1_file()
    results = ExperimentResults.from_stored(old, WHERE)
    assert results.schema_version == 1 and results.kept_from_earlier_runs == {}
    # Its config through today's schema: that release drew its poison with numpy.
    assert results.config.poison.selection == "numpy" and results.config.data.name == "mnist"
    poisoned = results.variants["poisoned"]
    assert poisoned.fit_started_at is None and poisoned.history[0].eval_seconds is None
    assert poisoned.history[1].attack_success_rate == 0.8895
    # Written back in today's layout: unknown figures left out, not invented.
    written = results.to_dict()
    assert written["kept_from_earlier_runs"] == {} and "fit_started_at" not in written["variants"]["poisoned"]
    assert "ended_at" not in written["variants"]["poisoned"]["history"][0]
    assert _text(ExperimentResults.from_stored(written, WHERE).to_dict()) == _text(written)
    # A layout-2 file (timed fits, no kept variants) is told apart by its keys.
    timed = json.loads(json.dumps(old))
    for v in timed["variants"].values():
        v.update(fit_started_at=1.0, fit_finished_at=2.0)
    assert ExperimentResults.from_stored(timed, WHERE).schema_version == 2

    assert "poisoned       98.84%           88.95%                    11.05%    95.5s" in format_results(results)
    # The HTML report of that file, through the CLI (example images need the data: left out here).
    runs = tmp_path / "runs"
    (runs / "old").mkdir(parents=True)
    (runs / "old" / "results.json").write_text(_text(old))
    store = RunStore(LocalStorage(str(runs)), "old")
    for v in ("clean", "poisoned"):
        store.write_model(v, build_model("article_cnn", MNIST))
    monkeypatch.setattr("backdoor_train.reporting.html._examples", lambda cfg, models: "<p>examples</p>")
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"name": "old", "data": {"root": mnist_path}, "storage": {"path": str(runs)}}))
    assert main(["report", str(path), "--out", str(tmp_path / "old.html")]) == 0, capsys.readouterr().err
    page = (tmp_path / "old.html").read_text()
    # What did not run is left out: a single experiment has no rate axis, detect has not run.
    assert [s for s in SECTIONS if f"<h2>{s}</h2>" in page] == [s for s in SECTIONS if s not in OPTIONAL_SECTIONS]
    assert "88.95%" in page and "98.84%" in page and NOT_RECORDED in page  # that release recorded no versions
    assert page.count("data:image/png;base64,") == 2  # training curves, accuracy vs ASR


def test_multi_seed_results_round_trip_with_and_without_finished_seeds(tmp_path, mnist_path):
    cfg = small_config(mnist_path, str(tmp_path / "runs"), name="multi", seeds=[1, 2])
    figures = {1: [0.1, 0.6], 2: [0.0, 0.4]}
    seeds = {c.name: experiment_results(c, {"clean": (0.99, [0.01, 0.01]), "poisoned": (0.98, figures[c.seed])})
             for c in seed_experiments(cfg)}
    for done in (seeds, {}):
        out = aggregate(cfg, done, {} if done else {"seed-1": "boom", "seed-2": "boom"}, started=0.0)
        data = json.loads(_text(out.to_dict()))
        assert ("variants" in data) == bool(done) and ("by_epoch" in data) == bool(done)
        again = results_from_stored(data, WHERE)
        assert isinstance(again, MultiSeedResults) and _text(again.to_dict()) == _text(data)
        assert "mean ± std [95% t interval] over seeds" in format_seed_results(again)
    assert again.per_seed == () and again.statistics is None and again.failures == {"seed-1": "boom", "seed-2": "boom"}
    with pytest.raises(ResultsError, match="holds a multi-seed experiment's results, not one experiment's"):
        ExperimentResults.from_stored(data, WHERE)


def _release_sweep_summary() -> dict:
    """summary.json as sweeps wrote it before the statistics over seeds (git show 725a5f1:
    backdoor_train/sweep.py): population std, no interval; trial rows without results_uri or
    asr_reached_epoch."""
    def stats(values: list[float]) -> dict:
        mean = sum(values) / len(values)
        return {"mean": mean, "std": math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)),
                "min": min(values), "max": max(values), "n": len(values)}

    asr = {0.01: [0.80, 0.90], 0.0: [0.001]}
    trials = [{"name": f"rate-{rate}_seed-{i + 1}", "seed": i + 1, "point": {"poison.rate": rate},
               "n_poisoned": int(rate * 60000),
               "variants": {"poisoned": {"clean_accuracy": 0.98, "attack_success_rate": a}}}
              for rate, values in asr.items() for i, a in enumerate(values)]
    groups = [{"point": {"poison.rate": rate}, "n_poisoned": int(rate * 60000),
               "trials": [t["name"] for t in trials if t["point"]["poison.rate"] == rate],
               "variants": {"poisoned": {"clean_accuracy": stats([0.98] * len(values)),
                                         "attack_success_rate": stats(values)}}}
              for rate, values in asr.items()]
    return {"sweep": "rate-sweep", "grid": {"poison.rate": [0.01, 0.0], "seed": [1, 2]}, "groups": groups,
            "trials": trials, "failures": {}}


def test_a_sweep_summary_of_an_early_release_reads_in_todays_terms(tmp_path, capsys):
    summary = SweepSummary.from_stored(_release_sweep_summary(), "/runs/rate-sweep/summary.json")
    assert summary.schema_version == 1
    two, one = (g.variants["poisoned"].attack_success_rate for g in summary.groups)
    assert two.std == pytest.approx(math.sqrt(0.005)) and two.ci95 is None  # the sample std of 0.8 and 0.9
    assert one.std is None and one.n == 1  # one seed has no spread
    assert fmt_pct(two) == "85.00% ± 7.07%"
    assert {t.results_uri for t in summary.trials} == {None}
    assert {t.variants["poisoned"].asr_reached_epoch for t in summary.trials} == {None}
    # Today's summary round-trips; scripts/results_table.py reads either.
    todays = json.loads(_text(summary.to_dict()))
    assert SweepSummary.from_stored(todays, "x").schema_version == SweepSummary.SCHEMA_VERSION
    assert _text(SweepSummary.from_stored(todays, "x").to_dict()) == _text(todays)
    import runpy

    (tmp_path / "summary.json").write_text(_text(_release_sweep_summary()))
    table = runpy.run_path(f"{REPO_ROOT}/scripts/results_table.py")
    table["main"](str(tmp_path / "summary.json"))
    assert "| 0.01 | 600 | 2 | 98.00% ± 0.00% | 85.00% ± 7.07% | s1: 80.00%, s2: 90.00% |" in capsys.readouterr().out
    store = SweepStore(LocalStorage(str(tmp_path)))
    assert store.read_summary().summary_uri.endswith("summary.json")


@pytest.mark.parametrize("change, message", [
    (lambda d: d["variants"]["poisoned"]["history"][1].pop("test_accuracy"),
     "key variants.poisoned.history[1].test_accuracy is missing"),
    (lambda d: d["variants"]["clean"].update(n_test="2000"),
     "key variants.clean.n_test must be an integer (got '2000')"),
    (lambda d: d["variants"].update(clean=[1, 2]), "key variants.clean must be a JSON object (got [1, 2])"),
    (lambda d: d.pop("run_id"), "key run_id is missing"),
    (lambda d: d["config"]["train"].update(epochs=0), "its config is no valid setting today (train.epochs must be > 0"),
])
def test_a_corrupt_file_is_one_error_naming_the_file_and_the_key(tmp_path, mnist_path, change, message):
    data = json.loads(_text(_todays_file(small_config(mnist_path, str(tmp_path / "runs"), name="exp"))))
    change(data)
    with pytest.raises(ResultsError) as caught:
        ExperimentResults.from_stored(data, WHERE)
    assert str(caught.value).startswith(WHERE) and message in str(caught.value) and "\n" not in str(caught.value)


def test_a_corrupt_results_file_is_refused_by_report_in_one_line_naming_the_key(tmp_path, mnist_path, capsys):
    runs = tmp_path / "runs"
    data = _todays_file(small_config(mnist_path, str(runs), name="exp"))
    del data["variants"]["poisoned"]["per_class_accuracy"]
    (runs / "exp").mkdir(parents=True)
    (runs / "exp" / "results.json").write_text(_text(data))
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "exp", "data": {"root": mnist_path}, "storage": {"path": str(runs)}}))
    assert main(["report", str(path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{runs}/exp/results.json is corrupt" in err and "variants.poisoned.per_class_accuracy is missing" in err
    assert err.count("\n") == 1, err
