"""The HTML report of made-up results (no Ray, no training): the setting and provenance, per-class
tables, the single-seed note, no empty sections, values from storage escaped; plots in percent with
labelled axes, a legend on every panel, every bar's value written on it, readable image labels."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import yaml
from matplotlib.ticker import PercentFormatter

from backdoor_train.config import ExperimentConfig
from backdoor_train.data.mnist import MNIST
from backdoor_train.models.registry import build_model
from backdoor_train.reporting import html as report
from backdoor_train.results import ExperimentResults
from backdoor_train.runs.sweep import load_sweep, summarize
from backdoor_train.storage import LocalStorage
from backdoor_train.storage.runstore import RunStore, SweepStore

from fake_results import experiment_results

ENVIRONMENT = {"backdoor_train": "0.1.0", "torch": "2.14.1", "ray": "2.58.0", "python": "3.11.7",
               "platform": "Linux", "device": "CPU <script>alert(1)</script>"}
FIGURES = {"clean": (0.9904, [0.002, 0.002, 0.0018]), "poisoned": (0.9898, [0.01, 0.3, 0.8251])}
# A detection.json as the first releases wrote it: the detectors' part only.
DETECTION = {"experiment": "exp", "n_poisoned": 2, "methods": {
    m: {"flagged": 3, "true_positives": 2, "precision": 2 / 3, "recall": 1.0, "fpr": 0.01, "chance_precision": 0.02,
        "indices": [1, 2, 3]} for m in ("activation_clustering", "spectral_signatures")}}


def _sections(page: str) -> dict[str, str]:
    """Each section's title and what it shows."""
    return dict(re.findall(r'<section id="[^"]*"><h2>([^<]*)</h2>(.*?)</section>', page, re.S))


def _shows_something(body: str) -> bool:
    """Text or a picture: a section is never only its title."""
    return bool(re.sub(r"<[^>]+>", "", body).strip()) or "<img " in body


@pytest.fixture
def no_examples(monkeypatch):
    # Example images need the dataset's files; test_example_images_are_labelled_readably has them.
    monkeypatch.setattr(report, "_examples", lambda cfg, models: "<p>examples</p>")


@pytest.fixture
def figures(monkeypatch) -> list:
    """Every figure the report draws, kept open for the test to read."""
    kept: list = []

    def keep(fig, alt="plot"):
        kept.append(fig)
        return f'<img alt="{alt}">'

    monkeypatch.setattr(report, "_png", keep)
    return kept


def _experiment(tmp_path, mnist_path, environment=ENVIRONMENT) -> tuple[ExperimentConfig, RunStore]:
    cfg = ExperimentConfig.from_dict({
        "name": "exp", "data": {"root": mnist_path, "test_samples": 2000}, "storage": {"path": str(tmp_path / "runs")},
        "poison": {"rate": 0.005, "trigger": {"kind": "patch", "size": 4}}, "train": {"epochs": 3}})
    results = dataclasses.replace(experiment_results(cfg, FIGURES, run_id="run-<1>"), environment=environment)
    store = RunStore(LocalStorage(str(tmp_path / "runs")), "exp")
    store.write_results(results)
    for v in results.variants:
        store.write_model(v, build_model("article_cnn", MNIST))
    return cfg, store


