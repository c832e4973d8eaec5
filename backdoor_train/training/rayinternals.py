"""Every use of Ray's private API, in one module, checked against the Ray it was written for.

The project needs a few things Ray 2.58 offers no public API for; each is here, with what is
missing, so that a Ray upgrade is one module to read and fix. ``check_ray_version`` runs when the
driver connects to Ray (training/raysession.py ``connect``) and before a trainer is built: another
Ray is refused there with one line (exit 2 through the CLI), not a late ``AttributeError`` in a
fit's controller. ``UNCHECKED_RAY_ENV=1`` lets a developer try another Ray anyway (a warning).
tests/test_rayinternals.py fails when another module of the package names Ray's private API.

What is used, and the public API that is missing:

* The fit's controller (``abortable_trainer_class``): ``TrainController`` subclassed, the private
  ``TorchTrainer._initialize_and_run_controller`` (copied, with the constants and
  ``get_env_vars_to_propagate`` it uses and ``ray._raylet.RAY_NODE_ID_KEY``) and
  ``_create_default_callbacks`` overridden, ``DatasetsCallback`` named. Missing: a handle to
  abort a ``fit()`` from another thread (Ray Tune uses the same internals); a way to say how the
  run snapshot is written (Ray rewrites it in place and never retries it: the controller's
  private ``_checkpoint_manager._write_state_to_storage`` is replaced); a switch to start no
  Ray Data actors when a trainer is given no datasets.
* Ray Train's run snapshot (``SNAPSHOT_FILE``, ``read_snapshot``): its file name and its schema
  (``_CheckpointManagerState``). Missing: any API to read or validate a run snapshot.
* Worker logging (``quiet_report_log``, ``TRAIN_ERROR_LOGGER``): Ray logs every report at INFO
  under a logger named after a private file's path, which ``LoggingConfig`` does not reach, and a
  failed training function's traceback under a private module's logger. Missing: log levels for
  them.
* Console handlers (``inner_handlers``): Ray's stderr handler writes through an inner
  ``plain_handler``. Missing: a way to format the console's records without tracebacks.
* A user's exception (``user_exception``): ``UserExceptionWithTraceback._base_exc``. Missing: an
  accessor for the exception a worker's training function raised.
* A checkpoint's place in the run (``checkpoint_destination``): ``TrainContext.get_storage()`` is
  a DeveloperAPI that returns the private ``StorageContext``. Missing: a checkpoint's path and
  filesystem by name (for ``checkpoint_upload_fn`` and loading a named checkpoint).
* The session (``session_logs_dir``, ``local_cluster_gaps``): ``ray._private.worker._global_node``
  for the logs folder, ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` and
  ``ray._raylet.get_authentication_mode`` for how a local cluster binds and authenticates.
  Missing: the session's folders, and the settings a local cluster starts with.
* DDP's rendezvous (``torch_backend_class``): ``ray.train.torch.config._TorchBackend``, subclassed
  by training/rendezvous.py. Missing: a hook that runs on every worker before its process group
  is set up.

This module imports no Ray at import time: the CLI imports it (through training/failures.py)
before raysession.prepare_local_cluster, which must run before ``import ray``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

from backdoor_train.config import StorageConfig
from backdoor_train.training.raysession import ClusterError

RAY_VERSION = "2.58.0"  # the Ray this module was written against (constraints.txt pins it)
UNCHECKED_RAY_ENV = "BACKDOOR_TRAIN_UNCHECKED_RAY"

# Ray Train's run snapshot beside a run's checkpoints (ray.train.v2's CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
# Ray Train's worker logs a failed training function as "Error in training function:\n<traceback>".
TRAIN_ERROR_LOGGER = "ray.train.v2._internal.util"


class RayVersionError(ClusterError):
    """The installed Ray is not the one this module was written against (exit 2)."""


def check_ray_version(installed: Optional[str] = None) -> None:
    """A ``RayVersionError`` naming both versions unless the installed Ray (``installed``,
    default ``ray.__version__``) is ``RAY_VERSION``; with ``UNCHECKED_RAY_ENV`` set, a warning."""
    if installed is None:
        import ray

        installed = ray.__version__
    if installed == RAY_VERSION:
        return
    what = (f"Ray {installed} is installed, but backdoor-train was written against Ray {RAY_VERSION}'s private "
            f"API (backdoor_train/training/rayinternals.py)")
    if os.environ.get(UNCHECKED_RAY_ENV, "") not in ("", "0"):
        print(f"WARNING: {what}; {UNCHECKED_RAY_ENV} is set, so it runs unchecked", file=sys.stderr, flush=True)
        return
    raise RayVersionError(f"{what}: install ray=={RAY_VERSION} (constraints.txt), or set {UNCHECKED_RAY_ENV}=1 "
                          f"to try this Ray anyway")


# --- the fit's controller -----------------------------------------------------------------------

def abortable_trainer_class(write_snapshot: Callable[[Any, str, str, float], None],
                            on_controller_start: Callable[[], None]) -> type:
    """TorchTrainer that keeps a handle on its controller actor, so another thread can abort it
    (``abort()``), whose controller writes the run snapshot with ``write_snapshot(filesystem,
    path, text, retry_seconds)`` and calls ``on_controller_start()`` once Ray Train's loggers
    exist, and that starts no Ray Data actors when it is given no Ray Datasets. Set the class
    attribute ``retry_seconds`` on an instance before ``fit()``.

    ``_initialize_and_run_controller`` is Ray 2.58's with the handle kept and the controller class
    replaced; it registers no SIGINT handler (not allowed off the main thread, and the driver
    aborts every fit on Ctrl-C itself)."""
    check_ray_version()
    import ray
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.constants import (DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
                                                   RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR,
                                                   get_env_vars_to_propagate)
    from ray.train.v2._internal.execution.controller import TrainController

    class DurableTrainController(TrainController):
        def __init__(self, *args: Any, retry_seconds: float, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            on_controller_start()
            manager = self._checkpoint_manager
            # Ray rewrites the snapshot in place (a full disk leaves 0 bytes, which no later start
            # can parse) and treats an error writing it as a controller failure, never retried:
            # a storage outage of seconds would end the run.
            manager._write_state_to_storage = lambda: write_snapshot(
                manager._storage_context.storage_filesystem,
                manager._storage_context.checkpoint_manager_snapshot_path, manager._save_state(), retry_seconds)

    class AbortableTorchTrainer(TorchTrainer):
        controller: Any = None
        aborted = False
        retry_seconds = StorageConfig.retry_seconds  # set by fitting.make_trainer

        def _create_default_callbacks(self) -> list[Any]:
            # The workers read tensors, not Ray Datasets; the datasets callback would still
            # start a DatasetManager actor per fit: a process and ~2 s of CPU (measured on 2
            # cores) on the path to the first epoch.
            callbacks = super()._create_default_callbacks()
            if not self.datasets:
                callbacks = [cb for cb in callbacks if not isinstance(cb, DatasetsCallback)]
            return callbacks

        def _initialize_and_run_controller(self, **controller_init_kwargs: Any) -> Any:
            env_vars = get_env_vars_to_propagate()
            env_vars.setdefault(RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR,
                                DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
            controller_cls = ray.remote(
                num_cpus=0,
                label_selector={ray._raylet.RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()},
                runtime_env={"env_vars": env_vars},
            )(DurableTrainController)
            self.controller = controller_cls.remote(retry_seconds=self.retry_seconds, **controller_init_kwargs)
            if self.aborted:  # abort() ran between fit()'s start and the controller's creation
                self.abort()
            ray.get(self.controller.run.remote())
            return ray.get(self.controller.get_result.remote())

        def abort(self) -> Any:
            """Ask the controller to abort; the reply's ref, None before the controller exists."""
            self.aborted = True
            return self.controller.abort.remote() if self.controller is not None else None

        def kill(self) -> None:
            """Kill the controller, and with it the worker group it owns: for an abort that did
            not take (``fit()`` then raises ``RayActorError``)."""
            if self.controller is not None:
                ray.kill(self.controller, no_restart=True)

    return AbortableTorchTrainer


