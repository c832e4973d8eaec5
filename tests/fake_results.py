"""Made-up result records for unit tests (results.py's types, no training): one experiment's
results with chosen figures, and an epoch history."""

from __future__ import annotations

from typing import Optional

from backdoor_train.config import ExperimentConfig
from backdoor_train.results import EpochRecord, ExperimentResults, VariantResult


def history(asr: list[float], acc: float) -> tuple[EpochRecord, ...]:
    """One epoch per ASR value, each at clean test accuracy ``acc``."""
    return tuple(EpochRecord(epoch=e, train_loss=0.5 / e, test_accuracy=acc, attack_success_rate=a, epoch_seconds=2.0,
                             worker_samples_per_second=1000.0, samples_per_second=2000.0, world_size=2,
                             eval_seconds=0.5, ended_at=1000.0 + e) for e, a in enumerate(asr, 1))


def variant(clean_acc: float, asr: list[float]) -> VariantResult:
    """A variant whose ASR per epoch is ``asr`` (the last is its final figure)."""
    return VariantResult(clean_accuracy=clean_acc, attack_success_rate=asr[-1], triggered_true_label_accuracy=0.5,
                         per_class_accuracy={str(c): clean_acc for c in range(10)},
                         attack_success_rate_per_source_class={str(c): asr[-1] for c in range(10) if c != 8},
                         n_test=2000, n_triggered=1800, train_sha256="ab" * 32, fit_seconds=12.5,
                         fit_started_at=1000.0, fit_finished_at=1012.5, checkpoint="/runs/x/checkpoint_epoch_0003",
                         history=history(asr, clean_acc))


def experiment_results(cfg: ExperimentConfig, variants: dict[str, tuple[float, list[float]]], run_id: str = "r1",
                       kept: Optional[dict[str, str]] = None) -> ExperimentResults:
    """Results of ``cfg`` with, per variant, (clean accuracy, ASR per epoch)."""
    return ExperimentResults(experiment=cfg.name, run_id=run_id, started_at=990.0, finished_at=1020.0,
                             poison_seconds=0.01, n_poisoned=300,
                             poison_manifest=f"/runs/{cfg.name}/poison_manifest.json",
                             variants={v: variant(*figures) for v, figures in variants.items()},
                             kept_from_earlier_runs=kept or {}, config=cfg)
