"""Shared fixtures: the real MNIST copy and small configs built on it, a real S3 API.

A test that uses real MNIST, moto_server or Ray (through the fixtures below) is marked
``integration`` here, so ``pytest -m "not integration"`` runs the pure unit tests alone,
without the MNIST files or any system binary (promtool, prometheus, kubectl)."""

from __future__ import annotations

import os

import pytest
# Imported before any test runs the CLI in this process: Ray reads its authentication and
# node-address settings once, at import, so an in-process `main(["run", ...])` that imported it
# first would leave this whole process (and every `ray start` a later test spawns with its
# environment) in token mode. In-process CLI runs get the warning that their local cluster is
# open instead; the loopback binding and token of a real command are tested in a subprocess
# (test_exposure.py). And Ray's console log handler keeps the sys.stderr it found at import: had a
# test with capsys imported it, later tests' Ray log lines would go to that closed stream and print
# "--- Logging error ---" with a traceback (seen in CI, failing test_runlock's one-line check).
import ray  # noqa: F401

from backdoor_train.config import ExperimentConfig
from backdoor_train.training.raysession import free_port

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST_ROOT = os.environ.get("BACKDOOR_TRAIN_MNIST_ROOT",
                            os.path.join(REPO_ROOT, "..", "shared", "datasets", "mnist"))


def package_files(package: str) -> dict[str, str]:
    """Every ``.py`` file under ``package``: its path relative to ``package`` and its full path. For
    the tests that read the package's source (test_layering.py, test_rayinternals.py)."""
    found = {}
    for folder, _, files in os.walk(package):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                found[os.path.relpath(path, package)] = path
    return found


@pytest.fixture(scope="session")
def mnist_root() -> str:
    root = os.path.abspath(MNIST_ROOT)
    if not os.path.isfile(os.path.join(root, "MNIST", "raw", "train-images-idx3-ubyte")):
        pytest.fail(f"real MNIST not found at {root}: set BACKDOOR_TRAIN_MNIST_ROOT to torchvision's layout")
    return root


@pytest.fixture(scope="session")
def mnist_path() -> str:
    """Where MNIST is expected, unchecked: for tests that only build a config and read no data."""
    return os.path.abspath(MNIST_ROOT)


@pytest.fixture(scope="session")
def mnist_splits(mnist_root):
    from backdoor_train.data.mnist import MNIST

    return MNIST.load(mnist_root, True), MNIST.load(mnist_root, False)


