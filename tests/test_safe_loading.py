"""Nothing storage hands back can run code (storage.safeload.safe_torch_load): planted pickles in a
checkpoint (with a matching checksum) and in a model file are refused unread, naming the file;
checkpoints of earlier releases load through the same safe path; names are a safe set."""

from __future__ import annotations

import hashlib
import io
import os
import random
import sys

import numpy as np
import pytest
import torch
import yaml

from backdoor_train.storage.safeload import CorruptCheckpointError, UnsafeCheckpointError
from backdoor_train.training.checkpoint import (CHECKSUM_FILE, STATE_FILE, checkpoint_dir_name, load_state, rng_state,
                                                save_state, set_rng_state, state_from_bytes)
from backdoor_train.cli import EXIT_BAD_INPUT, main
from backdoor_train.config import ConfigError, ExperimentConfig, check_name
from backdoor_train.models.registry import build_model
from backdoor_train.training.resume import plan_resume
from backdoor_train.storage.runstore import RunStore
from backdoor_train.storage import LocalStorage


class _RunsCommand:
    """A pickle that, when unpickled by a full unpickler, runs a shell command creating ``marker``
    (with this Python, so that the unit tests need no other program)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"{sys.executable} -c \"open('{self.marker}', 'w').close()\"",)


def _malicious_state(marker: str) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": _RunsCommand(marker), "optimizer": {}, "epochs_done": 1, "rng": {}, "history": []}, buf)
    return buf.getvalue()


def _plant_checkpoint(folder: str, data: bytes) -> None:
    """A checkpoint as an attacker with write access to the bucket writes it: checksum included."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, STATE_FILE), "wb") as fh:
        fh.write(data)
    with open(os.path.join(folder, CHECKSUM_FILE), "w") as fh:
        fh.write(hashlib.sha256(data).hexdigest() + "\n")


def _small_state_dir(directory: str, epochs_done: int = 1) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()  # Adam's state: tensors and a step count
    os.makedirs(directory, exist_ok=True)
    save_state(directory, model=model, optimizer=optimizer, epochs_done=epochs_done,
               history=[{"epoch": 1, "loss": 0.5, "per_class": [0.9, 0.8]}])


def test_a_planted_checkpoint_with_its_checksum_is_refused_unread(tmp_path):
    marker = tmp_path / "ran"
    folder = str(tmp_path / "ckpt")
    _plant_checkpoint(folder, _malicious_state(str(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"ckpt/state.pt: refused unread.*posix.system"):
        load_state(folder)
    assert not marker.exists(), "the pickle ran its command"
    # The same bytes under torch's full unpickler do run it: the test's pickle is real.
    torch.load(os.path.join(folder, STATE_FILE), weights_only=False)
    assert marker.exists()


def test_the_driver_refuses_a_planted_checkpoint_and_never_falls_back_past_it(tmp_path):
    storage = LocalStorage(str(tmp_path))
    prefix = "exp/poisoned"
    _small_state_dir(storage.path_of(f"{prefix}/{checkpoint_dir_name(1)}"))
    marker = tmp_path / "ran"
    _plant_checkpoint(storage.path_of(f"{prefix}/{checkpoint_dir_name(2)}"), _malicious_state(str(marker)))
    said: list[str] = []
    with pytest.raises(UnsafeCheckpointError, match=r"exp/poisoned/checkpoint_epoch_0002/state.pt: refused unread"):
        plan_resume(storage, prefix, said.append)
    assert not marker.exists() and not said  # refused, not "falling back to the previous checkpoint"


def test_a_checkpoint_holds_only_what_torchs_own_safe_loader_reads(tmp_path):
    _small_state_dir(str(tmp_path))
    # Plain torch.load(weights_only=True), no allowlist of ours: the format itself is safe.
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert set(state) == {"model", "optimizer", "epochs_done", "rng", "history"}
    assert isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)
    assert state["history"] == [{"epoch": 1, "loss": 0.5, "per_class": [0.9, 0.8]}]


def test_the_rng_state_round_trips_through_the_safe_format():
    np.random.seed(7), random.seed(7), torch.manual_seed(7)
    np.random.randn()  # a cached Gaussian in numpy's state
    buf = io.BytesIO()
    torch.save({"rng": rng_state()}, buf)
    expected = (np.random.rand(5), random.random(), torch.rand(3))
    set_rng_state(torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["rng"])
    again = (np.random.rand(5), random.random(), torch.rand(3))
    assert np.array_equal(expected[0], again[0]) and expected[1] == again[1] and torch.equal(expected[2], again[2])


def test_a_checkpoint_of_an_earlier_release_loads_through_the_safe_path(tmp_path):
    """Earlier releases pickled numpy's RNG state as an ndarray (``np.random.get_state()``)."""
    model = torch.nn.Linear(3, 2)
    np.random.seed(3)
    old_numpy = np.random.get_state()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict(),
                "epochs_done": 4, "rng": {"torch": torch.get_rng_state(), "numpy": old_numpy,
                                          "python": random.getstate()}, "history": []}, buf)
    with pytest.raises(Exception):  # what needs our allowlist: numpy's reconstruction
        torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    state = state_from_bytes(buf.getvalue())
    assert state["epochs_done"] == 4
    expected = np.random.rand(4)
    set_rng_state(state["rng"])
    assert np.array_equal(np.random.rand(4), expected)


