"""More than one Ray node: a cluster on this machine laid out as the KubeRay deployment lays it
out (k8s/base/rayjob.yaml): a head that runs the driver and the Train controllers and takes no
training (``num-cpus: 0``), and worker nodes joined with ``ray start --address``, each with its
own resources and its own data cache; MNIST and the run's storage in S3 (moto_server).

A run spreads each model's two DDP workers over two worker nodes (one CPU each), every node
stages MNIST from S3 into its own cache, and every checkpoint is written by a worker that is
not on the head. A worker node killed mid-run is replaced by a new one, as KubeRay replaces a
lost pod, and Ray Train restarts the workers from the newest checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import re
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from backdoor_train.training.raysession import API_SERVER_ENV

from conftest import free_port, bucket_keys, fresh_s3_client, resumed_epochs, s3_env_vars, small_config

pytestmark = pytest.mark.integration

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
STAGED_FILE = os.path.join("MNIST", "raw", "train-images-idx3-ubyte.gz")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first."""
    parent_of = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as fh:
                # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
                parent_of[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            pass
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parent_of.items() if parent in frontier]
        found += children
        frontier = children
    return found


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class LocalCluster:
    """``ray start --block`` processes: a head and named worker nodes; stops only what it started."""

    def __init__(self, env: dict[str, str], root: str) -> None:
        self.temp = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: Ray's socket paths
        self.env = {k: v for k, v in env.items() if k not in ("RAY_ADDRESS", API_SERVER_ENV)}
        self.env["RAY_TMPDIR"] = self.temp
        self.root = root
        self.address = f"127.0.0.1:{free_port()}"
        self.nodes: dict[str, subprocess.Popen] = {}

    def cache(self, name: str) -> str:
        return os.path.join(self.root, f"cache-{name}")

    def _start(self, name: str, args: list[str]) -> None:
        # Ports a node binds, chosen here: several nodes on one host must not share any.
        ports = [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                 f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
        env = {**self.env, "BACKDOOR_TRAIN_CACHE_DIR": self.cache(name)}
        self.nodes[name] = subprocess.Popen([RAY, "start", "--block", "--node-ip-address=127.0.0.1", *ports, *args],
                                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start_head(self) -> None:
        port = self.address.rsplit(":", 1)[1]
        self._start("head", ["--head", f"--port={port}", f"--dashboard-port={free_port()}", "--num-cpus=0",
                             f"--temp-dir={self.temp}", "--disable-usage-stats"])
        self._wait_for("head", "Active:")

    def add_node(self, name: str) -> None:
        self._start(name, [f"--address={self.address}", "--num-cpus=1", f"--resources={json.dumps({name: 1})}"])
        self._wait_for(name, f"/1.0 {name}")

    def _wait_for(self, name: str, shown: str) -> None:
        """Until ``ray status`` shows ``shown`` (the node's own resource)."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.nodes[name].poll() is None, f"ray start of {name} exited"
            status = subprocess.run([RAY, "status", f"--address={self.address}"], env=self.env,
                                    capture_output=True, text=True, timeout=60)
            if status.returncode == 0 and shown in status.stdout:
                return
            time.sleep(1)
        raise AssertionError(f"{name} did not join the cluster at {self.address}")

    def kill(self, name: str) -> None:
        """The node dies at once: its raylet, its workers and its agents, SIGKILL."""
        proc = self.nodes.pop(name)
        kill_all(descendants(proc.pid))
        proc.kill()
        proc.wait()

    def stop(self) -> None:
        # Hard: a graceful `ray start --block` drains for 30 s per node, and nothing here outlives it.
        for name in list(self.nodes):
            self.kill(name)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def bucket(s3_server, mnist_root):
    """A bucket with MNIST staged in it, by the CLI."""
    import uuid

    name = f"bt-{uuid.uuid4().hex[:10]}"
    fresh_s3_client(s3_server).create_bucket(Bucket=name)
    staged = subprocess.run([sys.executable, "-m", "backdoor_train", "stage-data", f"s3://{name}/datasets/mnist",
                             "--source", mnist_root], env={**os.environ, **s3_env_vars(s3_server)},
                            capture_output=True, text=True, timeout=300)
    assert staged.returncode == 0, staged.stdout + staged.stderr
    return name


@pytest.fixture(scope="module")
def cluster(s3_server, bucket, tmp_path_factory):
    # Every node gets the S3 settings in its environment, as the pods get them from a Secret.
    c = LocalCluster({**os.environ, **s3_env_vars(s3_server)}, str(tmp_path_factory.mktemp("nodes")))
    try:
        c.start_head()
        c.add_node("node_a")
        c.add_node("node_b")
        yield c
    finally:
        c.stop()


def _run(cluster: LocalCluster, tmp_path, bucket: str, name: str, **sections) -> subprocess.Popen:
    cfg = small_config("s3://{}/datasets/mnist".format(bucket), f"s3://{bucket}/runs", name=name,
                       scaling={"num_workers": 2, "cpus_per_worker": 1}, **sections)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    # The driver runs on the head, with the head's cache, as a RayJob's entrypoint does.
    env = {**cluster.env, "BACKDOOR_TRAIN_CACHE_DIR": cluster.cache("head")}
    return subprocess.Popen([sys.executable, "-m", "backdoor_train", "run", str(path), "--address", cluster.address],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _results(s3_server, bucket: str, name: str) -> dict:
    body = fresh_s3_client(s3_server).get_object(Bucket=bucket, Key=f"runs/{name}/results.json")["Body"].read()
    return json.loads(body)


def _staged(cluster: LocalCluster, name: str, bucket: str) -> bool:
    return os.path.isfile(os.path.join(cluster.cache(name), "s3", bucket, "datasets", "mnist", STAGED_FILE))


def test_a_run_spreads_over_two_worker_nodes_each_staging_the_data(cluster, s3_server, bucket, tmp_path):
    proc = _run(cluster, tmp_path, bucket, "spread", train={"epochs": 2, "checkpoint_every": 1})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    results = _results(s3_server, bucket, "spread")
    for variant in ("clean", "poisoned"):
        assert [h["world_size"] for h in results["variants"][variant]["history"]] == [2, 2]
        keys = bucket_keys(s3_server, bucket, f"runs/spread/{variant}/")
        assert f"runs/spread/{variant}/checkpoint_epoch_0002/state.pt.sha256" in keys, keys
    # One CPU per worker node and none on the head: the two workers of each model ran one on
    # each worker node, and each node downloaded MNIST into its own cache.
    assert _staged(cluster, "node_a", bucket) and _staged(cluster, "node_b", bucket)
    assert _staged(cluster, "head", bucket)  # the driver's copy: it poisons and evaluates


def _committed(proc: subprocess.Popen, s3_server, bucket: str, name: str, at_least: int) -> int:
    """The epoch of the newest checkpoint Ray committed (its snapshot), once it is ``at_least``."""
    snapshot = f"runs/{name}/poisoned/checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if snapshot in bucket_keys(s3_server, bucket, snapshot):
            latest = json.loads(fresh_s3_client(s3_server).get_object(Bucket=bucket, Key=snapshot)["Body"]
                                .read()).get("latest_checkpoint_result") or {}
            if latest.get("checkpoint_dir_name", "") >= f"checkpoint_epoch_{at_least:04d}":
                return int(latest["checkpoint_dir_name"].rsplit("_", 1)[1])
        time.sleep(0.2)
    return 0


def test_a_lost_worker_node_is_replaced_and_the_run_resumes(cluster, s3_server, bucket, tmp_path):
    proc = _run(cluster, tmp_path, bucket, "lost", variants=["poisoned"],
                train={"epochs": 6, "checkpoint_every": 1, "max_failures": 3})
    committed = _committed(proc, s3_server, bucket, "lost", 2)
    assert committed, "no checkpoint was committed"
    cluster.kill("node_b")
    time.sleep(2)
    cluster.add_node("node_c")  # the replacement, with an empty cache
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    resumed = resumed_epochs(out, "lost")
    assert resumed and resumed[0] >= committed, (resumed, committed, out[-4000:])
    history = _results(s3_server, bucket, "lost")["variants"]["poisoned"]["history"]
    assert [h["epoch"] for h in history] == list(range(1, 7))
    assert _staged(cluster, "node_c", bucket)  # the new node staged its own copy


def test_a_node_lost_with_no_retries_left_ends_in_one_line(cluster, s3_server, bucket, tmp_path):
    # Runs last: it leaves the cluster one worker node short.
    proc = _run(cluster, tmp_path, bucket, "gone", variants=["poisoned"],
                train={"epochs": 6, "checkpoint_every": 1, "max_failures": 0})
    committed = _committed(proc, s3_server, bucket, "gone", 1)
    assert committed, "no checkpoint was committed"
    cluster.kill("node_a")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    errors = [line for line in out.splitlines() if line.startswith("backdoor-train: run failed:")]
    assert len(errors) == 1, out[-4000:]
    assert re.search(r"poisoned: a training worker's process or node was lost.*kept for a rerun: poisoned: "
                     r"epoch \d", errors[0]), errors[0]