def test_an_experiment_report_shows_its_setting_per_class_figures_and_a_single_seed_note(
        tmp_path, mnist_path, no_examples):
    cfg, store = _experiment(tmp_path, mnist_path)
    page = report.experiment_report(cfg, store.storage)
    sections = _sections(page)
    # Only what ran: a single experiment has no rate axis, and detect has not run.
    assert list(sections) == [s for s in report.SECTIONS if s not in report.OPTIONAL_SECTIONS]
    assert all(_shows_something(body) for body in sections.values())
    setting = sections["Setting"]
    for name, value in (("trigger", "patch: row 3, col 3, size 4, value 1.0"),
                        ("poison rate", "0.50% of the training images"), ("target class", "8"),
                        ("poisoned source classes", "every class but the target (8)"), ("poison selection", "article"),
                        ("seed", "1"), ("training", "3 epochs, global batch 500, adam lr 0.001"),
                        ("dataset", "MNIST (training images: all, test images: 2000)"), ("model", "article_cnn"),
                        ("run id", "run-&lt;1&gt;"), ("torch", "2.14.1"), ("Ray", "2.58.0"), ("Python", "3.11.7"),
                        ("backdoor_train", "0.1.0"), ("run", "1970-01-01 00:16:30 UTC – 1970-01-01 00:17:00 UTC")):
        assert f"<th>{name}</th><td>{value}" in setting, name
    # Values from storage are text, never markup.
    assert "<script>" not in page and "CPU &lt;script&gt;alert(1)&lt;/script&gt;" in setting
    assert 'class="warn"><b>A single seed.</b>' in page and "(seed 1)" in page
    per_class = sections["Per-class figures"]
    assert "Clean test accuracy per true class" in per_class and "ASR per source class" in per_class
    assert "<tr><td>clean</td>" + "<td>99.04%</td>" * 10 + "</tr>" in per_class
    assert "<tr><td>poisoned</td>" + "<td>82.51%</td>" * 9 + "</tr>" in per_class  # no source class 8
    assert "<td>0.18%</td>" in sections["Summary"]

    # With detect run, the Detection section is there, with each defense's part.
    store.write_detection(DETECTION)
    sections = _sections(report.experiment_report(cfg, store.storage))
    assert list(sections)[-1] == "Detection" and "<td>spectral_signatures</td><td>3</td>" in sections["Detection"]


def test_results_without_versions_read_and_say_not_recorded(tmp_path, mnist_path, no_examples):
    cfg, store = _experiment(tmp_path, mnist_path, environment=None)
    data = json.loads((tmp_path / "runs" / "exp" / "results.json").read_text())
    assert "environment" not in data  # written only when known, as a file of an earlier release lacks it
    assert ExperimentResults.from_stored(data, "r.json").environment is None
    page = report.experiment_report(cfg, store.storage)
    assert f"<th>versions and device</th><td>{report.NOT_RECORDED}</td>" in page
    # Recorded, it round-trips.
    data["environment"] = ENVIRONMENT
    assert ExperimentResults.from_stored(data, "r.json").to_dict()["environment"] == ENVIRONMENT


def test_plots_are_in_percent_with_axis_labels_legends_and_every_bar_labelled(
        tmp_path, mnist_path, no_examples, figures):
    cfg, store = _experiment(tmp_path, mnist_path)
    report.experiment_report(cfg, store.storage)
    curves, bars = figures
    for ax in curves.axes:
        assert ax.get_ylabel() and ax.get_xlabel() == "epoch" and ax.get_legend() is not None, ax.get_title()
    assert [isinstance(ax.yaxis.get_major_formatter(), PercentFormatter) for ax in curves.axes] == [False, True, True]
    (ax,) = bars.axes
    assert isinstance(ax.yaxis.get_major_formatter(), PercentFormatter) and ax.get_ylabel() and ax.get_legend()
    # The control's ASR is a bar too thin to see: its value is written on it.
    assert sorted(t.get_text() for t in ax.texts) == sorted(["99.04%", "98.98%", "0.18%", "82.51%"])


def test_example_images_are_labelled_readably(mnist_root, figures):
    cfg = ExperimentConfig.from_dict({"data": {"root": mnist_root, "train_samples": 100, "test_samples": 100}})
    page = report._examples(cfg, {v: build_model("article_cnn", MNIST) for v in ("clean", "poisoned")})
    (fig,) = figures
    texts = [t for ax in fig.axes for t in (*ax.texts, ax.xaxis.label, ax.yaxis.label) if t.get_text()]
    assert min(t.get_fontsize() for t in texts) >= 11  # points: 15 px at the report's 100 dpi
    labels = [t.get_text() for t in texts]
    assert sum(re.fullmatch(r"poisoned → \d", s) is not None for s in labels) == 16  # 8 images, clean and triggered
    assert "true 7" in labels and "with trigger" in labels and "red where it is the target 8" in page


