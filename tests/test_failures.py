"""A failed fit in one line: cause, variant, what was kept; tracebacks only in a file or with --debug."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile

import pytest
import yaml

from backdoor_train.training.checkpoint import CHECKSUM_FILE, STATE_FILE
from backdoor_train.training.failures import cause_of, fit_failed, kept_checkpoints
from backdoor_train.storage.runstore import RunStore
from backdoor_train.storage import LocalStorage

BIN = os.path.dirname(sys.executable)


def _worker_error(exc: BaseException, traceback_text: str):
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    return WorkerGroupError("[Rank 0 Error Snippet]:\n" + traceback_text,
                            {0: UserExceptionWithTraceback(exc, traceback_text)})


def test_the_cause_is_the_workers_exception_not_rays_wrapper():
    from backdoor_train.storage import StorageError

    exc = StorageError("uploading checkpoint checkpoint_epoch_0001 to /d/runs/x/clean/checkpoint_epoch_0001 "
                       "failed: OSError: [Errno 28] No space left on device")
    cause = cause_of(_worker_error(exc, "Traceback (most recent call last):\n  File ...\nStorageError: ..."))
    assert cause.startswith("no space left on the device under /d/runs/x/clean/checkpoint_epoch_0001")
    assert "Traceback" not in cause and "\n" not in cause
    diverged = cause_of(_worker_error(FloatingPointError("training loss became nan in epoch 1"), "Traceback ..."))
    assert diverged == "FloatingPointError: training loss became nan in epoch 1"


def test_a_lost_worker_is_told_as_such():
    from ray.exceptions import ActorDiedError

    assert cause_of(_worker_error(ActorDiedError(), "")).startswith("a training worker's process or node was lost")


def test_what_was_kept_is_each_variants_newest_committed_checkpoint(tmp_path):
    storage = LocalStorage(str(tmp_path))
    store = RunStore(storage, "exp")
    for folder, files in {"checkpoint_epoch_0001": (STATE_FILE, CHECKSUM_FILE),
                          "checkpoint_epoch_0002": (STATE_FILE, CHECKSUM_FILE),
                          "checkpoint_epoch_0003": (STATE_FILE,)}.items():  # 3: its checksum never landed
        for name in files:
            storage.write_bytes(f"{store.variant_prefix('clean')}/{folder}/{name}", b"x")
    assert kept_checkpoints(storage, store, ["clean", "poisoned"]) == "clean: epoch 2, poisoned: no checkpoint"


def test_the_line_names_the_variant_and_the_file_holding_the_traceback(tmp_path, monkeypatch):
    from backdoor_train.training import raysession

    monkeypatch.setattr(raysession, "logs_dir", lambda: str(tmp_path))
    storage = LocalStorage(str(tmp_path / "runs"))
    failed = fit_failed("poisoned", _worker_error(ValueError("boom"), "Traceback (most recent call last):\nX\n"),
                        storage, RunStore(storage, "exp"), ["clean", "poisoned"])
    line = str(failed)
    assert line.startswith("poisoned: ValueError: boom; kept for a rerun: clean: no checkpoint, poisoned: no "
                           "checkpoint; the workers' tracebacks: " + str(tmp_path)), line
    assert "\n" not in line and "Traceback (most recent call last)" in open(failed.log_path).read()


@pytest.fixture
def small_disk():
    """A 3 MiB tmpfs: room for the run's small files, not for a checkpoint (real ENOSPC)."""
    path = tempfile.mkdtemp(prefix="full", dir="/tmp")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", path], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    yield path
    subprocess.run(["umount", path], check=True)


