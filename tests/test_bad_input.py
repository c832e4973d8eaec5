"""User mistakes found before any training: one clear line naming the file, key or folder, exit 2,
no traceback, nothing written (no Ray needed)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml

from backdoor_train.cli import EXIT_BAD_INPUT, main
from backdoor_train.config import ConfigError, load_config
from backdoor_train.runs.experiment import merge_variants, record_config
from backdoor_train.storage import open_storage
from backdoor_train.runs.sweep import load_sweep

from conftest import small_config
from fake_results import experiment_results, variant


def _run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.err


def _experiment(tmp_path, mnist_path, **extra) -> str:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "exp", "data": {"root": mnist_path},
                                    "storage": {"path": str(tmp_path / "runs")}, **extra}))
    return str(path)


@pytest.mark.parametrize("content, message", [
    (b"\x00\x01\xff\xfe binary", "is not UTF-8 text"),
    ("name: caf\u00e9".encode("latin-1"), "is not UTF-8 text"),
    (b"name: a\nseed: 1\nname: b\n", "line 3: key 'name' is given twice"),
    (b"train: {epochs: 3, epochs: 4}\n", "key 'epochs' is given twice"),
    (b"a: &x [1, 2]\nvariants: *x\n", "line 2: YAML aliases (*name) are not supported"),
    (b"train: {lr: .inf}\n", "train.lr must be a finite number"),
    (b"train: {epochs: 100000000000000000000000000000}\n", "train.epochs is too large"),
    (b"poison: {rate: 1.0e+400}\n", "poison.rate must be a finite number"),
])
def test_config_files_that_would_pass_unnoticed_or_crash(tmp_path, content, message):
    path = tmp_path / "exp.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"{path}.*{_re(message)}|{_re(message)}"):
        load_config(str(path))


def _re(text: str) -> str:
    import re

    return re.escape(text)


def test_a_directory_or_an_override_alias_is_refused(tmp_path, capsys):
    code, err = _run_cli(capsys, "check", str(tmp_path))
    assert code == EXIT_BAD_INPUT and "is a directory, not a YAML file" in err
    path = tmp_path / "exp.yaml"
    path.write_text("name: x\n")
    with pytest.raises(ConfigError, match="override train: .*aliases"):
        load_config(str(path), ["train={a: &x 1, b: *x}"])


def test_sweep_names_become_folders_and_are_checked(tmp_path, mnist_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"data": {"root": mnist_path}}))
    for name in ("../escape", "a\tb", ""):
        (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"name": name, "base": "base.yaml",
                                                             "grid": {"seed": [1]}}))
        with pytest.raises(ConfigError, match="sweep name must be 1-100 characters"):
            load_sweep(str(tmp_path / "sweep.yaml"))
    (tmp_path / "sweep.yaml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="sweep file .* is not UTF-8"):
        load_sweep(str(tmp_path / "sweep.yaml"))


def test_check_catches_what_run_would_refuse(tmp_path, mnist_root, capsys):
    path = _experiment(tmp_path, mnist_root)
    assert _run_cli(capsys, "check", path)[0] == 0
    # A run of another setting under the name.
    cfg = load_config(path)
    record_config(small_config(mnist_root, str(tmp_path / "runs"), name="exp", train={"lr": 0.5}), open_storage(cfg.storage))
    code, err = _run_cli(capsys, "check", path)
    assert code == EXIT_BAD_INPUT and "with a different setting" in err and "train.lr: 0.5 -> 0.001" in err
    # A corrupt record of the earlier run.
    (tmp_path / "runs" / "exp" / "config.json").write_text("{half")
    code, err = _run_cli(capsys, "run", path)
    assert code == EXIT_BAD_INPUT and "exp/config.json is corrupt" in err and "exp/config.json to rerun" in err
    # Corrupt data files.
    root = tmp_path / "mnist"
    shutil.copytree(os.path.join(mnist_root, "MNIST"), root / "MNIST",
                    ignore=shutil.ignore_patterns("*.gz"))
    images = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    os.chmod(images, 0o644)
    images.write_bytes(images.read_bytes()[:1000])
    other = _experiment(tmp_path, str(root), name="fresh")
    code, err = _run_cli(capsys, "check", other)
    assert code == EXIT_BAD_INPUT and "train-images-idx3-ubyte is corrupt" in err


def test_a_refused_run_leaves_the_name_free(tmp_path, mnist_path, capsys, monkeypatch):
    # Refused before Ray (here: bad data) - formerly config.json was written by then, and the
    # fixed rerun was refused as "a different setting".
    path = _experiment(tmp_path, str(tmp_path / "nowhere"))
    code, err = _run_cli(capsys, "run", path)
    assert code == EXIT_BAD_INPUT and "data.root" in err
    assert not (tmp_path / "runs" / "exp").exists()


def test_report_of_corrupt_results_is_one_line(tmp_path, mnist_path, capsys):
    path = _experiment(tmp_path, mnist_path)
    folder = tmp_path / "runs" / "exp"
    folder.mkdir(parents=True)
    for text in ("{not json", "[1, 2]", json.dumps({"variants": {"clean": {}}})):
        (folder / "results.json").write_text(text)
        code, err = _run_cli(capsys, "report", path)
        assert code == EXIT_BAD_INPUT and "runs/exp/" in err and err.count("\n") == 1, err


def test_a_rerun_of_fewer_variants_keeps_the_others_figures(tmp_path, mnist_path):
    cfg = small_config(mnist_path, str(tmp_path / "runs"))
    earlier = experiment_results(cfg, {"clean": (0.99, [0.01]), "poisoned": (0.5, [0.9])}, run_id="r1")
    poisoned = variant(0.98, [0.95])
    merged, kept = merge_variants({"poisoned": poisoned}, earlier)
    assert merged == {"clean": earlier.variants["clean"], "poisoned": poisoned}
    assert list(merged) == ["clean", "poisoned"] and kept == {"clean": "r1"}
    assert merge_variants({"clean": poisoned}, None) == ({"clean": poisoned}, {})
