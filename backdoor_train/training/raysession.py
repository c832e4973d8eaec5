"""The project's Ray session: starting or joining a cluster, with Ray's settings for Ray's costs.

Two things every command that trains needs from Ray, and that Ray's defaults get wrong here:

* Train V2's controller polls its workers every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (2 s by
  default) and a worker's ``ray.train.report`` waits for that poll, so each epoch's report and
  each fit's end waited up to 2 s. ``TRAIN_ENV`` shortens it; Train propagates these variables
  from the driver to its controller and workers. Checkpoint uploads stay synchronous.
* Train's PlacementGroupCleaner (a detached actor) asks the state API whether the controller
  still lives. Without an address it finds "the" local cluster by itself and, with another Ray
  cluster on the same machine, can ask the wrong one, see the controller missing and remove a
  healthy run's placement group. ``connect`` pins ``RAY_API_SERVER_ADDRESS`` to this cluster's
  own dashboard in the job's runtime environment, which every actor of the job inherits.

And one thing a local cluster needs for safety (Ray's Jobs API and its workers run whatever code
a client sends them, by design): a cluster that ``connect`` starts listens on the loopback
address only, unless the user names another (``--listen``, with a warning), and has Ray's token
authentication on, with a token made for this run that lives only in the environment of the
cluster's own processes (never in a file, never printed).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import sys
from typing import Any, Optional

# Defaults only: a value the user exported wins.
TRAIN_ENV = {
    # Seconds between the controller's polls of its workers: a report waits at most this long.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    # Train V2 routes worker print() through its logger, which echoes each progress line twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # The preemption watcher (an actor per fit, for nodes that are drained) logs an error-level
    # line about its restart arguments on every healthy fit; export 1 on clusters of spot nodes.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
# Read by Ray when it is imported, in the driver that prints the workers' logs. Ray's dedup
# drops every word with a digit before comparing lines, so "[seed-1/clean] epoch 3/10 ..." and
# "[seed-1/poisoned] epoch 3/10 ..." look alike and one variant's progress vanished; the
# project's own lines ("[<name>] ..." / "[<name>/<variant>] ...") are never deduplicated.
DRIVER_ENV = {"RAY_DEDUP_LOGS_ALLOW_REGEX": r"^\[[\w.-]+(/[\w.-]+)?\] "}


LOOPBACK = "127.0.0.1"
# Ray picks a machine's routable address as its node address and then binds its servers (GCS,
# raylet, workers, agents) to it or to every interface; with this set to 0 it takes the loopback
# address instead, as it does on macOS and Windows, and every server binds 127.0.0.1.
LOCAL_ONLY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
AUTH_MODE_ENV, AUTH_TOKEN_ENV = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached, or lacks the resources a config asks for."""


def apply_train_env() -> None:
    """Put ``TRAIN_ENV`` into this process's environment (before a TorchTrainer is built:
    Train reads and propagates the variables when ``fit()`` starts its controller)."""
    for name, value in TRAIN_ENV.items():
        os.environ.setdefault(name, value)


def apply_driver_env() -> None:
    """Put ``DRIVER_ENV`` into this process's environment; before ``import ray`` to count."""
    for name, value in DRIVER_ENV.items():
        os.environ.setdefault(name, value)