# --- Ray Train's run snapshot ---------------------------------------------------------------------

@dataclass(frozen=True)
class RaySnapshot:
    """What a run snapshot says: the Ray that wrote it, the checkpoints it lists (folder names)
    and the latest of them (None: none)."""

    ray_version: Optional[str]
    checkpoint_dir_names: tuple[str, ...]
    latest: Optional[str]


def read_snapshot(data: bytes) -> RaySnapshot:
    """The snapshot ``data``, parsed with the schema Ray loads it with; ``ValueError`` when Ray
    could not parse it."""
    import json

    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

    try:
        doc = json.loads(data.decode("utf-8"))
        state = _CheckpointManagerState.model_validate(doc)
    except Exception as exc:
        raise ValueError(f"not a run snapshot Ray can parse: {type(exc).__name__}") from None
    latest = state.latest_checkpoint_result
    return RaySnapshot(doc.get("ray_version"), tuple(r.checkpoint_dir_name for r in state.checkpoint_results),
                       latest.checkpoint_dir_name if latest else None)


# --- in a Train worker ----------------------------------------------------------------------------

def quiet_report_log() -> None:
    """Ray 2.58 logs every report at INFO under a logger named after its file path, which
    LoggingConfig's level filter (it matches "ray.train.*" names) does not reach: WARNING."""
    import logging

    import ray.train.v2._internal.execution.context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def checkpoint_destination(dir_name: str) -> tuple[Any, str]:
    """In a Train worker: (pyarrow filesystem, path) of checkpoint ``dir_name`` of this run."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    return storage.storage_filesystem, storage.build_checkpoint_path_from_name(dir_name)


def user_exception(exc: BaseException) -> Optional[BaseException]:
    """The exception a training function raised, if ``exc`` is Train's wrapper of one."""
    inner = getattr(exc, "_base_exc", None)  # UserExceptionWithTraceback
    return inner if isinstance(inner, BaseException) else None


def inner_handlers(handler: Any) -> list[Any]:
    """``handler`` and the handler it writes through, if it is Ray's stderr handler (a worker
    process's, ``PlainRayHandler``, writes through its ``plain_handler``)."""
    inner = getattr(handler, "plain_handler", None)
    return [handler] if inner is None else [handler, inner]


# --- the session ----------------------------------------------------------------------------------

def session_logs_dir() -> Optional[str]:
    """Ray's logs folder of this node's session (None when not connected)."""
    import ray

    node = ray._private.worker._global_node
    return node.get_logs_dir_path() if node is not None else None


def local_cluster_gaps(loopback_only: bool) -> list[str]:
    """What a local cluster that this process starts lacks of the safety ``connect`` asked for,
    as Ray read its settings when it was imported: listening on loopback only (when
    ``loopback_only``), token authentication."""
    from ray._private import ray_constants
    from ray._raylet import AuthenticationMode, get_authentication_mode

    missing = []
    if loopback_only and ray_constants.ENABLE_RAY_CLUSTER:
        missing.append("listens on every interface")
    if get_authentication_mode() != AuthenticationMode.TOKEN:
        missing.append("has no token authentication")
    return missing


# --- DDP's rendezvous -----------------------------------------------------------------------------

def torch_backend_class() -> type:
    """The backend class of Ray's ``TorchConfig`` (training/rendezvous.py subclasses it)."""
    from ray.train.torch.config import _TorchBackend

    return _TorchBackend