@pytest.mark.integration
def test_a_full_disk_ends_the_run_in_one_line(small_disk, mnist_root, tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({
        "name": "full", "data": {"root": mnist_root, "train_samples": 6000, "test_samples": 1000},
        "train": {"epochs": 3}, "storage": {"path": os.path.join(small_disk, "runs")},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "BACKDOOR_TRAIN_DEBUG"))}
    env["BACKDOOR_TRAIN_CACHE_DIR"] = str(tmp_path / "cache")

    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rf", dir="/tmp")  # short, for Ray's socket paths
    quiet = subprocess.run([os.path.join(BIN, "backdoor-train"), "run", str(config), "--address", "local"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 1, quiet.stderr[-3000:]
    ours = [line for line in quiet.stderr.splitlines() if line.startswith("backdoor-train: run failed")]
    assert len(ours) == 1, quiet.stderr[-3000:]
    assert "Traceback" not in quiet.stdout + quiet.stderr, quiet.stderr[-3000:]
    line = ours[0]
    assert "no space left on the device under " + small_disk in line, line
    assert "retry_seconds" not in line  # it failed at once: no retry bound to speak of
    assert "kept for a rerun: clean: no checkpoint, poisoned: no checkpoint" in line, line
    path = line.rsplit("the workers' tracebacks: ", 1)[1]
    assert "Traceback (most recent call last)" in open(path).read()


def test_debug_prints_the_workers_tracebacks_and_keeps_rays_log_of_them(monkeypatch, capsys):
    from backdoor_train import cli; from backdoor_train.training import failures, rayinternals

    monkeypatch.setattr(rayinternals, "TRAIN_ERROR_LOGGER", "test.train.util")
    record = logging.LogRecord("test.train.util", logging.ERROR, __file__, 1, "Error in training function:\nTB",
                               None, None)
    monkeypatch.setenv(failures.DEBUG_ENV, "0")  # off; and --debug's "1" is undone after the test
    failures.quiet_worker_tracebacks()
    assert not logging.getLogger("test.train.util").filter(record)  # dropped: the driver keeps it

    def failing(args):
        raise failures.FitFailed("clean: ValueError: boom; kept for a rerun: clean: no checkpoint",
                                 detail="Traceback (most recent call last):\n  File x\nValueError: boom")

    monkeypatch.setitem(cli.COMMANDS, "run", lambda args: cli._running(lambda: failing(args)))
    assert cli.main(["run", "x.yaml", "--address", "auto"]) == cli.EXIT_FAILED
    quiet = capsys.readouterr().err
    assert quiet == "backdoor-train: run failed: clean: ValueError: boom; kept for a rerun: clean: no checkpoint\n"
    assert cli.main(["run", "x.yaml", "--address", "auto", "--debug"]) == cli.EXIT_FAILED
    loud = capsys.readouterr().err
    assert loud.startswith("Traceback (most recent call last):") and loud.endswith(quiet), loud


def test_a_dropped_ddp_peer_is_told_as_a_lost_worker():
    # What the surviving worker of a DDP group raises when its peer's node is gone.
    exc = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
                       "[127.0.0.1]:40078: Connection reset by peer. This is typically caused by a remote worker")
    assert cause_of(_worker_error(exc, "")).startswith("a training worker's process or node was lost (its DDP peer")
    assert cause_of(_worker_error(RuntimeError("Connection reset by peer"), "")).startswith("RuntimeError")


@pytest.mark.parametrize("file_first", [False, True])
def test_the_controllers_console_keeps_messages_and_drops_tracebacks(monkeypatch, file_first):
    import io
    import logging

    from backdoor_train.training.failures import DEBUG_ENV, quiet_controller_tracebacks

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    logger = logging.getLogger("ray.train")
    console, kept = io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(console), logging.FileHandler(os.devnull)]
    handlers[1].stream = kept  # a file handler: Ray's log files keep the traceback
    for h in reversed(handlers) if file_first else handlers:
        logger.addHandler(h)
    try:
        quiet_controller_tracebacks()
        quiet_controller_tracebacks()  # idempotent
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("ray.train.v2.x").error("Graceful shutdown of backend failed.", exc_info=True)
    finally:
        for h in handlers:
            logger.removeHandler(h)
    assert "Graceful shutdown of backend failed." in console.getvalue()
    assert "Traceback" not in console.getvalue()
    assert "Traceback" in kept.getvalue() and "ValueError: boom" in kept.getvalue()


def test_a_fit_whose_abort_does_not_take_is_killed_after_the_grace(monkeypatch, tmp_path):
    """Ctrl-C while one fit is done and another ignores Ray Train's abort: the driver waits
    ``ABORT_GRACE_S``, then kills that fit's controller (its workers go with it) and the
    interrupt goes on to the command line, instead of the run training on."""
    import threading

    import backdoor_train.training.fitting as fitting
    from backdoor_train.config import ExperimentConfig
    from backdoor_train.storage import LocalStorage

    class Trainer:
        def __init__(self, finishes: bool) -> None:
            self.finishes, self.killed, self.aborted = finishes, threading.Event(), False

        def fit(self):
            if not self.finishes:
                assert self.killed.wait(30), "never killed"
                raise RuntimeError("the controller died")  # what RayActorError does to fit()
            return type("Result", (), {"checkpoint": object()})()

        def abort(self):
            self.aborted = True  # and nothing happens: the abort does not take
            return None

        def kill(self) -> None:
            self.killed.set()

    trainers = {"clean": Trainer(True), "poisoned": Trainer(False)}
    monkeypatch.setattr(fitting, "check_cluster", lambda cfg, wanted, total=None: 2)
    monkeypatch.setattr(fitting, "make_trainer", lambda cfg, spec, *args: trainers[spec.variant])
    monkeypatch.setattr(fitting, "ABORT_GRACE_S", 0.5)

    def on_done(spec, checkpoint, timing):
        raise KeyboardInterrupt  # Ctrl-C as the first fit ends

    lines: list[str] = []
    specs = [fitting.FitSpec("clean", "", 0), fitting.FitSpec("poisoned", "", 0)]
    with pytest.raises(KeyboardInterrupt):
        fitting.fit_variants(ExperimentConfig.from_dict({"name": "x"}), specs, LocalStorage(str(tmp_path)), "run",
                             on_done, lines.append)
    assert trainers["poisoned"].aborted and trainers["poisoned"].killed.is_set()
    assert not trainers["clean"].killed.is_set()  # it had stopped: nothing to kill
    assert "poisoned: still training 0s after the abort; its controller and workers are killed" in lines
