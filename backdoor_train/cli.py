"""The ``backdoor-train`` command line.

Exit status: 0 success; 2 bad input (config, data root, storage, credentials, endpoints, a
name being run right now) reported before any training starts; 1 a failure while running;
130 Ctrl-C and 143 SIGTERM (every fit aborted, the checkpoints kept for a rerun).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Optional

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_TERMINATED = 143  # 128 + SIGTERM


def _say(msg: str) -> None:
    print(f"backdoor-train: {msg}", flush=True)


def _add_config_args(p: argparse.ArgumentParser, what: str = "experiment YAML file, e.g. jobs/article.yaml") -> None:
    p.add_argument("config", help=what)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by its dotted key, e.g. --set train.epochs=2 (repeatable)")


def _add_seeds(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", default=None, metavar="LIST",
                   help="run the experiment once per seed and report statistics over them, e.g. 1-16 or "
                        "1,2,5 (replaces the file's seed/seeds)")


def _load(args: argparse.Namespace) -> Any:
    from backdoor_train.config import load_config, parse_seeds

    seeds = parse_seeds(args.seeds) if getattr(args, "seeds", None) is not None else None
    return load_config(args.config, args.overrides, seeds)


def _ip_address(text: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address of this machine (e.g. 127.0.0.1)") from None


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, else a new local Ray instance)")
    p.add_argument("--debug", action="store_true",
                   help="print the workers' tracebacks of a failed fit (default: one line, the tracebacks "
                        "in a file it names; also BACKDOOR_TRAIN_DEBUG=1)")
    p.add_argument("--listen", type=_ip_address, default="127.0.0.1", metavar="IP",
                   help="the address a new local Ray instance listens on (default: %(default)s, this machine "
                        "only; another address is reachable from the network: token authentication stays on)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="backdoor-train", description=__doc__.splitlines()[0])
    from backdoor_train.config import DataConfig
    from backdoor_train.defenses.registry import retrain_methods

    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train the clean and the poisoned model and compare them")
    _add_config_args(run)
    _add_seeds(run)
    _add_address(run)
    run.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")

    check = sub.add_parser("check", help="validate a config file, its data root and storage, then exit")
    _add_config_args(check)
    _add_seeds(check)

    sweep = sub.add_parser("sweep", help="run a grid of experiments (rate x trigger x seed) in parallel on Ray")
    _add_config_args(sweep, "sweep YAML file, e.g. jobs/rate_sweep.yaml")
    _add_address(sweep)

    detect = sub.add_parser("detect", help="find the poisoned samples of a finished experiment")
    _add_config_args(detect)
    _add_address(detect)
    # The methods of the registered defenses that flag training samples (defenses/registry.py).
    detect.add_argument("--retrain", choices=list(retrain_methods()), action="append", default=[],
                        help="retrain without the samples this method flagged and measure the new ASR "
                             "(repeatable: the retrains run at once)")

    report = sub.add_parser("report", help="write an HTML report of an experiment or a sweep")
    _add_config_args(report, "the experiment or sweep YAML file the run was made with")
    _add_seeds(report)
    report.add_argument("--out", default=None, help="HTML file to write (default: <name>-report.html)")

    submit = sub.add_parser("submit", help="submit an experiment to a running Ray cluster as a Ray job")
    _add_config_args(submit)
    _add_seeds(submit)
    submit.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                        help="the cluster's dashboard address (default: RAY_ADDRESS or %(default)s)")
    submit.add_argument("--no-upload", action="store_true",
                        help="CONFIG is a path on the cluster (e.g. a mounted ConfigMap); do not upload it")
    submit.add_argument("--no-wait", action="store_true", help="return once the job is submitted")

    stage = sub.add_parser("stage-data", help="upload a local dataset copy to S3 for data.root: s3://...")
    stage.add_argument("dest", help="s3://bucket/prefix to upload to")
    stage.add_argument("--dataset", default=DataConfig.name, help="a data.name (default: %(default)s)")
    stage.add_argument("--source", default="../shared/datasets/mnist",
                       help="local root of the dataset in torchvision's layout (default: %(default)s)")
    stage.add_argument("--create-bucket", action="store_true", help="create the bucket if it does not exist")
    return parser


def _bad_input_errors() -> tuple[type[Exception], ...]:
    from backdoor_train.storage.safeload import CorruptCheckpointError
    from backdoor_train.config import ConfigError
    from backdoor_train.data.split import DataError
    from backdoor_train.training.metrics import MetricsError
    from backdoor_train.training.raysession import ClusterError
    from backdoor_train.results import ResultsError
    from backdoor_train.storage import StorageError
    from backdoor_train.runs.submit import SubmitError

    return (ConfigError, DataError, StorageError, ResultsError, CorruptCheckpointError, MetricsError, SubmitError,
            ClusterError)


def _preflight(cfg: Any, resuming_check: bool, load_data: bool = False) -> Any:
    """Everything that can be checked without Ray: data root (and, with ``load_data``, its
    files), storage, endpoints, earlier runs of the name. Writes nothing."""
    from backdoor_train.storage.staging import load_splits, resolve_data_root
    from backdoor_train.runs.experiment import check_existing_run
    from backdoor_train.runs.locked import absolute_paths
    from backdoor_train.training.metrics import make_run_metrics
    from backdoor_train.storage.runlock import refuse_if_running
    from backdoor_train.runs.seeds import check_seed_folders, seed_experiments
    from backdoor_train.storage import open_storage

    cfg = absolute_paths(cfg)
    resolve_data_root(cfg)
    if load_data:
        load_splits(cfg)  # corrupt or truncated files: what run would refuse later
    storage = open_storage(cfg.storage)
    storage.check()
    if resuming_check:
        refuse_if_running(storage, cfg.name)  # before Ray starts; the run takes the lock itself
        check_existing_run(cfg, storage, log=lambda msg: None)  # run_experiment says it again
        check_seed_folders(seed_experiments(cfg))
    make_run_metrics(cfg, run_id="preflight").check()
    return cfg


def _ray_init(args: argparse.Namespace) -> None:
    from backdoor_train.training.raysession import connect

    connect(args.address, listen=args.listen)
    _handle_sigterm()  # again: ray.init installs its own handler, which aborts the process


def _cmd_check(args: argparse.Namespace) -> int:
    cfg = _preflight(_load(args), resuming_check=True, load_data=True)
    seeds = f", {len(cfg.seeds)} seeds" if cfg.seeds else ""
    print(f"{args.config}: OK (experiment {cfg.name!r}, variants {', '.join(cfg.variants)}{seeds})")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from backdoor_train.runs.experiment import run_experiment
    from backdoor_train.runs.seeds import format_seed_results, run_seeds
    from backdoor_train.reporting.summary import format_results

    cfg = _preflight(_load(args), resuming_check=True)
    _ray_init(args)
    if cfg.seeds:
        results = _running(lambda: run_seeds(cfg, log=_say))
        print(_json(results) if args.json else "\n" + format_seed_results(results), flush=True)
        return EXIT_FAILED if results.failures else 0
    one = _running(lambda: run_experiment(cfg, log=_say))
    print(_json(one) if args.json else "\n" + format_results(one), flush=True)
    return 0


def _json(results: Any) -> str:
    """``run --json``: the results as results.json holds them, and where that is."""
    return json.dumps({**results.to_dict(), "results_uri": results.results_uri}, indent=1)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from backdoor_train.runs.sweep import format_summary, load_sweep, run_sweep

    sweep = load_sweep(args.config, args.overrides)
    _preflight(sweep.base, resuming_check=False)
    _ray_init(args)
    summary = _running(lambda: run_sweep(sweep, log=_say))
    print("\n" + format_summary(summary) + f"\n\nsummary: {summary.summary_uri}", flush=True)
    return EXIT_FAILED if summary.failures else 0


def _cmd_detect(args: argparse.Namespace) -> int:
    from backdoor_train.config import ConfigError, load_config
    from backdoor_train.runs.detection import run_detection

    cfg = load_config(args.config, args.overrides)
    if cfg.seeds:
        raise ConfigError("seeds: detect works on one trained experiment; for one seed of a multi-seed "
                          "experiment use --set seeds=[] --set seed=N --set storage.path=<path>/<name> "
                          "--set name=seed-N")
    cfg = _preflight(cfg, resuming_check=False)
    _ray_init(args)  # the defenses run as Ray tasks
    report = _running(lambda: run_detection(cfg, retrain=list(dict.fromkeys(args.retrain)), log=_say))
    _say(f"detection results: {report['detection_uri']}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from backdoor_train.config import ConfigError, read_yaml
    from backdoor_train.runs.locked import absolute_paths
    from backdoor_train.reporting.html import experiment_report, sweep_report
    from backdoor_train.storage import StorageError, open_storage
    from backdoor_train.storage.runstore import RunStore, SweepStore
    from backdoor_train.runs.sweep import load_sweep

    is_sweep = isinstance(data := read_yaml(args.config), dict) and "grid" in data
    if is_sweep and args.seeds is not None:
        raise ConfigError("--seeds: a sweep's seeds are its grid's seed axis, not an option")
    try:
        if is_sweep:
            sweep = load_sweep(args.config, args.overrides)
            store = SweepStore(sweep.storage())
            name, page = sweep.name, sweep_report(sweep, store, store.read_summary())
            store.write_report(page)
        else:
            cfg = absolute_paths(_load(args))
            storage = open_storage(cfg.storage)
            name, page = cfg.name, experiment_report(cfg, storage)
            RunStore(storage, cfg.name).write_report(page)
    except StorageError as exc:
        raise StorageError(f"{exc} (has {args.config} been run?)") from None
    out = args.out or f"{name}-report.html"
    with open(out, "w", encoding="utf-8") as fh:
        fh.write(page)
    _say(f"report written to {out} ({len(page) // 1024} KiB)")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from backdoor_train.runs.submit import submit

    _, status = submit(args.config, args.address, args.overrides, upload=not args.no_upload,
                       wait=not args.no_wait, log=_say, seeds=args.seeds)
    return 0 if status in (None, "SUCCEEDED") else EXIT_FAILED


def _cmd_stage_data(args: argparse.Namespace) -> int:
    from backdoor_train.config import ConfigError
    from backdoor_train.data.registry import DATASETS
    from backdoor_train.storage.staging import stage_data
    from backdoor_train.storage import StorageError

    if not args.dest.startswith("s3://"):
        raise StorageError(f"dest must be an s3:// URI (got {args.dest!r})")
    if args.dataset not in DATASETS:
        raise ConfigError(f"--dataset must be one of {sorted(DATASETS)} (got {args.dataset!r})")
    stage_data(args.source, args.dest, log=_say, create_bucket=args.create_bucket, dataset=args.dataset)
    return 0


class _RunFailed(Exception):
    pass


def _running(fn: Callable[[], Any]) -> Any:
    """Bad input found late is still bad input (exit 2); anything else is a failed run (exit 1)."""
    try:
        return fn()
    except _bad_input_errors():
        raise
    except Exception as exc:
        from backdoor_train.training.failures import FitFailed
        from backdoor_train.storage.runlock import RunLockLost

        # These say what happened in their own words; any other error is named by its type.
        raise _RunFailed(str(exc) if isinstance(exc, (FitFailed, RunLockLost)) else
                         f"{type(exc).__name__}: {exc}") from exc


COMMANDS = {"check": _cmd_check, "run": _cmd_run, "sweep": _cmd_sweep, "detect": _cmd_detect,
            "report": _cmd_report, "submit": _cmd_submit, "stage-data": _cmd_stage_data}


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, Kubernetes stopping the pod): stopped like Ctrl-C, every fit aborted."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _handle_sigterm() -> None:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def main(argv: Optional[list[str]] = None) -> int:
    from backdoor_train.training.failures import DEBUG_ENV, debug
    from backdoor_train.training.raysession import apply_driver_env, prepare_local_cluster, target_of

    apply_driver_env()
    _handle_sigterm()
    args = build_parser().parse_args(argv)
    if getattr(args, "debug", False):
        os.environ[DEBUG_ENV] = "1"  # before the cluster starts: its workers read it
    if hasattr(args, "listen") and target_of(args.address) == "local":
        prepare_local_cluster(args.listen)  # before anything imports ray, which reads it then
    try:
        return COMMANDS[args.command](args)
    except _bad_input_errors() as exc:
        print(f"backdoor-train: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except FileNotFoundError as exc:
        print(f"backdoor-train: error: {exc.strerror}: {exc.filename}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except _RunFailed as exc:
        detail = getattr(exc.__cause__, "detail", "")
        if detail and debug():
            print(detail, file=sys.stderr)
        print(f"backdoor-train: run failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as exc:
        # Every running fit was aborted; its committed checkpoints stay, and a rerun resumes.
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"backdoor-train: {what}; rerun the same command to resume from the last checkpoints",
              file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
