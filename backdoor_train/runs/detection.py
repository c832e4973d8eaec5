"""Running the defenses on a finished experiment, and optionally retraining without the flagged samples.

Reads the poisoned model and the poison manifest from the experiment's run store, runs every
registered defense (defenses/registry.py) as a Ray task (``run_defense``; on a GPU with
``scaling.use_gpu``), all at once, prints each one's log lines and writes ``detection.json``
there, each result under its defense's key. With ``retrain``, each named method's flagged
samples are removed and a ``filtered-<method>`` model is trained with the same config on Ray
(all at once); their clean accuracy and ASR are added to the file under ``retrain.<method>``.

A driver like the experiment's, not a defense: it needs the run store, the data and Ray Train,
which the defenses below the config never import.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch

from backdoor_train.config import ExperimentConfig
from backdoor_train.storage.staging import load_splits
from backdoor_train.defenses.base import Defense, DefenseContext, split_test
from backdoor_train.defenses.registry import defenses, retrain_methods
from backdoor_train.attack.evaluate import build_eval_sets, full_evaluation
from backdoor_train.progress import Tally, quiet
from backdoor_train.runs.locked import locked_run
from backdoor_train.training.fitting import FitSpec, fit_variants
from backdoor_train.attack.poison import build_poisoned, dataset_sha256
from backdoor_train.storage.runstore import MANIFEST, RunStore
from backdoor_train.storage import Storage, StorageError
from backdoor_train.training.worker import restore_model, without


def run_detection(cfg: ExperimentConfig, retrain: Sequence[str] = (),
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    # It writes into the run's folder. The defenses are Ray tasks that need no Train fit; retrains
    # are fits, so a cluster that cannot hold one is refused before the defenses' minutes, not after.
    with locked_run(cfg, cluster_check=bool(retrain)) as run:
        return _detect_locked(run.cfg, run.storage, run.run_id, retrain, log)


def _detect_locked(cfg: ExperimentConfig, storage: Storage, run_id: str, retrain: Sequence[str],
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
    owners = retrain_methods()
    unknown = [m for m in retrain if m not in owners]
    if unknown:  # the CLI offers only these; a caller's typo
        raise ValueError(f"no defense flags training samples as {unknown[0]!r} (methods: {sorted(owners)})")
    t0 = time.perf_counter()
    ran = defenses()
    done = _run_defenses(cfg, model, manifest.indices, ran, log)
    log(f"the defenses took {time.perf_counter() - t0:.1f}s (Ray tasks, at once)")
    for defense in ran:
        for line in defense.log_lines(done[defense.name]):
            log(line)
    report: dict[str, Any] = {"experiment": cfg.name, "n_poisoned": manifest.n_poisoned,
                              **{d.detection_key: done[d.name] for d in ran},
                              "defender_clean_samples": cfg.defense.clean_samples}

    if retrain:
        # One filtered-<method> model per method, trained at once like an experiment's variants.
        eval_sets = build_eval_sets(test, cfg.poison)
        specs, by_variant = [], {}
        for method in retrain:
            exclude = tuple(owners[method].flagged(done[owners[method].name], method))
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

        fit_variants(cfg, specs, storage, run_id, finished, log)
    report["detection_uri"] = store.write_detection(report)
    return report


def _run_defenses(cfg: ExperimentConfig, model: Any, poisoned_indices: list[int],
                  ran: Sequence[Defense], log: Callable[[str], None] = print) -> dict[str, Any]:
    """Each defense of ``ran`` as a Ray task on the connected cluster, all at once: its result
    by its name. Says each as it finishes, and which still run (no ETA: they differ in kind)."""
    import ray

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    task = ray.remote(run_defense).options(**remote_options(cfg))
    refs = {task.remote(d, cfg.to_dict(), state, poisoned_indices): d.name for d in ran}
    tally = Tally("defense", len(refs), log, slots=len(refs), with_eta=False)
    for name in refs.values():
        tally.start(name)
    done: dict[str, Any] = {}
    try:
        while len(done) < len(refs):
            ready, _ = ray.wait([r for r in refs if refs[r] not in done], num_returns=1)
            done[refs[ready[0]]] = ray.get(ready[0])  # one failing raises: the others are stopped
            tally.finish(refs[ready[0]])
    except BaseException:
        for ref in refs:  # Ctrl-C or one failing: stop the others
            ray.cancel(ref, force=True)
        raise
    finally:
        tally.close()
    return {d.name: done[d.name] for d in ran}


def run_defense(defense: Defense, cfg_dict: dict[str, Any], state: dict[str, torch.Tensor],
                poisoned_indices: list[int]) -> dict[str, Any]:
    """The Ray task of any defense: ``defense.run`` on the model with weights ``state``, the
    data loaded where the task runs; a JSON-ready dict."""
    from backdoor_train.models.registry import build_model

    cfg = ExperimentConfig.from_dict(cfg_dict)
    device = _device(cfg)
    model = build_model(cfg.model.arch, cfg.dataset)
    model.load_state_dict(state)
    model.eval()
    train, test = load_splits(cfg)
    clean, held = split_test(test, cfg.defense.clean_samples)
    return defense.run(DefenseContext(cfg=cfg, knobs=cfg.defense.of(defense), model=model, device=device, train=train,
                                      clean=clean, held=held, poisoned_indices=frozenset(poisoned_indices),
                                      say=_progress_line(f"[{cfg.name}] ")))


def _progress_line(prefix: str) -> Callable[[str], None]:
    """What a defense's task says of its progress (Neural Cleanse's classes): a line the driver
    prints as Ray forwards it, ``prefix`` naming the run (and sparing it Ray's deduplication,
    training/raysession.py); nothing with ``--quiet``."""
    if quiet():
        return lambda msg: None
    return lambda msg: print(prefix + msg, flush=True)


def _device(cfg: ExperimentConfig) -> torch.device:
    if cfg.scaling.use_gpu and torch.cuda.is_available():
        return torch.device("cuda")
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    return torch.device("cpu")


def remote_options(cfg: ExperimentConfig) -> dict[str, Any]:
    """The Ray resources of one defense task: one training worker's."""
    options: dict[str, Any] = {"num_cpus": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        options["num_gpus"] = cfg.scaling.gpus_per_worker
    return options
