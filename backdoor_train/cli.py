"""The ``backdoor-train`` command line.

Exit status: 0 success; 2 bad input (config, data root, storage, credentials) reported
before any training starts; 1 a failure while running.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML file, e.g. jobs/article.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by its dotted key, e.g. --set train.epochs=2 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="backdoor-train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train the clean and the poisoned model and compare them")
    _add_config_args(run)
    run.add_argument("--address", default=None,
                     help="Ray cluster address (default: RAY_ADDRESS, else a new local Ray instance)")
    run.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")

    check = sub.add_parser("check", help="validate a config file, its data root and storage, then exit")
    _add_config_args(check)

    sub_p = sub.add_parser("submit", help="submit an experiment to a running Ray cluster as a Ray job")
    _add_config_args(sub_p)
    sub_p.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                       help="the cluster's dashboard address (default: RAY_ADDRESS or %(default)s)")
    sub_p.add_argument("--no-upload", action="store_true",
                       help="CONFIG is a path on the cluster (e.g. a mounted ConfigMap); do not upload it")
    sub_p.add_argument("--no-wait", action="store_true", help="return once the job is submitted")

    stage = sub.add_parser("stage-data", help="upload a local MNIST copy to S3 for data.root: s3://...")
    stage.add_argument("dest", help="s3://bucket/prefix to upload to")
    stage.add_argument("--source", default="../shared/datasets/mnist",
                       help="local MNIST root in torchvision's layout (default: %(default)s)")
    stage.add_argument("--create-bucket", action="store_true", help="create the bucket if it does not exist")
    return parser


def _preflight(args: argparse.Namespace):
    """Everything that can be checked without Ray: config, data root, storage, earlier runs."""
    from backdoor_train.config import load_config
    from backdoor_train.datasource import resolve_data_root
    from backdoor_train.experiment import absolute_paths, check_existing_run
    from backdoor_train.metrics import make_run_metrics
    from backdoor_train.storage import open_storage

    cfg = absolute_paths(load_config(args.config, args.overrides))
    resolve_data_root(cfg)
    storage = open_storage(cfg.storage)
    storage.check()
    if args.command == "run":
        check_existing_run(cfg, storage, log=lambda msg: None)  # run_experiment says it again
    make_run_metrics(cfg, run_id="preflight").check()
    return cfg


def main(argv: Optional[list[str]] = None) -> int:
    from backdoor_train.checkpointing import CorruptCheckpointError
    from backdoor_train.config import ConfigError
    from backdoor_train.data import DataError
    from backdoor_train.metrics import MetricsError
    from backdoor_train.storage import StorageError

    bad_input = (ConfigError, DataError, StorageError, CorruptCheckpointError, MetricsError)

    args = build_parser().parse_args(argv)
    if args.command == "submit":
        return _submit(args, bad_input)
    if args.command == "stage-data":
        from backdoor_train.datasource import stage_data

        if not args.dest.startswith("s3://"):
            print(f"backdoor-train: error: dest must be an s3:// URI (got {args.dest!r})", file=sys.stderr)
            return EXIT_BAD_INPUT
        try:
            stage_data(args.source, args.dest, log=lambda msg: print(f"backdoor-train: {msg}", flush=True),
                       create_bucket=args.create_bucket)
        except bad_input as exc:
            print(f"backdoor-train: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        return 0
    try:
        cfg = _preflight(args)
    except bad_input as exc:
        print(f"backdoor-train: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    if args.command == "check":
        print(f"{args.config}: OK (experiment {cfg.name!r}, variants {', '.join(cfg.variants)})")
        return 0

    import ray

    from backdoor_train.experiment import run_experiment
    from backdoor_train.summary import format_results

    try:
        ray.init(address=args.address, log_to_driver=True)
    except Exception as exc:  # ConnectionError and friends, depending on the address form
        print(f"backdoor-train: error: cannot reach the Ray cluster at {args.address!r}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        results = run_experiment(cfg, log=lambda msg: print(f"backdoor-train: {msg}", flush=True))
    except bad_input as exc:
        print(f"backdoor-train: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:
        print(f"backdoor-train: run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(results, indent=1) if args.json else "\n" + format_results(results), flush=True)
    return 0


def _submit(args: argparse.Namespace, bad_input: tuple) -> int:
    from backdoor_train.submit import SubmitError, submit

    try:
        _, status = submit(args.config, args.address, args.overrides, upload=not args.no_upload,
                           wait=not args.no_wait, log=lambda msg: print(f"backdoor-train: {msg}", flush=True))
    except (*bad_input, SubmitError) as exc:
        print(f"backdoor-train: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0 if status in (None, "SUCCEEDED") else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
