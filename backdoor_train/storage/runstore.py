"""Every artifact of a run, the key it lives under, and its typed read and write: the one
place a key is spelled. Layout under ``storage.path`` (a local directory or s3://bucket/prefix)::

    <name>/config.json                    the setting reruns are checked against
    <name>/poison_manifest.json           indices, counts, seed, sha256 of the poisoned set
    <name>/results.json                   figures of every variant plus the config (results.py's records)
    <name>/detection.json                 `backdoor-train detect`'s findings
    <name>/report.html                    `backdoor-train report --save-to-run`
    <name>/run.lock                       held while a run writes (storage/runlock.py)
    <name>/<variant>/                     Ray Train's run folder: checkpoint_epoch_NNNN/, snapshot
    <name>/<variant>/model.pt             final weights (state_dict) of the variant
    <name>/seed-<s>/...                   a multi-seed experiment: one experiment per seed

A sweep's folder (``<storage.path>/<sweep name>``) holds its trials as experiments, plus
``summary.json`` and ``report.html`` (``SweepStore``).
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any, Optional, Union

import torch

from backdoor_train.config import ExperimentConfig
from backdoor_train.results import ExperimentResults, MultiSeedResults, SweepSummary, results_from_stored
from backdoor_train.attack.poison import PoisonManifest
from backdoor_train.storage import Storage, StorageError

CONFIG = "config.json"
MANIFEST = "poison_manifest.json"
RESULTS = "results.json"
DETECTION = "detection.json"
REPORT = "report.html"
LOCK = "run.lock"
MODEL = "model.pt"
SUMMARY = "summary.json"


def child_path(storage_path: str, name: str) -> str:
    """The ``storage.path`` of experiments kept inside experiment or sweep ``name`` (seeds, trials)."""
    return storage_path.rstrip("/") + "/" + name


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1, sort_keys=True)


class RunStore:
    """The artifacts of experiment ``name`` in ``storage``."""

    def __init__(self, storage: Storage, name: str) -> None:
        self.storage, self.name = storage, name

    def key(self, *parts: str) -> str:
        return "/".join((self.name, *parts))

    def uri(self, *parts: str) -> str:
        return self.storage.key_uri(self.key(*parts))

    # --- the setting --------------------------------------------------------------------
    def has_config(self) -> bool:
        return self.storage.exists(self.key(CONFIG))

    def read_config(self) -> dict[str, Any]:
        """The recorded setting as stored (``ExperimentConfig.from_stored`` rebuilds it)."""
        return self.storage.read_json(self.key(CONFIG))

    def write_config(self, cfg: ExperimentConfig) -> None:
        self.storage.write_text(self.key(CONFIG), _json(cfg.to_dict()))

    # --- the poisoned set -----------------------------------------------------------------
    def read_manifest(self) -> PoisonManifest:
        data = self.storage.read_json(self.key(MANIFEST))
        try:
            return PoisonManifest(**data)
        except TypeError as exc:  # a JSON object, but not a manifest
            raise StorageError(f"{self.uri(MANIFEST)} is corrupt ({exc})") from None

    def write_manifest(self, manifest: PoisonManifest) -> str:
        self.storage.write_text(self.key(MANIFEST), manifest.to_json())
        return self.uri(MANIFEST)

    # --- results, detection, report -----------------------------------------------------------
    def has_results(self) -> bool:
        return self.storage.exists(self.key(RESULTS))

    def read_results(self) -> Union[ExperimentResults, MultiSeedResults]:
        """``results.json`` of either kind, whichever release wrote it, in today's schema
        (results.py); a ``ResultsError`` naming the file and the key when it is corrupt."""
        data, uri = self.storage.read_json(self.key(RESULTS)), self.uri(RESULTS)
        return dataclasses.replace(results_from_stored(data, uri), results_uri=uri)

    def read_experiment_results(self) -> ExperimentResults:
        """``results.json`` of one experiment (a multi-seed experiment's is a ``ResultsError``)."""
        data, uri = self.storage.read_json(self.key(RESULTS)), self.uri(RESULTS)
        return dataclasses.replace(ExperimentResults.from_stored(data, uri), results_uri=uri)

    def write_results(self, results: Union[ExperimentResults, MultiSeedResults]) -> str:
        self.storage.write_text(self.key(RESULTS), _json(results.to_dict()))
        return self.uri(RESULTS)

    def read_detection(self) -> Optional[dict[str, Any]]:
        """``detection.json``, or None when detection has not run."""
        key = self.key(DETECTION)
        return self.storage.read_json(key) if self.storage.exists(key) else None

    def write_detection(self, detection: dict[str, Any]) -> str:
        self.storage.write_text(self.key(DETECTION), _json(detection))
        return self.uri(DETECTION)

    def write_report(self, page: str) -> str:
        self.storage.write_text(self.key(REPORT), page)
        return self.uri(REPORT)

    # --- models and Ray Train's run folders -------------------------------------------------
    def variant_prefix(self, variant: str) -> str:
        """The key of ``variant``'s Ray Train run folder (its checkpoints and run snapshot)."""
        return self.key(variant)

    def lock_key(self) -> str:
        return self.key(LOCK)

    def write_model(self, variant: str, model: torch.nn.Module) -> None:
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        self.storage.write_bytes(self.key(variant, MODEL), buf.getvalue())

    def read_model(self, variant: str, cfg: ExperimentConfig) -> torch.nn.Module:
        """``variant``'s final model, built as ``cfg`` says (architecture, dataset)."""
        from backdoor_train.models.registry import build_model

        from backdoor_train.storage.safeload import CorruptCheckpointError, UnsafeCheckpointError, safe_torch_load

        data = self.storage.read_bytes(self.key(variant, MODEL))
        model = build_model(cfg.model.arch, cfg.dataset)
        try:
            state = safe_torch_load(data, self.uri(variant, MODEL))  # a planted pickle cannot run
        except UnsafeCheckpointError:
            raise
        except CorruptCheckpointError:
            state = None
        try:
            if not isinstance(state, dict):
                raise TypeError("not a state dict")
            model.load_state_dict(state)
        except Exception as exc:  # truncated file, another architecture: the stored model is unusable
            raise StorageError(f"{self.uri(variant, MODEL)} is corrupt or of another model.arch "
                               f"({type(exc).__name__}): rerun the experiment") from None
        return model


class SweepStore:
    """The sweep's own artifacts in ``storage`` (rooted at the sweep's folder); its trials are
    experiments: ``SweepStore.trial(name)``."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def trial(self, name: str) -> RunStore:
        return RunStore(self.storage, name)

    def read_summary(self) -> SweepSummary:
        """``summary.json``, whichever release wrote it, in today's schema (results.py)."""
        summary = SweepSummary.from_stored(self.storage.read_json(SUMMARY), self.storage.key_uri(SUMMARY))
        return dataclasses.replace(summary, summary_uri=self.storage.key_uri(SUMMARY))

    def write_summary(self, summary: SweepSummary) -> str:
        self.storage.write_text(SUMMARY, _json(summary.to_dict()))
        return self.storage.key_uri(SUMMARY)

    def write_report(self, page: str) -> str:
        self.storage.write_text(REPORT, page)
        return self.storage.key_uri(REPORT)
