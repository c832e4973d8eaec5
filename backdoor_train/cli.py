"""The ``backdoor-train`` command line: backdoor (data-poisoning) experiments on Ray Train.

Output: stdout holds a command's results alone (a table; with --json exactly one JSON document,
on failure {"ok": false, "exit_status": N, "error": ...}); progress, logs, warnings and the
lines Ray forwards from its workers go to stderr.

Exit status: 0 success; 2 bad input (config, data root, storage, credentials, endpoints, a
name being run right now) reported before any training starts; 1 a failure while running;
130 Ctrl-C and 143 SIGTERM (every fit aborted, the checkpoints kept for a rerun).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Optional, TextIO

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_TERMINATED = 143  # 128 + SIGTERM


def _say(msg: str) -> None:
    """A line for the person watching: stderr, never mixed into the results on stdout."""
    print(f"backdoor-train: {msg}", file=sys.stderr, flush=True)


# Where results go while a command runs (_StdoutForResults): the real stdout, which sys.stdout
# and file descriptor 1 then no longer are.
_results: Optional[TextIO] = None


def _print_result(text: str) -> None:
    """The command's results, on stdout."""
    stream = _results or sys.stdout
    if stream is not None:  # None: a process started without a stdout
        stream.write(text + "\n")
        stream.flush()


def _print_json(doc: Any) -> None:
    """``--json``: the one document on stdout."""
    _print_result(json.dumps(doc, indent=1))


def _fileno(stream: Any) -> Optional[int]:
    try:
        return stream.fileno()
    except (AttributeError, ValueError, OSError):  # a caller's in-memory stream (pytest's capsys)
        return None


class _StdoutForResults:
    """For a command's run, file descriptor 1 and ``sys.stdout`` point at stderr, so that only
    ``_print_result`` reaches stdout: not our progress lines, not the lines Ray forwards from its
    workers (it prints them to ``sys.stdout``), not Ray's own processes (they inherit descriptor 1),
    not a library's warning. ``keep``: the redirect stays after the block, for the process's own
    command, whose Ray prints its last forwarded lines while it shuts down at exit."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep

    def __enter__(self) -> "_StdoutForResults":
        global _results
        self.stdout = sys.stdout
        if self.stdout is not None:
            self.stdout.flush()
        try:
            self.saved: Optional[int] = os.dup(1)
        except OSError:  # started with descriptor 1 closed
            self.saved = None
        if self.saved is not None and _fileno(self.stdout) == 1:
            _results = open(os.dup(self.saved), "w", encoding=getattr(self.stdout, "encoding", None) or "utf-8",
                            errors=getattr(self.stdout, "errors", None))
        else:
            _results = self.stdout  # a stream of the caller's: results go to it as before
        if self.saved is not None:
            err = _fileno(sys.stderr)
            os.dup2(2 if err is None else err, 1)
        sys.stdout = sys.stderr
        return self

    def __exit__(self, *exc: Any) -> None:
        global _results
        if _results is not None:
            _results.flush()
        if self.keep:
            return
        sys.stderr.flush()
        sys.stdout = self.stdout
        if self.saved is not None:
            os.dup2(self.saved, 1)
            os.close(self.saved)
        if _results is not self.stdout and _results is not None:
            _results.close()
        _results = None


def _plain(text: str) -> str:
    """A docstring for --help: without reST's ``literal`` markup."""
    return text.replace("``", "")


def _versions() -> str:
    """--version: this package's and the libraries' it runs on, as installed."""
    import platform
    from importlib import metadata

    def of(dist: str, fallback: str = "not installed") -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return fallback

    import backdoor_train

    return (f"backdoor-train {of('backdoor-train', backdoor_train.__version__)} (torch {of('torch')}, "
            f"ray {of('ray')}, Python {platform.python_version()})")


def _add_config_args(p: argparse.ArgumentParser, what: str = "experiment YAML file, e.g. jobs/article.yaml") -> None:
    p.add_argument("config", help=what)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by its dotted key, e.g. --set train.epochs=2 (repeatable)")


RUN_SEEDS = ("run the experiment once per seed and report statistics over them, e.g. 1-16 or 1,2,5 "
             "(replaces the file's seed/seeds)")