# Fixtures that bring in real data, a real server or a system binary (test_deploy's
# ``rendered`` runs kubectl): a test using one is an integration test, so that
# ``-m "not integration"`` passes on a machine with only Python.
INTEGRATION_FIXTURES = {"mnist_root", "mnist_splits", "s3_server", "s3_env", "rendered"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def small_config(mnist_root: str, storage: str, **sections) -> ExperimentConfig:
    """A quick real-MNIST experiment: a subset, few epochs; sections override whole keys."""
    data = {
        "name": "tiny",
        "seed": 1,
        "data": {"root": mnist_root, "train_samples": 6000, "test_samples": 2000},
        "train": {"epochs": 2, "batch_size": 200, "lr": 0.002},
        "poison": {"rate": 0.05, "target": 8},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "storage": {"path": storage},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return ExperimentConfig.from_dict(data)


# --- a real S3 API: moto_server on a loopback port, with IAM authentication switched on ----

def stop_process(proc, timeout: float = 60.0) -> None:
    """Stop a server this test started (and only it): SIGTERM, then SIGKILL if it lingers."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    import socket
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def s3_server():
    """(endpoint, access key, secret key) of a moto_server that checks credentials.

    INITIAL_NO_AUTH_ACTION_COUNT lets the first requests (creating an IAM user and its key)
    through unauthenticated; every later request must be signed with that key, so wrong
    credentials are refused as a real S3 would."""
    import json
    import shutil
    import subprocess
    import sys

    import boto3

    port = free_port()
    # The one installed beside this interpreter first: another on PATH may be another version.
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    exe = exe if os.path.exists(exe) else shutil.which("moto_server")
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="backdoor-train")
        key = iam.create_access_key(UserName="backdoor-train")["AccessKey"]
        iam.put_user_policy(UserName="backdoor-train", PolicyName="s3-all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        stop_process(proc, timeout=10)


def s3_env_vars(server) -> dict[str, str]:
    endpoint, access, secret = server
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": access,
            "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1"}


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """The S3 settings in the environment, a fresh bucket, and a private data cache."""
    import uuid

    for name, value in s3_env_vars(s3_server).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("BACKDOOR_TRAIN_CACHE_DIR", str(tmp_path / "cache"))
    bucket = f"bt-{uuid.uuid4().hex[:10]}"
    fresh_s3_client(s3_server).create_bucket(Bucket=bucket)
    return bucket


def fresh_s3_client(server):
    import boto3

    endpoint, access, secret = server
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=access, aws_secret_access_key=secret)


def bucket_keys(server, bucket: str, prefix: str = "") -> list[str]:
    client = fresh_s3_client(server)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


class OutageProxy:
    """A TCP proxy on a loopback port in front of a server, which can go down: once a client
    sends the marker armed by ``outage_on(marker, s)`` (an object key in a request), it closes
    its listening socket and every open connection, refuses connections for ``s`` seconds,
    then listens again on the same port (``restored`` is set). A storage outage as clients see
    one (a MinIO pod restarting), with the server's data kept; triggered by the request, it
    meets that request for sure, where one started on a timer may fall between a fast run's
    writes."""

    def __init__(self, upstream_port: int) -> None:
        import threading

        self.upstream = ("127.0.0.1", upstream_port)
        self.port = free_port()
        self.lock = threading.Lock()
        self.conns: list = []
        self.listener = None
        self.closed = False
        self.trigger: tuple[bytes, float] | None = None
        self.restored = threading.Event()
        self._listen()

    def _listen(self) -> None:
        import socket
        import threading

        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self.listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _accept(self, sock) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = sock.accept()
            except OSError:  # closed: an outage or the end
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, server]
            for a, b, upstream in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, upstream), daemon=True).start()

    def _pipe(self, src, dst, upstream: bool) -> None:
        import socket

        tail = b""  # a marker may straddle two reads
        try:
            while data := src.recv(65536):
                if upstream and self.trigger and self.trigger[0] in tail + data:
                    with self.lock:
                        trigger, self.trigger = self.trigger, None
                    if trigger:  # this request is not forwarded: the outage meets it
                        self._begin_outage(trigger[1])
                        break
                dst.sendall(data)
                tail = data[-256:]
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _drop_all(self) -> None:
        import socket

        with self.lock:
            conns, self.conns = self.conns, []
        # shutdown first: it wakes the threads blocked in accept() and recv() (close does not).
        for sock in [self.listener, *conns]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def outage_on(self, marker: str, seconds: float) -> None:
        self.restored.clear()
        with self.lock:
            self.trigger = (marker.encode(), seconds)

    def _begin_outage(self, seconds: float) -> None:
        import threading
        import time

        self._drop_all()

        def restore() -> None:
            time.sleep(seconds)
            if not self.closed:
                self._listen()
            self.restored.set()

        threading.Thread(target=restore, daemon=True).start()

    def close(self) -> None:
        self.closed = True
        self._drop_all()


def ray_snapshot(*dir_names: str, latest: str | None = "") -> str:
    """A run snapshot as Ray 2.58's checkpoint manager writes it (its own schema)."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (_CheckpointManagerState,
                                                                                _TrainingResultState)

    results = [_TrainingResultState(checkpoint_dir_name=d, metrics={"epoch": i + 1}) for i, d in enumerate(dir_names)]
    latest_name = dir_names[-1] if latest == "" and dir_names else latest
    return _CheckpointManagerState(
        checkpoint_results=results, checkpoint_report_indices=list(range(len(results))),
        latest_checkpoint_result=next((r for r in results if r.checkpoint_dir_name == latest_name), None),
        pending_training_results=[], pending_validation_specs=[], current_report_index=len(results),
        validated_checkpoint_dir_names=[], timed_out_validation_checkpoint_dir_names=[],
        failed_validation_checkpoint_dir_names=[]).model_dump_json()


def resumed_epochs(out: str, name: str, variant: str = "poisoned") -> list[int]:
    """The epochs the workers of experiment ``name`` said they resumed after (they print it
    when they load the checkpoint)."""
    return [int(line.split("resuming after epoch ")[1].split()[0])
            for line in out.splitlines() if f"[{name}/{variant}] resuming after epoch" in line]
