"""The command line: bad input (a clear message and exit status 2, before Ray), and what it prints
where (help, --version, results on stdout and everything else on stderr, --json, report's files)."""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import subprocess
import sys

import numpy as np
import pytest
import yaml

from backdoor_train.cli import EXIT_BAD_INPUT, main

from conftest import REPO_ROOT, small_config


def _write(tmp_path, data) -> str:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("command", ["check", "run"])
def test_bad_config_value_exits_2_naming_the_key(tmp_path, capsys, mnist_path, command, no_ray):
    path = _write(tmp_path, {"data": {"root": mnist_path}, "poison": {"rate": 3}})
    assert main([command, path]) == EXIT_BAD_INPUT
    assert "poison.rate must be in [0, 1]" in capsys.readouterr().err


@pytest.fixture
def no_ray(monkeypatch):
    """Bad input must be refused before any Ray work starts."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init was called on bad input")

    monkeypatch.setattr(ray, "init", refuse)


def test_missing_data_root_exits_2(tmp_path, capsys, no_ray):
    path = _write(tmp_path, {"data": {"root": str(tmp_path / "no-mnist")}})
    assert main(["run", path]) == EXIT_BAD_INPUT
    assert "data.root" in capsys.readouterr().err


def test_unwritable_storage_exits_2(tmp_path, capsys, mnist_root, no_ray):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.access(locked, os.W_OK):  # root ignores permissions
        target = tmp_path / "a-file"
        target.write_text("")
        storage = str(target / "runs")
    else:
        storage = str(locked / "runs")
    path = _write(tmp_path, {"data": {"root": mnist_root}, "storage": {"path": storage}})
    assert main(["run", path]) == EXIT_BAD_INPUT
    assert "storage.path: cannot write" in capsys.readouterr().err


def test_missing_config_file_and_bad_override(tmp_path, capsys, mnist_root):
    assert main(["check", str(tmp_path / "nope.yaml")]) == EXIT_BAD_INPUT
    assert "config file not found" in capsys.readouterr().err
    path = _write(tmp_path, {"data": {"root": mnist_root}})
    assert main(["check", path, "--set", "scaling.num_workers=0"]) == EXIT_BAD_INPUT
    assert "scaling.num_workers must be > 0" in capsys.readouterr().err
    assert main(["check", path]) == 0


# --- what a command prints where: results on stdout, everything else on stderr -------------------

def _parsers():
    """The top-level parser and each subcommand's."""
    from backdoor_train.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, dict(sub.choices)


def test_help_has_no_markup_and_each_seeds_option_says_what_it_does_there():
    parser, subs = _parsers()
    for name, p in [("backdoor-train", parser), *subs.items()]:
        text = p.format_help()
        assert not re.search(r"``|:(func|class|mod|meth):`", text), (name, text)
    assert "exit status" in parser.format_help().lower()

    def seeds_help(command):
        (action,) = [a for a in subs[command]._actions if "--seeds" in a.option_strings]
        return action.help

    assert seeds_help("run").startswith("run the experiment once per seed")
    assert seeds_help("check").startswith("check the experiment as `run --seeds LIST` would run it")
    assert "the report covers the seeds the run finished" in seeds_help("report")
    for command in ("run", "check", "sweep", "detect", "report", "stage-data"):
        assert "--json" in subs[command].format_help(), command


def test_version_names_the_package_torch_ray_and_python(capsys):
    import platform
    from importlib import metadata

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == (f"backdoor-train {metadata.version('backdoor-train')} (torch {metadata.version('torch')}, "
                   f"ray {metadata.version('ray')}, Python {platform.python_version()})")


def test_a_failure_with_json_is_one_document_too(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nope.yaml"), "--json"]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"ok": False, "exit_status": EXIT_BAD_INPUT,
                                        "error": f"config file not found: {tmp_path / 'nope.yaml'}"}
    assert captured.err == f"backdoor-train: error: config file not found: {tmp_path / 'nope.yaml'}\n"


def test_ctrl_c_promises_a_resume_only_where_there_are_checkpoints(monkeypatch, capsys):
    from backdoor_train import cli

    def interrupted(args):
        raise KeyboardInterrupt

    for command in ("run", "report"):
        monkeypatch.setitem(cli.COMMANDS, command, interrupted)
    assert main(["report", "x.yaml"]) == cli.EXIT_INTERRUPTED
    assert capsys.readouterr().err == "backdoor-train: interrupted\n"
    assert main(["run", "x.yaml", "--address", "auto"]) == cli.EXIT_INTERRUPTED
    assert capsys.readouterr().err == ("backdoor-train: interrupted; rerun the same command to resume from the last "
                                       "checkpoints\n")


# A command of the real process: everything a command, a library, Ray's log forwarding (a print
# to sys.stdout), a child process (Ray's own, inheriting descriptor 1) or an exit handler (Ray's
# shutdown) writes goes to stderr; stdout holds the results alone.
_NOISY_COMMAND = """
import atexit, os, subprocess, sys
from backdoor_train import cli

def noisy(args):
    cli._say("a progress line")
    print("a forwarded worker line")
    os.write(1, b"a line written to descriptor 1\\n")
    subprocess.run(["echo", "a child process's line"], check=True)
    atexit.register(print, "a line printed at exit")
    cli._print_json({"answer": 42})
    return 0

cli.COMMANDS["check"] = noisy
sys.exit(cli.main())
"""