@pytest.mark.parametrize("payload", [
    b"\x80\x02cnumpy.testing._private.utils\nrunstring\nq\x00.",  # a numpy global that executes code
    b"cos\nsystem\n(S'true'\ntR.",  # protocol 0 os.system
    b"\x80\x02cbuiltins\neval\nq\x00.",
])
def test_the_allowlist_admits_no_other_global(payload):
    buf = io.BytesIO()
    with __import__("zipfile").ZipFile(buf, "w") as zf:  # torch's zip layout around the pickle
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")
        zf.writestr("archive/byteorder", "little")
    with pytest.raises(UnsafeCheckpointError, match="refused unread"):
        state_from_bytes(buf.getvalue(), where="s3://bucket/x/state.pt")


def test_garbage_and_foreign_files_are_corrupt_not_unsafe(tmp_path):
    with pytest.raises(CorruptCheckpointError, match="x/state.pt: unreadable") as info:
        state_from_bytes(b"not a torch file", where="x/state.pt")
    assert not isinstance(info.value, UnsafeCheckpointError)
    buf = io.BytesIO()
    torch.save({"weights": torch.zeros(2)}, buf)
    with pytest.raises(CorruptCheckpointError, match="not a checkpoint of this product"):
        state_from_bytes(buf.getvalue(), where="x/state.pt")


def test_a_planted_model_file_is_refused_unread(tmp_path):
    storage = LocalStorage(str(tmp_path))
    store = RunStore(storage, "exp")
    cfg = ExperimentConfig()
    store.write_model("poisoned", build_model(cfg.model.arch, cfg.dataset))
    assert store.read_model("poisoned", cfg) is not None
    marker = tmp_path / "ran"
    buf = io.BytesIO()
    torch.save({"conv1.weight": _RunsCommand(str(marker))}, buf)
    storage.write_bytes("exp/poisoned/model.pt", buf.getvalue())
    with pytest.raises(UnsafeCheckpointError, match=r"exp/poisoned/model.pt: refused unread"):
        store.read_model("poisoned", cfg)
    assert not marker.exists()


def test_run_and_check_stop_with_exit_2_naming_the_planted_file(tmp_path, mnist_root, capsys):
    runs = tmp_path / "runs"
    marker = tmp_path / "ran"
    planted = runs / "exp" / "poisoned" / checkpoint_dir_name(1)
    _plant_checkpoint(str(planted), _malicious_state(str(marker)))
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "exp", "data": {"root": mnist_root, "train_samples": 600},
                                    "storage": {"path": str(runs)}}))
    for command in ("check", "run"):
        code = main([command, str(path)])
        err = capsys.readouterr().err
        assert code == EXIT_BAD_INPUT, err
        assert f"{planted}/state.pt: refused unread" in err and err.count("\n") == 1 and "Traceback" not in err
        assert not marker.exists()
    assert not (runs / "exp" / "config.json").exists()  # refused before training: nothing written


@pytest.mark.parametrize("name", ["nl\n", "a/b", "../up", ".hidden", "-flag", "spa ce", "tab\t", "é", "x" * 101, ""])
def test_names_are_a_safe_character_set(name):
    with pytest.raises(ConfigError, match="name must be 1-100 characters"):
        check_name(name, "name")
    with pytest.raises(ConfigError, match="^name must be"):
        ExperimentConfig.from_dict({"name": name})
