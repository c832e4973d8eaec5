"""Ray's private API in one module (training/rayinternals.py): another Ray is refused at start-up with
one line (exit 2), every private name the module uses exists in the installed Ray, and no other
module of the package names Ray's private API (read from the source, like test_layering.py)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import package_files

from backdoor_train.training import rayinternals
from backdoor_train.training.rayinternals import RAY_VERSION, UNCHECKED_RAY_ENV, RayVersionError, check_ray_version
from backdoor_train.training.raysession import ClusterError

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "backdoor_train")
OWNER = os.path.join("training", "rayinternals.py")

# Ray's private API, as it can be written: a module or attribute below ray whose name starts
# with "_" (ray._private, ray._raylet, ray.train.v2._internal), a private name imported from
# ray, and the private attributes of Ray's objects that rayinternals.py uses.
PRIVATE_PATH = re.compile(r"\bray(\.\w+)*\._[A-Za-z0-9]|\._internal\b|\b_raylet\b")
PRIVATE_ATTRIBUTES = ("_checkpoint_manager", "_storage_context", "_write_state_to_storage", "_save_state",
                      "_CheckpointManagerState", "_create_default_callbacks", "_initialize_and_run_controller",
                      "_base_exc", "plain_handler", "_global_node", "get_storage", "build_checkpoint_path_from_name",
                      "checkpoint_manager_snapshot_path", "ENABLE_RAY_CLUSTER", "get_authentication_mode",
                      "_TorchBackend")


def test_the_ray_it_was_written_against_passes(monkeypatch):
    import ray

    monkeypatch.delenv(UNCHECKED_RAY_ENV, raising=False)
    assert ray.__version__ == RAY_VERSION, "constraints.txt and rayinternals.RAY_VERSION disagree"
    check_ray_version()


def test_another_ray_is_refused_naming_both_versions(monkeypatch):
    import ray

    monkeypatch.delenv(UNCHECKED_RAY_ENV, raising=False)
    monkeypatch.setattr(ray, "__version__", "2.59.0")
    with pytest.raises(RayVersionError) as caught:
        check_ray_version()
    text = str(caught.value)
    assert "Ray 2.59.0 is installed" in text and f"Ray {RAY_VERSION}'s private API" in text
    assert f"install ray=={RAY_VERSION}" in text and f"{UNCHECKED_RAY_ENV}=1" in text and "\n" not in text
    assert isinstance(caught.value, ClusterError)  # the CLI's bad input: exit 2


def test_the_override_runs_another_ray_with_a_warning(monkeypatch, capsys):
    monkeypatch.setenv(UNCHECKED_RAY_ENV, "1")
    check_ray_version("2.59.0")
    assert "WARNING: Ray 2.59.0 is installed" in capsys.readouterr().err
    monkeypatch.setenv(UNCHECKED_RAY_ENV, "0")  # 0 is off
    with pytest.raises(RayVersionError):
        check_ray_version("2.59.0")


def test_the_cli_refuses_another_ray_before_connecting_with_exit_2(tmp_path, monkeypatch, capsys):
    import ray

    from backdoor_train import cli

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init was called with an unsupported Ray")

    monkeypatch.delenv(UNCHECKED_RAY_ENV, raising=False)
    monkeypatch.setattr(ray, "__version__", "3.0.0")
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cli, "_preflight", lambda cfg, **kwargs: cfg)  # no data or storage needed here
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "exp"}))
    assert cli.main(["run", str(path), "--address", "auto"]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("backdoor-train: error: Ray 3.0.0 is installed, but "), err
    assert f"Ray {RAY_VERSION}" in err and UNCHECKED_RAY_ENV in err


def test_the_module_imports_no_ray():
    # The CLI imports it (through training/failures.py) before prepare_local_cluster, which
    # must run before ray is imported.
    code = "import sys, backdoor_train.training.rayinternals; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(PACKAGE))
    assert out.stdout.strip() == "False", out


def test_every_private_name_it_uses_is_in_the_installed_ray():
    """A canary for an upgrade: what rayinternals.py reaches into, looked up without a cluster."""
    import ray
    import ray.train.v2._internal.constants as constants
    from ray._private import log, ray_constants
    from ray._raylet import AuthenticationMode, get_authentication_mode  # noqa: F401
    from ray.train.torch import TorchTrainer
    from ray.train.torch.config import _TorchBackend  # noqa: F401
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback  # noqa: F401
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
    from ray.train.v2._internal.execution.controller import TrainController
    from ray.train.v2._internal.execution.storage import StorageContext

    from conftest import ray_snapshot

    assert constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME == rayinternals.SNAPSHOT_FILE
    for name in ("DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE", "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR",
                 "get_env_vars_to_propagate"):
        assert hasattr(constants, name), name
    assert isinstance(ray._raylet.RAY_NODE_ID_KEY, str) and hasattr(ray._private.worker, "_global_node")
    assert hasattr(ray_constants, "ENABLE_RAY_CLUSTER")
    for owner, name in ((TorchTrainer, "_initialize_and_run_controller"), (TorchTrainer, "_create_default_callbacks"),
                        (TrainController, "__init__"), (TrainController, "abort"), (TrainController, "get_result"),
                        (CheckpointManager, "_write_state_to_storage"), (CheckpointManager, "_save_state"),
                        (StorageContext, "build_checkpoint_path_from_name"),
                        (StorageContext, "checkpoint_manager_snapshot_path")):
        assert hasattr(owner, name), f"{owner.__name__}.{name}"
    boom = ValueError("boom")
    assert rayinternals.user_exception(UserExceptionWithTraceback(boom, "Traceback")) is boom
    assert rayinternals.user_exception(boom) is None
    assert len(rayinternals.inner_handlers(log.PlainRayHandler())) == 2
    assert rayinternals.torch_backend_class().__name__ == "_TorchBackend"
    snapshot = rayinternals.read_snapshot(ray_snapshot("checkpoint_epoch_0001", "checkpoint_epoch_0002").encode())
    assert snapshot == rayinternals.RaySnapshot(RAY_VERSION, ("checkpoint_epoch_0001", "checkpoint_epoch_0002"),
                                                "checkpoint_epoch_0002")
    with pytest.raises(ValueError):
        rayinternals.read_snapshot(b'{"hello": 1}')


def _private_uses(path: str) -> list[str]:
    source = open(path, encoding="utf-8").read()
    found = [f"line {source.count(chr(10), 0, m.start()) + 1}: {m.group(0)}" for m in PRIVATE_PATH.finditer(source)]
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ray":
            found += [f"line {node.lineno}: from {node.module} import {a.name}" for a in node.names
                      if a.name.startswith("_")]
        elif isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRIBUTES:
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in PRIVATE_ATTRIBUTES:
            found.append(f"line {node.lineno}: {node.value!r}")
    return found


def test_no_other_module_names_rays_private_api():
    uses = [f"{module} {use}" for module, path in package_files(PACKAGE).items() if module != OWNER
            for use in _private_uses(path)]
    assert not uses, "Ray's private API outside training/rayinternals.py: " + "; ".join(sorted(uses))
    assert _private_uses(os.path.join(PACKAGE, OWNER)), "the scan finds nothing in the module that has it all"


@pytest.mark.parametrize("planted", [
    "import ray._private.worker\n",
    "from ray.train.torch.config import _TorchBackend\n",
    "def f(ray):\n    return ray._raylet.RAY_NODE_ID_KEY\n",
    "LOGGER = 'ray.train.v2._internal.util'\n",
    "def f(manager):\n    return manager._checkpoint_manager\n",
    "def f(exc):\n    return getattr(exc, '_base_exc', None)\n",
    "def f(ctx):\n    return ctx.get_storage()\n",
])
def test_a_private_use_elsewhere_is_caught(tmp_path, monkeypatch, planted):
    """The rule can fail: a planted use in another module is reported."""
    package = tmp_path / "backdoor_train"
    (package / "training").mkdir(parents=True)
    (package / OWNER).write_text("import ray._private\n")
    (package / "runs").mkdir()
    (package / "runs" / "planted.py").write_text(planted)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", str(package))
    with pytest.raises(AssertionError, match=re.escape(os.path.join("runs", "planted.py"))):
        test_no_other_module_names_rays_private_api()