def test_stdout_holds_the_results_alone(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _NOISY_COMMAND, "check", "x.yaml", "--json"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"answer": 42}
    for line in ("backdoor-train: a progress line", "a forwarded worker line", "a line written to descriptor 1",
                 "a child process's line", "a line printed at exit"):
        assert line in proc.stderr, (line, proc.stderr)


def _cifar10_config(tmp_path) -> list[str]:
    """jobs/cifar10_badnets.yaml on a small CIFAR-10 copy in the official format (no download)."""
    from backdoor_train.data.cifar10 import META_FILE, TEST_FILE, TRAIN_FILES
    from cifar10_files import write_batch, write_meta

    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in TRAIN_FILES + (TEST_FILE,):
        write_batch(str(folder / name), rng.integers(0, 256, (20, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 20))
    write_meta(str(folder / META_FILE))
    return [os.path.join(REPO_ROOT, "jobs", "cifar10_badnets.yaml"), "--set", f"data.root={tmp_path / 'cifar'}",
            "--set", "data.download=false", "--set", f"storage.path={tmp_path / 'runs'}"]


def test_check_json_is_its_verdict(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "backdoor_train", "check", *_cifar10_config(tmp_path), "--seeds", "1-2",
                           "--json"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    verdict = json.loads(proc.stdout)
    assert verdict == {"ok": True, "config": os.path.join(REPO_ROOT, "jobs", "cifar10_badnets.yaml"),
                       "name": "cifar10-badnets", "variants": ["clean", "poisoned"], "seeds": [1, 2]}
    assert not list((tmp_path / "runs").rglob("*"))  # check writes nothing (it made sure it could)


def _finished_run(tmp_path, mnist_path, monkeypatch) -> str:
    """An experiment 'done' with results and models in local storage; its config file's path."""
    from backdoor_train.config import ExperimentConfig
    from backdoor_train.data.mnist import MNIST
    from backdoor_train.models.registry import build_model
    from backdoor_train.storage import LocalStorage
    from backdoor_train.storage.runstore import RunStore
    from fake_results import experiment_results

    cfg = ExperimentConfig.from_dict({"name": "done", "data": {"root": mnist_path},
                                      "storage": {"path": str(tmp_path / "runs")}})
    store = RunStore(LocalStorage(str(tmp_path / "runs")), "done")
    store.write_results(experiment_results(cfg, {"clean": (0.98, [0.01, 0.01]), "poisoned": (0.97, [0.4, 0.99])}))
    for v in ("clean", "poisoned"):
        store.write_model(v, build_model("article_cnn", MNIST))
    # Example images need the data: left out here.
    monkeypatch.setattr("backdoor_train.reporting.html._examples", lambda cfg, models: "<p>examples</p>")
    path = tmp_path / "done.yaml"
    path.write_text(yaml.safe_dump({"name": "done", "data": {"root": mnist_path},
                                    "storage": {"path": str(tmp_path / "runs")}}))
    return str(path)


def test_report_writes_where_told_and_into_the_run_only_under_its_lock(tmp_path, mnist_path, monkeypatch, capsys):
    from backdoor_train.storage import LocalStorage
    from backdoor_train.storage.runlock import run_lock

    path = _finished_run(tmp_path, mnist_path, monkeypatch)
    stored = tmp_path / "runs" / "done" / "report.html"
    monkeypatch.chdir(tmp_path)
    assert main(["report", path, "--json"]) == 0  # default: <name>-report.html here, nothing in the run
    captured = capsys.readouterr()
    local = tmp_path / "done-report.html"
    assert json.loads(captured.out) == {"name": "done", "written": [str(local)],
                                        "bytes": len(local.read_text().encode())}
    assert f"backdoor-train: report written to {local}" in captured.err and not stored.exists()

    # Into the run: refused while the run's lock is held (nothing written), else written under it.
    elsewhere = tmp_path / "elsewhere.html"
    with run_lock(LocalStorage(str(tmp_path / "runs")), "done", "another-run"):
        assert main(["report", path, "--out", str(elsewhere), "--save-to-run"]) == EXIT_BAD_INPUT
    assert "is being run right now" in capsys.readouterr().err
    assert not elsewhere.exists() and not stored.exists()
    assert main(["report", path, "--out", str(elsewhere), "--save-to-run"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and stored.read_text() == elsewhere.read_text()
    assert f"report written to {elsewhere}" in captured.err and f"report stored with the run: {stored}" in captured.err

    # A run that never ran: refused before its lock would make a folder for it.
    assert main(["report", path, "--set", "name=never", "--save-to-run"]) == EXIT_BAD_INPUT
    assert "(has" in capsys.readouterr().err and not (tmp_path / "runs" / "never").exists()


def test_run_json_is_one_document_with_the_logs_on_stderr(tmp_path, mnist_root):
    """`backdoor-train run --json` in its own process and local Ray: `json.loads(stdout)` works."""
    cfg = small_config(mnist_root, str(tmp_path / "runs"), name="tiny-json", train={"epochs": 1},
                       data={"train_samples": 1000, "test_samples": 500}, scaling={"num_workers": 1})
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "backdoor_train", "run", str(path), "--json"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout)
    assert results["experiment"] == "tiny-json" and set(results["variants"]) == {"clean", "poisoned"}
    assert results["results_uri"].endswith("tiny-json/results.json")
    # The workers' progress lines (forwarded by Ray) and the driver's own lines are on stderr.
    assert "[tiny-json/poisoned] epoch 1/1" in proc.stderr and "backdoor-train: " in proc.stderr
