"""What a laptop run exposes: the local Ray cluster listens on loopback only, with token auth.

A real ``backdoor-train run --address local`` in a subprocess; while it trains, every TCP socket
listening in its process tree (the driver, GCS, raylet, agents, Train workers) is read from
``/proc`` (no ``ss``), and the dashboard is asked for its version without and with the token.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest
import yaml

pytestmark = pytest.mark.integration

BIN = os.path.dirname(sys.executable)
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(pid))
    found, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _socket_inodes(pids: set[int]) -> dict[str, int]:
    inodes = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:  # the process ended meanwhile
            continue
    return inodes


def _address(hex_addr: str) -> str:
    host, port = hex_addr.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip = ".".join(str(b) for b in reversed(raw))
    else:  # four little-endian 32-bit words
        words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
        ip = ":".join(b"".join(words)[i:i + 2].hex() for i in range(0, 16, 2))
    return f"{ip}:{int(port, 16)}"


def listening(pids: set[int]) -> set[tuple[str, str]]:
    """(local address, process name) of every listening TCP socket the processes hold."""
    inodes = _socket_inodes(pids)
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for row in fh.read().splitlines()[1:]:
                cols = row.split()
                if cols[3] == LISTEN and cols[9] in inodes:
                    with open(f"/proc/{inodes[cols[9]]}/comm") as comm:
                        found.add((_address(cols[1]), comm.read().strip()))
    return found


def is_loopback(address: str) -> bool:
    ip = address.rsplit(":", 1)[0]
    return (ip.startswith("127.") or ip == "0000:0000:0000:0000:0000:0000:0000:0001"
            or ip.startswith("0000:0000:0000:0000:0000:ffff:7f"))  # ::ffff:127.x.x.x


def test_address_parsing():
    assert _address("0100007F:1F90") == "127.0.0.1:8080"
    assert is_loopback(_address("0000000000000000FFFF00000100007F:1F90"))
    assert not is_loopback(_address("00000000000000000000000000000000:1F90"))  # [::]
    assert not is_loopback(_address("00000000:1F90"))


def _token_of(pid: int) -> str:
    with open(f"/proc/{pid}/environ", "rb") as fh:
        env = dict(item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item)
    return env[b"RAY_AUTH_TOKEN"].decode()


def _dashboard_status(url: str, token: str | None) -> int:
    request = urllib.request.Request(url + "/api/version")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_local_run_listens_on_loopback_only_and_asks_for_a_token(mnist_root, tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({
        "name": "exposed", "data": {"root": mnist_root, "train_samples": 6000, "test_samples": 1000},
        "train": {"epochs": 2}, "storage": {"path": str(tmp_path / "runs")},
        "metrics": {"enabled": True, "port": 0},  # the workers' /metrics servers count too
        "scaling": {"num_workers": 1, "cpus_per_worker": 1}}))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "RAY_API_SERVER", "RAY_ENABLE_WINDOWS"))}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rx", dir="/tmp")  # short, for Ray's socket paths
    env["BACKDOOR_TRAIN_CACHE_DIR"] = str(tmp_path / "cache")
    log = open(tmp_path / "run.log", "w+")
    proc = subprocess.Popen([os.path.join(BIN, "backdoor-train"), "run", str(config), "--address", "local"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    seen: set[tuple[str, str]] = set()
    statuses, token = None, None
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            tree = _descendants(proc.pid)
            seen |= listening(tree)
            log.seek(0)
            dashboard = re.search(r"View the dashboard at \S*?(http://[\d.]+:\d+)", log.read())
            training = any("RayTrainWorker" in _cmdline(pid) for pid in tree)
            if statuses is None and dashboard and training:
                # The driver's own /proc environ predates the token: its cluster's processes hold it.
                gcs = next(pid for pid in tree if _cmdline(pid).split("\0")[0].endswith("gcs_server"))
                url, token = dashboard.group(1), _token_of(gcs)
                statuses = (_dashboard_status(url, None), _dashboard_status(url, token))
            time.sleep(0.5)
        assert proc.wait(timeout=300) == 0, _read(tmp_path / "run.log")
    finally:
        if proc.poll() is None:
            proc.kill()
    names = {name for _, name in seen}
    # The run's Ray servers were all seen (so the scan read the right tree) ...
    # (and the DDP rendezvous store a Train worker hosts, which torch alone binds to every interface)
    assert {"gcs_server", "raylet", "ray::RayTrainWo"} <= names, seen
    # ... and none listens beyond loopback.
    assert [(a, n) for a, n in sorted(seen) if not is_loopback(a)] == []
    assert statuses is not None, "the run ended before its dashboard and a Train worker were seen"
    assert statuses[0] in (401, 403) and statuses[1] == 200, statuses
    assert len(token) == 64 and token not in _read(tmp_path / "run.log")  # made for the run, never printed
    assert not any(token in _read(path) for path in _files(env["RAY_TMPDIR"]))  # nor written to a file


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _files(root: str) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
            if os.path.isfile(os.path.join(d, f)) and not os.path.islink(os.path.join(d, f))]


def _read(path) -> str:
    with open(path, errors="replace") as fh:
        return fh.read()
