"""Running the defenses on a finished experiment, and optionally retraining without the flagged samples.

Reads the poisoned model and the poison manifest from the experiment's run store, runs every
defense (defenses/registry.py) as a Ray task, all at once, and writes ``detection.json`` there. With
``retrain``, each named method's flagged samples are removed and a ``filtered-<method>`` model
is trained with the same config on Ray (all at once); their clean accuracy and ASR are added
to the file under ``retrain.<method>``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Sequence

from backdoor_train.config import ExperimentConfig
from backdoor_train.storage.staging import load_splits
from backdoor_train.defenses.registry import DEFENSES, remote_options, run_defense, split_test
from backdoor_train.attack.evaluate import build_eval_sets, full_evaluation
from backdoor_train.runs.experiment import absolute_paths
from backdoor_train.training.fitting import FitSpec, fit_variants
from backdoor_train.attack.poison import build_poisoned, dataset_sha256
from backdoor_train.storage.runlock import run_lock
from backdoor_train.storage.runstore import MANIFEST, RunStore
from backdoor_train.storage import StorageError, open_storage
from backdoor_train.training.worker import restore_model, without

METHODS = ("activation_clustering", "spectral_signatures")


def run_detection(cfg: ExperimentConfig, retrain: Sequence[str] = (),
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    cfg = absolute_paths(cfg)
    storage = open_storage(cfg.storage)
    storage.check()
    with run_lock(storage, cfg.name, uuid.uuid4().hex[:12]):  # it writes into the run's folder
        return _detect_locked(cfg, storage, retrain, log)


def _detect_locked(cfg: ExperimentConfig, storage: Any, retrain: Sequence[str],
                   log: Callable[[str], None]) -> dict[str, Any]:
    store = RunStore(storage, cfg.name)
    try:
        manifest = store.read_manifest()
        model = store.read_model("poisoned", cfg)
    except StorageError as exc:
        if exc.kind != "missing":
            raise
        raise StorageError(f"{exc}: run the experiment with the poisoned variant first", kind="missing") from None

    train, test = load_splits(cfg)
    poisoned, rebuilt = build_poisoned(train, cfg.poison, cfg.seed)
    if rebuilt.sha256_poisoned != manifest.sha256_poisoned:
        raise StorageError(f"{store.uri(MANIFEST)} describes another training set "
                           f"than this config and data produce (sha256 differs)")
    split_test(test, cfg.defense.clean_samples)  # enough test images, before any task starts
    t0 = time.perf_counter()
    done = _run_defenses(cfg, model, manifest.indices)
    found = done["activations"]
    log(f"the defenses took {time.perf_counter() - t0:.1f}s (Ray tasks, at once)")
    for method, r in found.items():
        log(f"{method}: flagged {r['flagged']}, precision {r['precision']:.2%}, recall {r['recall']:.2%}, "
            f"FPR {r['fpr']:.3%} (chance precision {r['chance_precision']:.2%})")
    cleanse, strip = done["neural_cleanse"], done["strip"]
    log(f"neural cleanse: anomaly index {max(cleanse['anomaly_index']):.2f} for class {cleanse['suspect']}, "
        f"flagged classes {cleanse['flagged_classes'] or 'none'}")
    unlearning = cleanse["unlearning"]
    if "after" in unlearning:
        log(f"unlearning class {unlearning['unlearned_class']}'s trigger: ASR "
            f"{unlearning['before']['attack_success_rate']:.2%} -> {unlearning['after']['attack_success_rate']:.2%}, "
            f"clean accuracy {unlearning['before']['clean_accuracy']:.2%} -> "
            f"{unlearning['after']['clean_accuracy']:.2%}")
    log(f"STRIP at FRR {strip['target_frr']:.0%}: FRR {strip['frr']:.2%}, FAR {strip['far']:.2%}")
    report: dict[str, Any] = {"experiment": cfg.name, "n_poisoned": manifest.n_poisoned, "methods": found,
                              "neural_cleanse": cleanse, "strip": strip,
                              "defender_clean_samples": cfg.defense.clean_samples}

    if retrain:
        # One filtered-<method> model per method, trained at once like an experiment's variants.
        eval_sets = build_eval_sets(test, cfg.poison)
        specs, by_variant = [], {}
        for method in retrain:
            exclude = tuple(found[method]["indices"])
            variant = f"filtered-{method.replace('_', '-')}"
            filtered = without(poisoned, exclude)  # what the worker loop rebuilds for this variant
            log(f"retraining without the {len(exclude)} samples {method} flagged ({len(filtered)} remain)")
            specs.append(FitSpec(variant, dataset_sha256(filtered), len(manifest.index_set() - set(exclude)),
                                 exclude))
            by_variant[variant] = method
        report["retrain"] = {}

        def finished(spec: FitSpec, checkpoint: Any, _timing: dict[str, float]) -> None:
            with checkpoint.as_directory() as ckpt_dir:
                retrained, _ = restore_model(ckpt_dir, cfg)
            evaluation = full_evaluation(retrained, eval_sets, cfg.poison.target, cfg.dataset.num_classes)
            report["retrain"][by_variant[spec.variant]] = {
                "variant": spec.variant, "removed": len(spec.exclude), "remaining_poisoned": spec.n_poisoned,
                "clean_accuracy": evaluation["clean_accuracy"],
                "attack_success_rate": evaluation["attack_success_rate"]}
            log(f"{spec.variant}: clean accuracy {evaluation['clean_accuracy']:.2%}, "
                f"ASR {evaluation['attack_success_rate']:.2%}")

        fit_variants(cfg, specs, storage, uuid.uuid4().hex[:12], finished, log)
    report["detection_uri"] = store.write_detection(report)
    return report


def _run_defenses(cfg: ExperimentConfig, model: Any, poisoned_indices: list[int]) -> dict[str, Any]:
    """Every defense of defenses/registry.py as a Ray task on the connected cluster, all at once."""
    import ray

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    task = ray.remote(run_defense).options(**remote_options(cfg))
    refs = {kind: task.remote(kind, cfg.to_dict(), state, poisoned_indices) for kind in DEFENSES}
    try:
        return dict(zip(refs, ray.get(list(refs.values()))))
    except BaseException:
        for ref in refs.values():  # Ctrl-C or one failing: stop the others
            ray.cancel(ref, force=True)
        raise

