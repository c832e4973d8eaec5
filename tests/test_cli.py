"""The command line's handling of bad input: a clear message and exit status 2, before Ray."""

from __future__ import annotations

import os
import stat

import pytest
import yaml

from backdoor_train.cli import EXIT_BAD_INPUT, main


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