def _add_seeds(p: argparse.ArgumentParser, what: str = RUN_SEEDS) -> None:
    p.add_argument("--seeds", default=None, metavar="LIST", help=what)


def _add_json(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true",
                   help=f"print {what} as one JSON document on stdout (logs stay on stderr)")


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
    p.add_argument("--quiet", action="store_true",
                   help="no progress: no epoch lines, bars or per-class lines (errors and results still print; "
                        "also BACKDOOR_TRAIN_QUIET=1)")
    p.add_argument("--listen", type=_ip_address, default="127.0.0.1", metavar="IP",
                   help="the address a new local Ray instance listens on (default: %(default)s, this machine "
                        "only; another address is reachable from the network: token authentication stays on)")


def build_parser() -> argparse.ArgumentParser:
    summary, _, details = _plain(__doc__).partition("\n\n")
    parser = argparse.ArgumentParser(prog="backdoor-train", description=summary, epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_versions(),
                        help="print the versions of backdoor-train, torch, Ray and Python, then exit")
    from backdoor_train.config import DataConfig
    from backdoor_train.defenses.registry import retrain_methods

    sub = parser.add_subparsers(dest="command", required=True)

    what = "train the clean and the poisoned model and compare them"
    run = sub.add_parser("run", help=what, description=what)
    _add_config_args(run)
    _add_seeds(run)
    _add_address(run)
    _add_json(run, "the results (results.json's content and its URI), not tables")

    what = "validate a config file, its data root and storage, then exit"
    check = sub.add_parser("check", help=what, description=what + "; nothing is written, Ray is not started")
    _add_config_args(check)
    _add_seeds(check, "check the experiment as `run --seeds LIST` would run it, each seed's folder of an earlier "
                      "run included, e.g. 1-16 or 1,2,5 (replaces the file's seed/seeds)")
    _add_json(check, "the verdict")

    what = "run a grid of experiments (rate x trigger x seed) in parallel on Ray"
    sweep = sub.add_parser("sweep", help=what, description=what)
    _add_config_args(sweep, "sweep YAML file, e.g. jobs/rate_sweep.yaml")
    _add_address(sweep)
    _add_json(sweep, "the summary (summary.json's content and its URI), not a table")

    what = "find the poisoned samples of a finished experiment"
    detect = sub.add_parser("detect", help=what, description=what)
    _add_config_args(detect)
    _add_address(detect)
    _add_json(detect, "the findings (detection.json's content and its URI)")
    # The methods of the registered defenses that flag training samples (defenses/registry.py).
    detect.add_argument("--retrain", choices=list(retrain_methods()), action="append", default=[],
                        help="retrain without the samples this method flagged and measure the new ASR "
                             "(repeatable: the retrains run at once)")

    what = "write an HTML report of an experiment or a sweep"
    report = sub.add_parser("report", help=what, description=what + ", read from the run's storage")
    _add_config_args(report, "the experiment or sweep YAML file the run was made with")
    _add_seeds(report, "accepted so that the command line of `run --seeds LIST` works unchanged: the report "
                       "covers the seeds the run finished, whatever the list")
    report.add_argument("--out", default=None, metavar="PATH",
                        help="HTML file to write (default: <name>-report.html in the current folder)")
    report.add_argument("--save-to-run", action="store_true",
                        help="also store the page as the run's report.html in its storage, holding the run's "
                             "lock while writing (refused while the run is running)")
    _add_json(report, "where the report was written")

    submit = sub.add_parser("submit", help="submit an experiment to a running Ray cluster as a Ray job")
    _add_config_args(submit)
    _add_seeds(submit)
    submit.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                        help="the cluster's dashboard address (default: RAY_ADDRESS or %(default)s)")
    submit.add_argument("--no-upload", action="store_true",
                        help="CONFIG is a path on the cluster (e.g. a mounted ConfigMap); do not upload it")
    submit.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    submit.add_argument("--runtime-env", default=None, metavar="FILE",
                        help="a YAML or JSON runtime environment for the job, as `ray job submit --runtime-env` "
                             "takes (env_vars, py_modules, pip ...); submit adds the uploaded config's working_dir")
    submit.add_argument("--submission-id", default=None, metavar="ID",
                        help="the job's id on the cluster (Ray's submission_id; default: one Ray makes up); "
                             "an id is used once per cluster")

    what = "upload a local dataset copy to S3 for data.root: s3://..."
    stage = sub.add_parser("stage-data", help=what, description=what)
    stage.add_argument("dest", help="s3://bucket/prefix to upload to")
    stage.add_argument("--dataset", default=DataConfig.name, help="a data.name (default: %(default)s)")
    stage.add_argument("--source", default="../shared/datasets/mnist",
                       help="local root of the dataset in torchvision's layout (default: %(default)s)")
    stage.add_argument("--create-bucket", action="store_true", help="create the bucket if it does not exist")
    _add_json(stage, "the staged files and their sha256 (the manifest stage-data writes)")
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
    if args.json:
        _print_json({"ok": True, "config": args.config, "name": cfg.name, "variants": list(cfg.variants),
                     "seeds": list(cfg.seeds)})
        return 0
    seeds = f", {len(cfg.seeds)} seeds" if cfg.seeds else ""
    _print_result(f"{args.config}: OK (experiment {cfg.name!r}, variants {', '.join(cfg.variants)}{seeds})")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from backdoor_train.runs.experiment import run_experiment
    from backdoor_train.runs.seeds import format_seed_results, run_seeds
    from backdoor_train.reporting.summary import format_results

    cfg = _preflight(_load(args), resuming_check=True)
    _ray_init(args)
    if cfg.seeds:
        results = _running(lambda: run_seeds(cfg, log=_say))
        _print_result(_json(results) if args.json else "\n" + format_seed_results(results))
        return EXIT_FAILED if results.failures else 0
    one = _running(lambda: run_experiment(cfg, log=_say))
    _print_result(_json(one) if args.json else "\n" + format_results(one))
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
    if args.json:
        _print_json({**summary.to_dict(), "summary_uri": summary.summary_uri})
    else:
        _print_result("\n" + format_summary(summary) + f"\n\nsummary: {summary.summary_uri}")
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
    if args.json:
        _print_json(report)
    else:
        _print_result(f"detection results: {report['detection_uri']}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    import contextlib
    import dataclasses

    from backdoor_train.config import ConfigError, read_yaml
    from backdoor_train.runs.locked import absolute_paths, locked_run
    from backdoor_train.reporting.html import experiment_report, sweep_report
    from backdoor_train.storage import StorageError, open_storage
    from backdoor_train.storage.runstore import RESULTS, SUMMARY, RunStore, SweepStore
    from backdoor_train.runs.sweep import load_sweep

    is_sweep = isinstance(data := read_yaml(args.config), dict) and "grid" in data
    if is_sweep and args.seeds is not None:
        raise ConfigError("--seeds: a sweep's seeds are its grid's seed axis, not an option")
    if is_sweep:
        sweep = load_sweep(args.config, args.overrides)
        store: Any = SweepStore(sweep.storage())
        name, storage, made = sweep.name, store.storage, SUMMARY
        # The sweep's folder is <storage.path>/<sweep name>: the lock of that name guards it.
        cfg = dataclasses.replace(sweep.base, name=sweep.name)
    else:
        cfg = absolute_paths(_load(args))
        name, storage = cfg.name, open_storage(cfg.storage)
        store, made = RunStore(storage, name), f"{name}/{RESULTS}"
    if args.save_to_run and not storage.exists(made):  # taking the lock would create the run's folder
        raise StorageError(f"{storage.key_uri(made)} does not exist (has {args.config} been run?)")
    # With --save-to-run the run's lock is held from before the reading to after the writing: the
    # page shows one state of the run, and no run writes into the folder meanwhile.
    with locked_run(cfg, cluster_check=False) if args.save_to_run else contextlib.nullcontext():
        try:
            page = sweep_report(sweep, store, store.read_summary()) if is_sweep else experiment_report(cfg, storage)
        except StorageError as exc:
            raise StorageError(f"{exc} (has {args.config} been run?)") from None
        out = os.path.abspath(args.out or f"{name}-report.html")
        try:
            with open(out, "w", encoding="utf-8") as fh:
                fh.write(page)
        except OSError as exc:
            raise ConfigError(f"--out {out}: cannot write it ({exc.strerror})") from None
        written = [out]
        _say(f"report written to {out} ({len(page) // 1024} KiB)")
        if args.save_to_run:
            written.append(store.write_report(page))
            _say(f"report stored with the run: {written[-1]}")
    if args.json:
        _print_json({"name": name, "written": written, "bytes": len(page.encode("utf-8"))})
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from backdoor_train.runs.submit import follow, submit_job

    job = None
    try:
        job = submit_job(args.config, args.address, args.overrides, upload=not args.no_upload, seeds=args.seeds,
                         runtime_env_file=args.runtime_env, submission_id=args.submission_id, log=_say)
        if args.no_wait:
            return 0
        status = _running(lambda: follow(job, log=_say))
    except KeyboardInterrupt as exc:
        # Not main()'s "rerun to resume": the job belongs to the cluster and goes on without submit.
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        if job is None:
            print(f"backdoor-train: {what} while submitting; `ray job list --address {args.address}` shows "
                  f"whether the job reached the cluster", file=sys.stderr)
        else:
            print(f"backdoor-train: {what}; job {job.job_id} goes on running on the cluster: stop it with "
                  f"`{job.stop_command()}`, follow it with `{job.logs_command()}`", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    return 0 if status == "SUCCEEDED" else EXIT_FAILED


def _cmd_stage_data(args: argparse.Namespace) -> int:
    from backdoor_train.config import ConfigError
    from backdoor_train.data.registry import DATASETS
    from backdoor_train.storage.staging import stage_data
    from backdoor_train.storage import StorageError

    if not args.dest.startswith("s3://"):
        raise StorageError(f"dest must be an s3:// URI (got {args.dest!r})")
    if args.dataset not in DATASETS:
        raise ConfigError(f"--dataset must be one of {sorted(DATASETS)} (got {args.dataset!r})")
    manifest = stage_data(args.source, args.dest, log=_say, create_bucket=args.create_bucket, dataset=args.dataset)
    if args.json:
        _print_json({"dest": args.dest, "dataset": args.dataset, "staged": manifest})
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
    if getattr(args, "quiet", False):
        from backdoor_train.progress import QUIET_ENV

        os.environ[QUIET_ENV] = "1"  # so too its workers and tasks
    if hasattr(args, "listen") and target_of(args.address) == "local":
        prepare_local_cluster(args.listen)  # before anything imports ray, which reads it then
    # The command line given to the process (argv None) keeps stdout for the results until it
    # exits; a caller's main([...]) gets its stdout back.
    with _StdoutForResults(keep=argv is None):
        try:
            return COMMANDS[args.command](args)
        except _bad_input_errors() as exc:
            return _failed(args, EXIT_BAD_INPUT, "error: ", str(exc))
        except FileNotFoundError as exc:
            return _failed(args, EXIT_BAD_INPUT, "error: ", f"{exc.strerror}: {exc.filename}")
        except _RunFailed as exc:
            detail = getattr(exc.__cause__, "detail", "")
            if detail and debug():
                print(detail, file=sys.stderr)
            return _failed(args, EXIT_FAILED, "run failed: ", str(exc))
        except KeyboardInterrupt as exc:
            # Every running fit was aborted; its committed checkpoints stay, and a rerun resumes.
            what = "terminated" if isinstance(exc, Terminated) else "interrupted"
            if args.command in ("run", "sweep", "detect"):  # the commands that train
                what += "; rerun the same command to resume from the last checkpoints"
            return _failed(args, EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED, "", what)


def _failed(args: argparse.Namespace, status: int, kind: str, message: str) -> int:
    """The one error line on stderr; with ``--json`` also the document stdout promises."""
    print(f"backdoor-train: {kind}{message}", file=sys.stderr, flush=True)
    if getattr(args, "json", False):
        _print_json({"ok": False, "exit_status": status, "error": message})
    return status


if __name__ == "__main__":
    sys.exit(main())
