"""The defense interface and registry (defenses/base.py, defenses/registry.py): a defense
registered with one line gets its knobs into the config, is run by `detect`, logged, kept in
detection.json, shown in the report and offered to `--retrain`, with no other module naming it.
Pure unit tests: tiny MNIST-format files written here, every defense run in this process
(``run_defense``, the body of their Ray task), no Ray."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from backdoor_train.checks import check
from backdoor_train.config import ConfigError, ExperimentConfig
from backdoor_train.defenses import registry
from backdoor_train.runs import detection as runner
from backdoor_train.defenses.base import Detection, PoisonDetector, Text


@dataclass(frozen=True)
class _ProbeKnobs:
    probe_share: float = 0.5

    def __post_init__(self) -> None:
        check(0 < self.probe_share <= 1, f"defense.probe_share must be in (0, 1] (got {self.probe_share})")


class _Probe(PoisonDetector):
    """Flags the first ``probe_share`` of the training set: a detector of nothing, all interface."""

    name = "probe"
    title = "Probe detector"
    Knobs = _ProbeKnobs
    methods = ("probe_first",)

    def detect_poison(self, ctx: Any) -> dict[str, Detection]:
        n = int(len(ctx.poisoned_train) * ctx.knobs.probe_share)
        return {"probe_first": Detection(np.arange(n), "probe_per_label", {0: 1.0})}

    def log_lines(self, result: dict[str, Any]) -> list[str]:
        return super().log_lines(result) + ["probe: done"]

    def report_section(self, result: dict[str, Any], cfg: Any, detection: dict[str, Any]) -> list[Any]:
        return super().report_section(result, cfg, detection) + [Text("The probe flagged the first samples.")]


@pytest.fixture
def probe():
    defense = registry.register(_Probe())  # the one line a new defense adds to defenses/registry.py
    yield defense
    registry.unregister(defense.name)


def test_the_registry_holds_the_defenses_in_order():
    assert [d.name for d in registry.defenses()] == ["activations", "neural_cleanse", "strip"]
    assert list(registry.retrain_methods()) == ["activation_clustering", "spectral_signatures"]
    assert sorted(registry.knob_owners()) == ["cleanse_steps", "strip_blends", "strip_frr", "unlearn_epochs"]


def test_a_defense_must_bring_its_own_names():
    for clash in ("name", "record_key", "knob", "method"):
        class Clash(_Probe):
            name = "strip" if clash == "name" else "clash"
            record_key = "methods" if clash == "record_key" else None
            methods = ("spectral_signatures",) if clash == "method" else ("clash_first",)

        if clash == "knob":
            @dataclass(frozen=True)
            class Knobs:
                strip_frr: float = 0.1

            Clash.Knobs = Knobs
        with pytest.raises(ValueError, match="is taken"):
            registry.register(Clash())
    assert [d.name for d in registry.defenses()] == ["activations", "neural_cleanse", "strip"]

    class Mutable(_Probe):
        name = "mutable"

        @dataclass
        class Knobs:
            x: int = 1

    with pytest.raises(TypeError, match="frozen dataclass"):
        registry.register(Mutable())


def test_a_registered_defense_brings_its_knobs_into_the_config(probe):
    cfg = ExperimentConfig.from_dict({"defense": {"probe_share": 0.25, "strip_frr": 0.05}})
    assert cfg.defense.of(probe) == _ProbeKnobs(0.25) and cfg.defense.probe_share == 0.25
    assert cfg.defense.strip_frr == 0.05 and cfg.defense.cleanse_steps == 300  # the others' untouched
    flat = cfg.to_dict()["defense"]
    assert flat == {"clean_samples": 2000, "cleanse_steps": 300, "unlearn_epochs": 1, "strip_blends": 64,
                    "strip_frr": 0.05, "probe_share": 0.25}
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=re.escape("defense.probe_share must be in (0, 1] (got 2.0)")):
        ExperimentConfig.from_dict({"defense": {"probe_share": 2}})
    with pytest.raises(ConfigError, match=re.escape("defense.probe_share must be a number (got 'x')")):
        ExperimentConfig.from_dict({"defense": {"probe_share": "x"}})
    with pytest.raises(ConfigError, match=r"unknown key defense\.probe \(allowed at defense: .*'probe_share'"):
        ExperimentConfig.from_dict({"defense": {"probe": 1}})


def test_an_unregistered_defense_takes_its_knobs_away(probe):
    registry.unregister(probe.name)
    try:
        with pytest.raises(ConfigError, match="unknown key defense.probe_share"):
            ExperimentConfig.from_dict({"defense": {"probe_share": 0.5}})
    finally:
        registry.register(probe)


def _idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape) + \
        array.astype(np.uint8).tobytes()


def _tiny_mnist(root, n_train: int = 300, n_test: int = 120) -> None:
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(rng.integers(0, 256, (n, 28, 28))))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(np.arange(n) % 10))


def test_a_registered_defense_is_run_logged_recorded_reported_and_retrainable(probe, tmp_path, monkeypatch):
    from backdoor_train.attack.poison import build_poisoned
    from backdoor_train.cli import build_parser
    from backdoor_train.models.registry import build_model
    from backdoor_train.reporting.html import _detection
    from backdoor_train.storage import open_storage
    from backdoor_train.storage.runstore import RunStore
    from backdoor_train.storage.staging import load_splits

    _tiny_mnist(tmp_path / "data")
    cfg = ExperimentConfig.from_dict({
        "name": "tiny", "data": {"root": str(tmp_path / "data")}, "storage": {"path": str(tmp_path / "runs")},
        "poison": {"rate": 0.05}, "scaling": {"num_workers": 1},
        # Seconds: every defense runs for real, on an untrained model.
        "defense": {"clean_samples": 60, "cleanse_steps": 2, "strip_blends": 4, "probe_share": 0.1}})
    # A finished run as `run` leaves it: the poison manifest and the poisoned model.
    store = RunStore(open_storage(cfg.storage), cfg.name)
    _, manifest = build_poisoned(load_splits(cfg)[0], cfg.poison, cfg.seed)
    store.write_manifest(manifest)
    torch.manual_seed(0)
    store.write_model("poisoned", build_model(cfg.model.arch, cfg.dataset))

    def in_process(cfg: ExperimentConfig, model: Any, indices: list[int], ran: Any, log: Any) -> dict[str, Any]:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return {d.name: runner.run_defense(d, cfg.to_dict(), state, indices) for d in ran}

    retrained = []
    monkeypatch.setattr(runner, "_run_defenses", in_process)
    monkeypatch.setattr(runner, "fit_variants", lambda cfg, specs, *args: retrained.extend(specs))
    checked = []  # --retrain trains: the cluster is checked (Ray's, stubbed) before any defense runs
    monkeypatch.setattr("backdoor_train.runs.locked.check_cluster", lambda cfg: checked.append(cfg.name))
    lines: list[str] = []
    report = runner.run_detection(cfg, retrain=["probe_first"], log=lines.append)
    assert checked == ["tiny"]

    detection = json.loads((tmp_path / "runs" / "tiny" / "detection.json").read_text())
    assert set(detection) == {"experiment", "n_poisoned", "methods", "neural_cleanse", "strip", "probe",
                              "defender_clean_samples", "retrain"}
    probed = detection["probe"]["probe_first"]
    assert probed["indices"] == list(range(30)) and probed["flagged"] == 30 and probed["probe_per_label"] == {"0": 1.0}
    assert probed["true_positives"] == len(set(range(30)) & manifest.index_set())
    assert report["detection_uri"].endswith("detection.json")
    # Logged after the registered ones, in registry order.
    assert lines.index("probe: done") > max(i for i, line in enumerate(lines) if line.startswith("STRIP at FRR"))
    assert "probe_first: flagged 30, precision" in "\n".join(lines)
    # --retrain: its flagged samples left out of a filtered model (fit_variants is Ray Train's, stubbed).
    (spec,) = retrained
    assert spec.variant == "filtered-probe-first" and spec.exclude == tuple(range(30))
    assert "retraining without the 30 samples probe_first flagged (270 remain)" in lines
    # Reported: its section under its title, after the registered ones'.
    page = _detection(detection, cfg, "detection.json")
    assert page.index("<h3>Probe detector</h3>") > page.index("<h3>STRIP</h3>") > page.index("<h3>Neural Cleanse</h3>")
    assert "<td>probe_first</td><td>30</td>" in page and "The probe flagged the first samples." in page
    # And offered on the command line.
    assert build_parser().parse_args(["detect", "x.yaml", "--retrain", "probe_first"]).retrain == ["probe_first"]


def test_a_report_of_an_older_detection_file_shows_what_it_holds():
    """detection.json of a release before the inference-time defenses: the detectors' part only."""
    from backdoor_train.reporting.html import _detection

    methods = {m: {"flagged": 3, "true_positives": 2, "precision": 2 / 3, "recall": 1.0, "fpr": 0.01,
                   "chance_precision": 0.02, "indices": [1, 2, 3]}
               for m in ("activation_clustering", "spectral_signatures")}
    page = _detection({"experiment": "old", "n_poisoned": 2, "methods": methods}, ExperimentConfig(), "d.json")
    assert "<td>spectral_signatures</td><td>3</td><td>2</td><td>66.67%</td>" in page
    assert "Neural Cleanse" not in page and "data:image/png" not in page  # no per-label figures in that file


@pytest.mark.parametrize("change", [
    lambda d: d["methods"]["spectral_signatures"].pop("precision"),
    lambda d: d.__setitem__("methods", [1, 2]),
    lambda d: d.__setitem__("retrain", {"spectral_signatures": {"removed": 3}}),
])
def test_a_detection_file_the_report_cannot_read_is_one_error_naming_it(change):
    """detection.json is each defense's own dict: a part missing or of another shape is a ResultsError
    naming the file and the part (the CLI's one line, exit 2), not a KeyError."""
    from backdoor_train.reporting.html import _detection
    from backdoor_train.results import ResultsError

    detection = {"experiment": "old", "n_poisoned": 2,
                 "methods": {m: {"flagged": 3, "true_positives": 2, "precision": 2 / 3, "recall": 1.0, "fpr": 0.01,
                                 "chance_precision": 0.02, "indices": [1, 2, 3]}
                             for m in ("activation_clustering", "spectral_signatures")}}
    change(detection)
    with pytest.raises(ResultsError, match=r"runs/exp/detection.json is corrupt .*its (methods|retrain\.\w+) part"):
        _detection(detection, ExperimentConfig(), "runs/exp/detection.json")