@pytest.mark.parametrize("grid, rate_section, single_seed", [
    ({"seed": [1]}, False, True),
    ({"poison.rate": [0.0, 0.01], "seed": [1, 2]}, True, False),
])
def test_a_sweep_report_shows_only_what_its_grid_has(tmp_path, mnist_path, no_examples, grid, rate_section,
                                                      single_seed):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"data": {"root": mnist_path},
                                                        "storage": {"path": str(tmp_path / "runs")}}))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"name": "sw", "base": "base.yaml", "grid": grid}))
    sweep = load_sweep(str(tmp_path / "sweep.yaml"))
    store = SweepStore(sweep.storage())
    results = {}
    for trial in sweep.trials:
        results[trial.name] = dataclasses.replace(experiment_results(trial, FIGURES), environment=ENVIRONMENT)
        store.trial(trial.name).write_results(results[trial.name])
        for v in FIGURES:
            store.trial(trial.name).write_model(v, build_model("article_cnn", MNIST))
    page = report.sweep_report(sweep, store, summarize(sweep, results))
    sections = _sections(page)
    assert ("ASR vs poison rate" in sections) is rate_section and "Detection" not in sections
    assert ("A single seed." in page) is single_seed
    assert all(_shows_something(body) for body in sections.values())
    assert f"<th>grid</th><td>{json.dumps(grid).replace(chr(34), '&quot;')}</td>" in sections["Setting"]
    if rate_section:
        assert "<th>poison rate</th><td>varied by the grid: {&quot;poison.rate&quot;: [0.0, 0.01]}" in page
        assert "(mean over 2 seeds)" in sections["Per-class figures"]


def test_a_multi_seed_report_shows_each_seeds_run_and_per_class_means(tmp_path, mnist_path, no_examples):
    from backdoor_train.runs.seeds import aggregate, seed_experiments

    cfg = ExperimentConfig.from_dict({"name": "multi", "seed": 1, "seeds": [1, 2], "data": {"root": mnist_path},
                                      "storage": {"path": str(tmp_path / "runs")}})
    asr = {1: 0.8, 2: 0.9}
    results = {}
    for child in seed_experiments(cfg):
        figures = {"clean": (0.99, [0.002]), "poisoned": (0.98, [asr[child.seed]])}
        results[child.name] = experiment_results(child, figures, run_id=f"run-{child.seed}")
        store = RunStore(LocalStorage(child.storage.path), child.name)
        environment = ENVIRONMENT if child.seed == 1 else None  # seed 2's file predates the record
        store.write_results(dataclasses.replace(results[child.name], environment=environment))
        for v in figures:
            store.write_model(v, build_model("article_cnn", MNIST))
    storage = LocalStorage(str(tmp_path / "runs"))
    RunStore(storage, "multi").write_results(aggregate(cfg, results, {}, started=0.0))
    page = report.experiment_report(cfg, storage)
    sections = _sections(page)
    assert list(sections) == [s for s in report.SECTIONS if s not in report.OPTIONAL_SECTIONS]
    assert "A single seed." not in page
    setting = sections["Setting"]
    assert "<th>run ids</th><td>seed 1: run-1, seed 2: run-2</td>" in setting
    assert "<th>seed</th><td>1, 2</td>" in setting
    assert "<th>torch</th><td>2.14.1</td>" in setting and "1 of 2 runs did not record their versions" in setting
    per_class = sections["Per-class figures"]
    assert "(mean over 2 seeds)" in per_class and "<tr><td>poisoned</td>" + "<td>85.00%</td>" * 9 in per_class