def free_port() -> int:
    """A TCP port free on the loopback interface now (a dashboard's, a rendezvous', a test server's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_cluster_env(listen: str) -> dict[str, str]:
    """What a local cluster's processes need in their environment (they inherit the driver's):
    loopback binding unless ``listen`` is another address, and token authentication (unless the
    user exported another ``RAY_AUTH_MODE``: ``connect`` warns then)."""
    env = dict(LOCAL_ONLY_ENV) if listen == LOOPBACK else {}
    if os.environ.get(AUTH_MODE_ENV, "token") == "token":
        env[AUTH_MODE_ENV] = "token"
        if not (os.environ.get(AUTH_TOKEN_ENV) or os.environ.get("RAY_AUTH_TOKEN_PATH")):
            env[AUTH_TOKEN_ENV] = secrets.token_hex(32)  # 256 bits, as Ray's own generator
    return env


def logs_dir() -> Optional[str]:
    """Ray's logs folder of this node's session (None when not connected)."""
    from backdoor_train.training.rayinternals import session_logs_dir

    return session_logs_dir()


def _job_env(api: str) -> dict[str, str]:
    """The job's runtime environment variables: every actor and worker of the job gets them."""
    from backdoor_train.progress import QUIET_ENV
    from backdoor_train.training.failures import DEBUG_ENV

    env = {API_SERVER_ENV: api}
    for name in (DEBUG_ENV, QUIET_ENV):  # --debug and --quiet reach the workers and tasks
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def target_of(address: Optional[str]) -> str:
    """The cluster ``connect`` joins: ``address``, else ``RAY_ADDRESS``, else "local" (a new one)."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


def prepare_local_cluster(listen: str = LOOPBACK) -> None:
    """Put a local cluster's settings into this process's environment. Ray reads them once, when
    it is imported, so this must run before ``import ray``: the CLI calls it as soon as it knows
    that the command starts a cluster; ``connect`` calls it again (then a no-op)."""
    if "ray" not in sys.modules:
        os.environ.update(_local_cluster_env(listen))


def _unsecured_warning(listen: str) -> Optional[str]:
    """Why the local cluster about to start is open to the network, if it is: ``RAY_AUTH_MODE``
    exported as something else, or ray imported before ``prepare_local_cluster`` (a notebook)."""
    from backdoor_train.training.rayinternals import local_cluster_gaps

    if os.environ.get(AUTH_MODE_ENV, "token") != "token":
        return f"{AUTH_MODE_ENV}={os.environ[AUTH_MODE_ENV]} was exported: the local Ray cluster has no token " \
               f"authentication"
    missing = local_cluster_gaps(loopback_only=listen == LOOPBACK)
    if not missing:
        return None
    return (f"ray was imported before backdoor_train.training.raysession.prepare_local_cluster(), so the local Ray "
            f"cluster {' and '.join(missing)}")


def connect(address: Optional[str] = None, num_cpus: Optional[int] = None, log_to_driver: bool = True,
            listen: str = LOOPBACK) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``); without either, start a new local
    one listening on ``listen`` (loopback by default) with token authentication. Does nothing
    when this process is already connected (tests, notebooks). A ``RayVersionError`` (a
    ``ClusterError``) first when the installed Ray is not the one training/rayinternals.py
    was written against."""
    from backdoor_train.training.rayinternals import check_ray_version

    target = target_of(address)
    if target == "local":
        prepare_local_cluster(listen)
    import ray

    check_ray_version()
    if ray.is_initialized():
        return
    if target not in ("local", "auto"):
        probe(target)  # Ray itself retries an unreachable address for minutes
    pinned = os.environ.get(API_SERVER_ENV)
    kwargs: dict[str, Any] = {"log_to_driver": log_to_driver}
    try:
        if target == "local":
            every = ipaddress.ip_address(listen).is_unspecified
            if listen != LOOPBACK:
                print(f"WARNING: the local Ray cluster listens on {listen} (--listen): whoever reaches it "
                      f"and holds its token can run code on this machine", file=sys.stderr)
            unsecured = _unsecured_warning(listen)
            if unsecured:
                print(f"WARNING: {unsecured}: anyone who reaches it can run code on this machine", file=sys.stderr)
            # A dashboard port of our choosing, so that its address is known before the start.
            port = free_port()
            api = pinned or f"http://{LOOPBACK if every else listen}:{port}"
            # 0.0.0.0 is no node address: Ray then advertises the machine's routable one.
            node_ip = {} if every else {"_node_ip_address": listen}
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_port=port,
                     dashboard_host=listen, runtime_env={"env_vars": _job_env(api)}, **node_ip, **kwargs)
            return
        context = ray.init(address=target, **kwargs)
        if pinned is None and context.dashboard_url:
            # The dashboard's address is known only once connected: join again with it pinned.
            ray.shutdown()
            url = context.dashboard_url
            ray.init(address=target, runtime_env={"env_vars": _job_env(url if "://" in url else "http://" + url)},
                     **kwargs)
    except Exception as exc:  # ConnectionError and friends, depending on the address form
        raise ClusterError(f"cannot reach the Ray cluster at {target!r}: {exc}") from None


def probe(address: str, attempts: int = 3, timeout_s: float = 3.0) -> None:
    """A ``ClusterError`` naming ``address`` unless something accepts a TCP connection there
    within ``attempts`` tries of ``timeout_s`` (a head node still starting gets a few seconds)."""
    import time
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else "tcp://" + address)
    try:
        host, port = parts.hostname, parts.port or (10001 if parts.scheme == "ray" else 6379)
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise ClusterError(f"--address {address!r} is not host:port or ray://host:port")
    last: Exception | None = None
    for attempt in range(attempts):
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                return
        except OSError as exc:
            last = exc
            if attempt + 1 < attempts:
                time.sleep(1.0)
    raise ClusterError(f"cannot reach the Ray cluster at {address!r}: nothing answers at {host}:{port} "
                       f"({last}; {attempts} attempts)")


def fits_at_once(demand: dict[str, float], wanted: int, what: str, total: Optional[dict[str, float]] = None) -> int:
    """How many fits of ``demand`` (resources per fit) a cluster of ``total`` resources (default:
    the connected cluster's) runs at once, at most ``wanted``; a ``ClusterError`` naming
    ``what`` when not even one fits."""
    if total is None:
        import ray

        total = ray.cluster_resources()
    slots = wanted
    for name, need in demand.items():
        if need <= 0:
            continue
        have = total.get(name, 0.0)
        if have + 1e-9 < need:
            raise ClusterError(f"{what} asks for {need:g} {name} per model, but the Ray cluster has "
                               f"{have:g} {name} in all")
        slots = min(slots, int((have + 1e-9) // need))
    return max(1, slots)
