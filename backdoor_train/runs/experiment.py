"""The driver: poison once, train the variants (at once, a TorchTrainer each), evaluate, write
results through the run store (storage/runstore.py, which also shows the layout)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from backdoor_train.config import VARIANTS, ConfigError, ExperimentConfig
from backdoor_train.results import EpochRecord, ExperimentResults, ResultsError, VariantResult
from backdoor_train.storage.staging import load_splits
from backdoor_train.attack.evaluate import EvalSets, build_eval_sets, full_evaluation
from backdoor_train.training.fitting import FitSpec, fit_variants
from backdoor_train.training.metrics import RunMetrics, make_run_metrics
from backdoor_train.attack.poison import PoisonManifest, build_poisoned
from backdoor_train.training.resume import ResumePlan, plan_resume
from backdoor_train.runs.locked import locked_run
from backdoor_train.storage.runstore import CONFIG, RunStore
from backdoor_train.storage import Storage, StorageError
from backdoor_train.training.worker import restore_model

# Keys that may differ when an experiment is rerun under the same name: they change how or
# where it runs, or how long, not what a resumed checkpoint was trained on.
RESUMABLE_KEYS = ("scaling", "storage", "metrics", "defense", "variants", "train.epochs", "train.max_failures",
                  "train.checkpoint_every", "data.wait_seconds")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def setting_diffs(old_cfg: dict[str, Any], cfg: ExperimentConfig) -> list[str]:
    """The settings in which ``cfg`` trains something else than the run recorded as ``old_cfg``.
    The record is rebuilt through today's schema first, so a field added since (with its
    default, or the value such a run used) is no difference. A ``ConfigError`` when the record
    is not a valid setting today."""
    old = _flatten(ExperimentConfig.from_stored(old_cfg).to_dict())
    new = _flatten(cfg.to_dict())
    ignored: tuple[str, ...] = RESUMABLE_KEYS
    if old["seeds"] and new["seeds"]:
        # A multi-seed experiment may gain or lose seeds: each seed is its own run below it.
        ignored += ("seed", "seeds")
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not k.startswith(ignored)]


def refuse_other_setting(cfg: ExperimentConfig, storage: Storage) -> None:
    """A ``ConfigError`` naming the differing keys when ``cfg.name`` holds a run of another setting."""
    store = RunStore(storage, cfg.name)
    if store.has_config():
        try:
            diffs = setting_diffs(store.read_config(), cfg)
        except (StorageError, ConfigError) as exc:
            raise ConfigError(f"name: the setting recorded at {store.uri()} is unusable ({exc}); delete "
                              f"{store.uri(CONFIG)} to rerun {cfg.name!r} (the checkpoints stay usable), "
                              f"or choose a new name") from None
        if diffs:
            raise ConfigError(f"name: experiment {cfg.name!r} already exists at {store.uri()} "
                              f"with a different setting ({'; '.join(diffs)}): choose a new name or delete it")


def check_existing_run(cfg: ExperimentConfig, storage: Storage,
                       log: Callable[[str], None]) -> dict[str, ResumePlan]:
    """Rerunning an experiment name resumes it; refuse when the earlier run trained something
    else, or when all its checkpoints are corrupt. Writes nothing: ``record_config`` does, once
    training is about to start, so a run refused before it leaves the name free. Returns where
    each variant resumes (training/resume.py), which the fits carry out."""
    refuse_other_setting(cfg, storage)
    store = RunStore(storage, cfg.name)
    return {variant: plan_resume(storage, store.variant_prefix(variant), log)
            for variant in (() if cfg.seeds else cfg.variants)}


def record_config(cfg: ExperimentConfig, storage: Storage) -> None:
    """The setting of the run under ``cfg.name``, which reruns are checked against."""
    RunStore(storage, cfg.name).write_config(cfg)


def earlier_results(cfg: ExperimentConfig, storage: Storage) -> Optional[ExperimentResults]:
    """The results an earlier run under ``cfg.name`` wrote, if it trained with the same setting
    (the same epochs too; any variants); None when there are none or they are unreadable."""
    store = RunStore(storage, cfg.name)
    if not store.has_results():
        return None
    try:
        results = store.read_results()
        same = isinstance(results, ExperimentResults) and not setting_diffs(results.config.to_dict(), cfg) \
            and results.config.train.epochs == cfg.train.epochs
    except (StorageError, ConfigError, ResultsError):  # unreadable: run again
        return None
    return results if same else None


def finished_run(cfg: ExperimentConfig, storage: Storage) -> Optional[ExperimentResults]:
    """The results of an earlier run of ``cfg`` that trained every variant it asks for with the
    same setting, reduced to those variants; None when there is none (then it must run)."""
    results = earlier_results(cfg, storage)
    if results is None or not all(v in results.variants for v in cfg.variants):
        return None
    return dataclasses.replace(results, variants={v: results.variants[v] for v in cfg.variants})


def merge_variants(new: dict[str, VariantResult], earlier: Optional[ExperimentResults]
                   ) -> tuple[dict[str, VariantResult], dict[str, str]]:
    """This run's variants plus those an earlier run of the same setting trained and this one
    did not (a rerun of one variant must not lose the other's figures), in ``VARIANTS`` order;
    and, for each kept one, the run that trained it."""
    kept = {v: r for v, r in (earlier.variants if earlier else {}).items() if v not in new}
    merged = {**kept, **new}
    return {v: merged[v] for v in VARIANTS if v in merged}, {v: earlier.run_id for v in kept} if earlier else {}


def run_experiment(cfg: ExperimentConfig, log: Callable[[str], None] = print) -> ExperimentResults:
    """Run every variant of the experiment on the connected Ray cluster; return the results."""
    with locked_run(cfg) as run:  # one run of a name at a time
        return _run_locked(run.cfg, run.storage, run.run_id, log)


def _run_locked(cfg: ExperimentConfig, storage: Storage, run_id: str, log: Callable[[str], None]) -> ExperimentResults:
    plans = check_existing_run(cfg, storage, log)  # under the run lock: still true when the fits start
    run = prepare_run(cfg, storage, run_id, log)
    try:
        fit_variants(cfg, run.specs, storage, run_id, run.finished, log, plans)
    except BaseException:
        run.failed()
        raise
    return run.write_results()


@dataclass
class PreparedRun:
    """One experiment between its checks and its results: poisoned, its setting and manifest
    written, its fits' specs made; ``finished`` takes each variant's trained checkpoint (from a
    fit of its own or a link of a chained fit), ``write_results`` writes results.json."""

    cfg: ExperimentConfig
    storage: Storage
    run_id: str
    log: Callable[[str], None]
    started: float
    poison_seconds: float
    manifest: PoisonManifest
    manifest_uri: str
    eval_sets: EvalSets
    run_metrics: RunMetrics
    specs: list[FitSpec]
    variants: dict[str, VariantResult] = field(default_factory=dict)

    def finished(self, spec: FitSpec, checkpoint: Any, timing: dict[str, float]) -> None:
        """Variant ``spec.variant`` trained, ending in ``checkpoint``: its model written and evaluated."""
        cfg = self.cfg
        with checkpoint.as_directory() as ckpt_dir:
            model, state = restore_model(ckpt_dir, cfg)
        RunStore(self.storage, cfg.name).write_model(spec.variant, model)
        evaluation = full_evaluation(model, self.eval_sets, cfg.poison.target, cfg.dataset.num_classes)
        self.variants[spec.variant] = VariantResult(
            **evaluation, train_sha256=spec.train_sha256, **timing, checkpoint=checkpoint.path,
            history=tuple(EpochRecord(**epoch) for epoch in state["history"]))
        _push(self.log, self.run_metrics.variant_finished, spec.variant, evaluation, spec.n_poisoned)

    def failed(self) -> None:
        """The variants not finished, told to the Pushgateway as failed."""
        for spec in self.specs:
            if spec.variant not in self.variants:
                _push(self.log, self.run_metrics.variant_failed, spec.variant)

    def write_results(self) -> ExperimentResults:
        cfg = self.cfg
        variants, kept = merge_variants(self.variants, earlier_results(cfg, self.storage))
        if kept:
            self.log(f"results keep {', '.join(kept)} from the earlier run of this setting (not trained now)")
        results = ExperimentResults(
            experiment=cfg.name, run_id=self.run_id, started_at=self.started, finished_at=time.time(),
            poison_seconds=self.poison_seconds, n_poisoned=self.manifest.n_poisoned,
            poison_manifest=self.manifest_uri, variants=variants, kept_from_earlier_runs=kept, config=cfg,
            environment=run_environment(cfg))
        return dataclasses.replace(results, results_uri=RunStore(self.storage, cfg.name).write_results(results))


def prepare_run(cfg: ExperimentConfig, storage: Storage, run_id: str, log: Callable[[str], None]) -> PreparedRun:
    """Load and poison the data, write the setting and the manifest (every check passed: from
    here on the name holds this setting) and make the variants' fit specs."""
    started = time.time()
    t0 = time.perf_counter()
    train, test = load_splits(cfg)
    log(f"loaded {cfg.dataset.title}: {len(train)} training, {len(test)} test images ({time.perf_counter() - t0:.2f}s)")
    t0 = time.perf_counter()
    _, manifest = build_poisoned(train, cfg.poison, cfg.seed)
    poison_seconds = time.perf_counter() - t0
    log(f"poisoned {manifest.n_poisoned} of {manifest.n_total} training images "
        f"(target {cfg.poison.target}, trigger {cfg.poison.trigger.kind}, {poison_seconds * 1000:.0f} ms)")
    record_config(cfg, storage)
    manifest_uri = RunStore(storage, cfg.name).write_manifest(manifest)
    hashes = {"clean": manifest.sha256_clean, "poisoned": manifest.sha256_poisoned}
    log(f"training {', '.join(cfg.variants)}: {cfg.train.epochs} epochs, {cfg.scaling.num_workers} worker(s) "
        f"per model, global batch {cfg.train.batch_size}, {'GPU' if cfg.scaling.use_gpu else 'CPU'}, "
        f"{cfg.train.precision}")
    specs = [FitSpec(v, hashes[v], manifest.n_poisoned if v == "poisoned" else 0) for v in cfg.variants]
    return PreparedRun(cfg, storage, run_id, log, started, poison_seconds, manifest, manifest_uri,
                       build_eval_sets(test, cfg.poison), make_run_metrics(cfg, run_id), specs)


def run_environment(cfg: ExperimentConfig) -> dict[str, str]:
    """What ran the experiment, for the report's provenance: the versions of this package, torch,
    Ray and Python, the platform, and the device the workers trained on. A version that cannot be
    found is left out (the report says "not recorded"), never guessed."""
    import importlib.metadata
    import platform

    import ray
    import torch

    env = {"torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version(),
           "platform": platform.platform()}
    try:
        env["backdoor_train"] = importlib.metadata.version("backdoor_train")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing it
        pass
    device = "GPU" if cfg.scaling.use_gpu else "CPU"
    if cfg.scaling.use_gpu and torch.cuda.is_available():
        # The driver's GPU: the workers' on a one-node cluster, the usual GPU setting here.
        device = f"GPU ({torch.cuda.get_device_name(0)}, as the driver sees it)"
    env["device"] = f"{device}, {cfg.scaling.num_workers} Ray Train worker(s) per model"
    return env


def _push(log: Callable[[str], None], fn: Callable[..., None], *args: Any) -> None:
    # The Pushgateway was checked before the run; losing it now must not cost the trained models.
    try:
        fn(*args)
    except Exception as exc:
        log(f"WARNING: pushing metrics failed: {exc}")
