#!/usr/bin/env python3
"""A KubeRay-shaped cluster in podman containers, made from the rendered manifests.

Steps 3-5 of scripts/container-check.sh. It reads `kubectl kustomize k8s/overlays/local-cpu`
(plus the opt-in monitoring component) and runs every pod the way Kubernetes and KubeRay 1.7
would: the containers' images, env (values, Secret refs, envFrom), ports, commands, security
contexts, resource limits and volumes come from the rendered objects, never retyped here. What
KubeRay adds to a Ray pod it adds here too: the `ray start` command built from rayStartParams
(`--block --dashboard-agent-listen-port=52365 --metrics-export-port=8080`, `--memory` from the
limit, `--address` of the head Service on workers), its env (RAY_ADDRESS, RAY_CLUSTER_NAME,
RAY_AUTH_MODE/RAY_AUTH_TOKEN from a generated token for `authOptions.mode: token`), the
wait-gcs-ready init step, the `metrics` port 8080, and the K8sJobMode submitter's
`ray job submit`. Services become DNS aliases on one bridge network.

Stand-ins, said where they are used: moto_server for MinIO (no registry to pull MinIO from),
Debian's prometheus-pushgateway and prometheus binaries for the Pushgateway and Prometheus
images. Not reproduced: the API server, scheduling, probes, NetworkPolicies (one network).

    podman_kuberay.py check [--overlay local-cpu] [--steps 3,4,5]   (run by container-check.sh)
    podman_kuberay.py down                                          remove what it started
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETWORK = "bt-kuberay"
LABEL = "backdoor-train-check=kuberay"
PODMAN_RUN_FLAGS = ["--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
S3_IMAGE = os.environ.get("S3_IMAGE", "localhost/backdoor-train/s3-standin:moto")
DEBIAN_IMAGE = os.environ.get("DEBIAN_IMAGE", "localhost/backdoor-train/debian-minbase:bookworm")
KUBERAY_METRICS_PORT = 8080          # KubeRay adds it to every Ray container, named "metrics"
KUBERAY_AGENT_PORT = 52365


# --- the rendered objects ----------------------------------------------------------------

def render(overlay: str, with_monitoring: bool) -> list[dict]:
    """The overlay's objects, with the monitoring component added as a user would (an overlay
    of the overlay), so the monitors' port names are the ones a real Prometheus would use."""
    path = os.path.join(REPO, "k8s", "overlays", overlay)
    with tempfile.TemporaryDirectory() as tmp:
        if with_monitoring:
            with open(os.path.join(tmp, "kustomization.yaml"), "w") as fh:
                yaml.safe_dump({"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                                "resources": [os.path.relpath(path, tmp)],
                                "components": [os.path.relpath(os.path.join(REPO, "k8s", "components",
                                                                            "monitoring"), tmp)]}, fh)
            path = tmp
        out = subprocess.run(["kubectl", "kustomize", path], capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


class Manifests:
    def __init__(self, docs: list[dict]) -> None:
        self.docs = docs
        self.namespace = next(d["metadata"]["name"] for d in docs if d["kind"] == "Namespace")

    def all(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict:
        found = [d for d in self.all(kind) if name is None or d["metadata"]["name"] == name]
        if len(found) != 1:
            raise SystemExit(f"the rendered manifests have {len(found)} {kind} {name or ''}, expected 1")
        return found[0]

    def secret(self, name: str) -> dict[str, str]:
        s = self.one("Secret", name)
        data = {k: base64.b64decode(v).decode() for k, v in (s.get("data") or {}).items()}
        data.update(s.get("stringData") or {})
        return data

    def configmap(self, name: str) -> dict[str, str]:
        return self.one("ConfigMap", name).get("data") or {}

    def service_aliases(self, pod_labels: dict[str, str]) -> list[str]:
        """DNS names of the Services that select a pod with these labels."""
        names = []
        for svc in self.all("Service"):
            sel = svc["spec"].get("selector") or {}
            if sel and all(pod_labels.get(k) == v for k, v in sel.items()):
                names += dns_names(svc["metadata"]["name"], self.namespace)
        return names


def dns_names(service: str, namespace: str) -> list[str]:
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
            f"{service}.{namespace}.svc.cluster.local"]


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and every matchExpressions operator)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


_UNITS = {"Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "k": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9,
          "m": 1e-3, "": 1}


def quantity(q: Any) -> float:
    """A Kubernetes resource quantity ("1792Mi", "250m", "2") as a number."""
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"unsupported quantity {q!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


# --- pods as containers ------------------------------------------------------------------

class Pod:
    """One pod's container as a `podman run` command line."""

    def __init__(self, m: Manifests, name: str, template: dict, state: str, *, image: str | None = None,
                 command: list[str] | None = None, extra_env: dict[str, str] | None = None,
                 extra_ports: dict[str, int] | None = None, publish: list[str] | None = None,
                 extra_mounts: list[str] | None = None) -> None:
        self.m, self.name, self.state = m, name, state
        self.labels = dict((template.get("metadata") or {}).get("labels") or {})
        self.spec = template["spec"]
        self.container = self.spec["containers"][0]
        self.image = image or self.container["image"]
        self.command = command
        self.extra_env = extra_env or {}
        self.ports = {p["name"]: p["containerPort"] for p in self.container.get("ports", []) if "name" in p}
        self.ports.update(extra_ports or {})
        self.publish = publish or []
        self.extra_mounts = extra_mounts or []

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for src in self.container.get("envFrom", []):
            env.update(self.m.secret(src["secretRef"]["name"]) if "secretRef" in src
                       else self.m.configmap(src["configMapRef"]["name"]))
        for e in self.container.get("env", []):
            if "value" in e:
                env[e["name"]] = str(e["value"])
            elif "secretKeyRef" in e.get("valueFrom", {}):
                ref = e["valueFrom"]["secretKeyRef"]
                env[e["name"]] = self.m.secret(ref["name"])[ref["key"]]
        env.update(self.extra_env)
        return env

    def security_args(self) -> list[str]:
        pod_sc, sc = self.spec.get("securityContext") or {}, self.container.get("securityContext") or {}
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        gid = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
        args = []
        if uid is not None:
            args += ["--user", f"{uid}:{gid}" if gid is not None else str(uid)]
        if pod_sc.get("fsGroup") is not None:
            args += ["--group-add", str(pod_sc["fsGroup"])]
        if "ALL" in ((sc.get("capabilities") or {}).get("drop") or []):
            args += ["--cap-drop", "ALL"]
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        if sc.get("readOnlyRootFilesystem"):
            # Only the pod's own volumes are writable (podman would add tmpfs on /tmp, /run).
            args += ["--read-only", "--read-only-tmpfs=false"]
        # seccompProfile RuntimeDefault is podman's default profile.
        return args

    def resource_args(self) -> list[str]:
        limits = (self.container.get("resources") or {}).get("limits") or {}
        args = []
        if "cpu" in limits:
            args += ["--cpus", f"{quantity(limits['cpu']):g}"]
        if "memory" in limits:
            mem = int(quantity(limits["memory"]))
            args += ["--memory", str(mem), "--memory-swap", str(mem)]  # no swap, as on a node
        return args

    def volume_args(self) -> list[str]:
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        args = []
        for mnt in self.container.get("volumeMounts", []):
            vol, dst = volumes[mnt["name"]], mnt["mountPath"]
            if "configMap" in vol:
                folder = os.path.join(self.state, f"{self.name}-{mnt['name']}")
                os.makedirs(folder, exist_ok=True)
                for fname, text in self.m.configmap(vol["configMap"]["name"]).items():
                    with open(os.path.join(folder, fname), "w") as fh:
                        fh.write(text)
                os.chmod(folder, 0o755)
                args += ["-v", f"{folder}:{dst}:ro"]
            elif "emptyDir" in vol:
                if (vol["emptyDir"] or {}).get("medium") == "Memory":
                    args += ["--tmpfs", f"{dst}:rw,mode=1777"]
                else:
                    # An emptyDir on the node's disk, writable by the pod's fsGroup (as Kubernetes does).
                    args += ["--mount", f"type=volume,src={self.name}-{mnt['name']},dst={dst}"]
            else:
                raise SystemExit(f"{self.name}: volume {mnt['name']} of an unsupported kind")
        return args + self.extra_mounts

    def run_args(self, detach: bool = True) -> list[str]:
        args = ["podman", "run", *(["-d"] if detach else []), "--name", self.name, "--hostname", self.name,
                "--label", LABEL, "--network", NETWORK, *PODMAN_RUN_FLAGS]
        for alias in self.m.service_aliases(self.labels) + getattr(self, "aliases", []):
            args += ["--network-alias", alias]
        for p in self.publish:
            args += ["-p", p]
        args += self.security_args() + self.resource_args() + self.volume_args()
        for k, v in sorted(self.env().items()):
            args += ["-e", f"{k}={v}"]
        # The images set no ENTRYPOINT, so a pod's command + args replace the image's CMD.
        cmd = self.command or (self.container.get("command", []) + self.container.get("args", []))
        return args + [self.image] + cmd

    def prepare_volumes(self) -> None:
        """Disk emptyDirs owned by the pod's fsGroup with the setgid bit, as the kubelet makes them."""
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        gid = (self.spec.get("securityContext") or {}).get("fsGroup")
        for mnt in self.container.get("volumeMounts", []):
            vol = volumes[mnt["name"]]
            if "emptyDir" in vol and (vol["emptyDir"] or {}).get("medium") != "Memory":
                vname = f"{self.name}-{mnt['name']}"
                podman("volume", "rm", "-f", vname, check=False)
                podman("volume", "create", "--label", LABEL, vname)
                path = podman("volume", "inspect", vname, "--format", "{{.Mountpoint}}").strip()
                os.chmod(path, 0o2777 if gid is not None else 0o777)
                if gid is not None:
                    os.chown(path, 0, int(gid))

    def start(self, detach: bool = True) -> subprocess.CompletedProcess | None:
        podman("rm", "-f", self.name, check=False)
        self.prepare_volumes()
        if detach:
            subprocess.run(self.run_args(True), check=True, capture_output=True, text=True)
            return None
        return subprocess.run(self.run_args(False), capture_output=True, text=True)


def podman(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"podman {' '.join(args[:3])}: {proc.stderr.strip()}")
    return proc.stdout


# --- KubeRay's part ----------------------------------------------------------------------

def ray_start_command(params: dict[str, Any], container: dict, head: bool, head_host: str) -> list[str]:
    """The command KubeRay 1.7 gives a Ray container: `ulimit -n 65536; ray start ...` with the
    rayStartParams, --memory (and --num-cpus/--num-gpus unless given) from the limits, and its
    fixed ports; the head also gets --dashboard-host only if the params lack it."""
    limits = (container.get("resources") or {}).get("limits") or {}
    p = {k: str(v) for k, v in params.items()}
    if "num-cpus" not in p and "cpu" in limits:
        p["num-cpus"] = str(max(1, int(quantity(limits["cpu"]))))
    if "memory" not in p and "memory" in limits:
        p["memory"] = str(int(quantity(limits["memory"])))
    if "nvidia.com/gpu" in limits and "num-gpus" not in p:
        p["num-gpus"] = str(int(quantity(limits["nvidia.com/gpu"])))
    p.setdefault("metrics-export-port", str(KUBERAY_METRICS_PORT))
    p.setdefault("dashboard-agent-listen-port", str(KUBERAY_AGENT_PORT))
    if not head:
        p["address"] = f"{head_host}:6379"
    flags = " ".join(f"--{k}={v}" for k, v in sorted(p.items()))
    return ["/bin/bash", "-c", f"ulimit -n 65536; ray start {'--head ' if head else ''}--block {flags}"]


class RayJobCluster:
    """The RayCluster KubeRay makes for the RayJob: a head, the worker groups, the token."""

    def __init__(self, m: Manifests, rayjob: dict, state: str) -> None:
        self.m, self.rayjob, self.state = m, rayjob, state
        self.name = f"{rayjob['metadata']['name']}-{secrets.token_hex(3)[:5]}"  # KubeRay: <job>-<5 chars>
        self.spec = rayjob["spec"]["rayClusterSpec"]
        self.head_svc = f"{self.name}-head-svc"
        self.head_host = f"{self.head_svc}.{m.namespace}.svc.cluster.local"
        self.token = secrets.token_urlsafe(32)
        with open(os.path.join(state, "auth_token"), "w", opener=lambda p, f: os.open(p, f, 0o600)) as fh:
            fh.write(self.token)
        self.workers: list[Pod] = []

    def auth_env(self) -> dict[str, str]:
        if (self.spec.get("authOptions") or {}).get("mode") != "token":
            return {}
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def common_env(self, node_type: str, pod: str) -> dict[str, str]:
        return {"RAY_CLUSTER_NAME": self.name, "RAY_CLOUD_INSTANCE_ID": pod, "RAY_NODE_TYPE_NAME": node_type,
                "RAY_USAGE_STATS_KUBERAY_IN_USE": "1", "RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE": "1",
                "RAY_PORT": "6379", **self.auth_env()}

    def head_pod(self, dashboard_publish: str | None) -> Pod:
        hg = self.spec["headGroupSpec"]
        name = f"{self.name}-head"
        c = hg["template"]["spec"]["containers"][0]
        pod = Pod(self.m, name, hg["template"], self.state,
                  command=ray_start_command(hg["rayStartParams"], c, True, self.head_host),
                  extra_env={**self.common_env("headgroup", name), "RAY_ADDRESS": "127.0.0.1:6379",
                             "RAY_IP": "127.0.0.1"},
                  extra_ports={"metrics": KUBERAY_METRICS_PORT},
                  publish=[dashboard_publish] if dashboard_publish else [])
        pod.labels.update({"ray.io/cluster": self.name, "ray.io/node-type": "head"})
        pod.aliases = dns_names(self.head_svc, self.m.namespace)  # type: ignore[attr-defined]
        return pod

    def worker_pods(self) -> list[Pod]:
        pods = []
        for group in self.spec["workerGroupSpecs"]:
            c = group["template"]["spec"]["containers"][0]
            for i in range(group.get("replicas", 1)):
                name = f"{self.name}-{group['groupName']}-worker-{i}"
                pod = Pod(self.m, name, group["template"], self.state,
                          command=ray_start_command(group["rayStartParams"], c, False, self.head_host),
                          extra_env={**self.common_env(group["groupName"], name),
                                     "RAY_ADDRESS": f"{self.head_host}:6379", "RAY_IP": self.head_host,
                                     "FQ_RAY_IP": self.head_host},
                          extra_ports={"metrics": KUBERAY_METRICS_PORT})
                pod.labels.update({"ray.io/cluster": self.name, "ray.io/node-type": "worker"})
                pods.append(pod)
        return pods

    def wait_gcs_ready(self, pod: Pod, timeout: float = 180) -> None:
        """KubeRay's wait-gcs-ready init container: the worker's image, env and security
        context, polling the head's GCS until it answers."""
        init = Pod(self.m, f"{pod.name}-init", {"metadata": {}, "spec": pod.spec}, self.state,
                   command=["/bin/bash", "-c", f"for i in $(seq {int(timeout / 2)}); do "
                            f"ray health-check --address {self.head_host}:6379 > /dev/null 2>&1 && exit 0; "
                            "sleep 2; done; echo GCS not ready; exit 1"],
                   extra_env=pod.extra_env)
        init.container = {**pod.container, "volumeMounts": [], "resources": {}}
        proc = init.start(detach=False)
        podman("rm", "-f", init.name, check=False)
        if proc is None or proc.returncode != 0:
            raise SystemExit(f"{pod.name}: wait-gcs-ready failed: {proc.stdout if proc else ''}")

    def submitter(self, submission_id: str) -> Pod:
        """K8sJobMode's submitter Job: `ray job submit --no-wait` of the RayJob's entrypoint,
        then `ray job logs --follow`, in the submitterPodTemplate's container."""
        tmpl = self.rayjob["spec"]["submitterPodTemplate"]
        address = f"http://{self.head_host}:8265"
        entrypoint = self.rayjob["spec"]["entrypoint"]
        script = (f"if ! ray job status --address {address} {submission_id} >/dev/null 2>&1; then "
                  f"ray job submit --address {address} --no-wait --submission-id {submission_id} -- {entrypoint}; fi"
                  f" && ray job logs --address {address} --follow {submission_id}")
        return Pod(self.m, f"{self.rayjob['metadata']['name']}-submitter", tmpl, self.state,
                   command=["/bin/bash", "-c", script],
                   extra_env={"RAY_DASHBOARD_ADDRESS": address, "RAY_JOB_SUBMISSION_ID": submission_id,
                              **self.auth_env()})


# --- the check ---------------------------------------------------------------------------

def peak_mib(name: str) -> float | None:
    """The container's peak memory (page cache and tmpfs included, as the limit counts them),
    from its memory cgroup (v1: max_usage_in_bytes; v2: memory.peak)."""
    cid = podman("inspect", name, "--format", "{{.Id}}", check=False).strip()
    for path in (f"/sys/fs/cgroup/memory/libpod_parent/libpod-{cid}/memory.max_usage_in_bytes",
                 f"/sys/fs/cgroup/libpod_parent/libpod-{cid}/memory.peak"):
        try:
            with open(path) as fh:
                return int(fh.read()) / 2 ** 20
        except (OSError, ValueError):
            continue
    return None


def timed(label: str):
    class _T:
        def __enter__(self):
            self.t0 = time.perf_counter()
            print(f"  {label} ...", flush=True)
            return self

        def __exit__(self, *exc):
            self.s = time.perf_counter() - self.t0
            print(f"  {label}: {'ok' if exc[0] is None else 'FAILED'} ({self.s:.0f} s)", flush=True)
    return _T()


def prometheus_config(m: Manifests, pods: list[Pod]) -> tuple[dict, list[str]]:
    """Scrape jobs from the PodMonitors and ServiceMonitors, by their port names, as the
    Prometheus Operator would generate them; the targets are the pods' addresses."""
    jobs, expected = [], []
    for pm in m.all("PodMonitor"):
        for ep in pm["spec"]["podMetricsEndpoints"]:
            # By pod name, as the operator's pod discovery follows a replaced pod to its new IP.
            targets = [f"{p.name}:{p.ports[ep['port']]}" for p in pods
                       if selects(pm["spec"]["selector"], p.labels) and ep["port"] in p.ports]
            job = f"podMonitor/{pm['metadata']['name']}/{ep['port']}"
            jobs.append({"job_name": job, "scrape_interval": "5s", "static_configs": [{"targets": targets}]})
            expected += [job] * len(targets)
    for sm in m.all("ServiceMonitor"):
        for ep in sm["spec"]["endpoints"]:
            for svc in m.all("Service"):
                if not selects(sm["spec"]["selector"], svc["metadata"].get("labels") or {}):
                    continue
                port = next(p["port"] for p in svc["spec"]["ports"] if p.get("name") == ep["port"])
                job = f"serviceMonitor/{sm['metadata']['name']}/{ep['port']}"
                jobs.append({"job_name": job, "scrape_interval": "5s", "honor_labels": bool(ep.get("honorLabels")),
                             "static_configs": [{"targets": [f"{svc['metadata']['name']}.{m.namespace}.svc:{port}"]}]})
                expected.append(job)
    return {"global": {"scrape_interval": "5s"}, "scrape_configs": jobs}, expected


def prom_query(port: int, q: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)["data"]["result"]


def job_status(dash_port: int, submission_id: str, token: str) -> str:
    req = urllib.request.Request(f"http://127.0.0.1:{dash_port}/api/jobs/{submission_id}",
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r).get("status", "UNKNOWN")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"UNKNOWN ({exc})"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(args: argparse.Namespace) -> int:
    steps = {int(s) for s in args.steps.split(",")}
    state = tempfile.mkdtemp(prefix="bt-kuberay.")
    os.chmod(state, 0o755)
    m = Manifests(render(args.overlay, with_monitoring=True))
    rayjob = m.one("RayJob")
    down()
    podman("network", "create", "--label", LABEL, NETWORK)
    peaks: dict[str, float | None] = {}
    ok = True
    print(f"step 3: a KubeRay-shaped cluster from k8s/overlays/{args.overlay} (state in {state})", flush=True)
    t_step = time.perf_counter()

    # MinIO's pod, with moto_server in its place (same Service name, port and credentials).
    minio = m.one("StatefulSet", "minio")
    s3 = Pod(m, "minio-0", minio["spec"]["template"], state, image=S3_IMAGE,
             command=["moto_server", "-H", "0.0.0.0", "-p", str(minio["spec"]["template"]["spec"]["containers"][0]
                                                                  ["ports"][0]["containerPort"])])
    # MinIO's pod spec (read-only root, limits), but moto spools uploads to a temp folder
    # where MinIO writes to its /data volume.
    s3.container = {**s3.container, "volumeMounts": []}
    s3.extra_mounts = ["--tmpfs", "/tmp:rw,mode=1777"]
    # moto reads a Host it does not know as a virtual-hosted bucket name ("minio"); MinIO's
    # endpoint as the pods name it (the stage Job's AWS_ENDPOINT_URL) is declared path-style.
    endpoint = next(e["value"] for e in m.one("Job", "stage-mnist")["spec"]["template"]["spec"]["containers"][0]["env"]
                    if e["name"] == "AWS_ENDPOINT_URL")
    s3.extra_env["MOTO_S3_CUSTOM_ENDPOINTS"] = endpoint
    gw_dep = m.one("Deployment", "pushgateway")
    gw_c = gw_dep["spec"]["template"]["spec"]["containers"][0]
    gateway = Pod(m, "pushgateway", gw_dep["spec"]["template"], state, image=DEBIAN_IMAGE,
                  command=["/usr/bin/prometheus-pushgateway",
                           f"--web.listen-address=:{gw_c['ports'][0]['containerPort']}"],
                  extra_mounts=["-v", "/usr/bin/prometheus-pushgateway:/usr/bin/prometheus-pushgateway:ro"])
    with timed("S3 server (moto, for MinIO) and Pushgateway (Debian's binary)"):
        s3.start()
        gateway.start()

    stage_job = m.one("Job", "stage-mnist")
    stage = Pod(m, "stage-mnist", stage_job["spec"]["template"], state)
    with timed(f"stage-mnist Job: {' '.join(stage.container['command'])}") as t:
        for attempt in range(stage_job["spec"].get("backoffLimit", 6) + 1):  # restartPolicy OnFailure
            proc = stage.start(detach=False)
            if proc.returncode == 0:
                break
            time.sleep(2)
        print("    " + (proc.stdout.strip().splitlines() or [""])[-1], flush=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit("step 3: FAILED (the stage-mnist Job)")
    stage_s = t.s

    cluster = RayJobCluster(m, rayjob, state)
    dash_port = free_port()
    head = cluster.head_pod(f"127.0.0.1:{dash_port}:8265")  # kubectl port-forward's stand-in
    workers = cluster.worker_pods()
    with timed(f"RayCluster {cluster.name}: head + {len(workers)} workers ({len(workers)} x wait-gcs-ready)"):
        head.start()
        for w in workers:
            cluster.wait_gcs_ready(w)
            w.start()
        # Ready when the head counts every worker's CPUs (KubeRay's own readiness is per pod).
        want_cpus = sum(float(g["rayStartParams"].get("num-cpus", 0)) * g.get("replicas", 1)
                        for g in cluster.spec["workerGroupSpecs"])
        deadline, total = time.time() + 180, None
        while time.time() < deadline:
            out = subprocess.run(["podman", "exec", head.name, "ray", "status"], capture_output=True, text=True).stdout
            total = re.search(r"[0-9.]+/([0-9.]+) CPU", out)
            if total and float(total.group(1)) >= want_cpus:
                break
            time.sleep(3)
        else:
            raise SystemExit(f"step 3: FAILED (the workers did not join: ray status says {out[-500:]})")
        print(f"    ray status: {total.group(1)} CPUs in the cluster, as the worker groups ask", flush=True)

    prom_port = free_port()
    if 4 in steps:
        cfg, expected_jobs = prometheus_config(m, [head, *workers, gateway])
        cfg_dir = os.path.join(state, "prometheus")
        os.makedirs(cfg_dir)
        with open(os.path.join(cfg_dir, "prometheus.yml"), "w") as fh:
            yaml.safe_dump(cfg, fh)
        os.chmod(cfg_dir, 0o755)
        subprocess.run(["podman", "run", "-d", "--name", "prometheus", "--label", LABEL, "--network", NETWORK,
                        *PODMAN_RUN_FLAGS, "--user", "65534", "-p", f"127.0.0.1:{prom_port}:9090",
                        "-v", "/usr/bin/prometheus:/usr/bin/prometheus:ro", "-v", f"{cfg_dir}:/etc/prometheus:ro",
                        "--tmpfs", "/prometheus:rw,mode=1777", DEBIAN_IMAGE, "/usr/bin/prometheus",
                        "--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"],
                       check=True, capture_output=True)
        print(f"  Prometheus (Debian's) scraping {len(expected_jobs)} targets from the monitors' port names", flush=True)

    submission_id = f"{rayjob['metadata']['name']}-{secrets.token_hex(3)[:5]}"
    submitter = cluster.submitter(submission_id)
    job_t0 = time.perf_counter()
    print(f"  RayJob entrypoint `{rayjob['spec']['entrypoint']}` via the submitter ({submission_id}) ...", flush=True)
    submitter.start(detach=True)
    killed_after = None
    victim = workers[-1]
    if 4 in steps:
        # Kill a worker once a model has finished (and checkpointed) epoch 3; KubeRay starts a
        # new pod for the group, which joins as a new node; Train restarts the worker group.
        while True:
            logs = podman("logs", submitter.name, check=False)
            done = [int(x) for x in re.findall(r"\] epoch (\d+)/\d+ ", logs)]
            if done and max(done) >= 3:
                killed_after = max(done)
                break
            if podman("inspect", submitter.name, "--format", "{{.State.Running}}").strip() != "true":
                break
            time.sleep(1)
        if killed_after is not None:
            peaks[victim.name + " (killed)"] = peak_mib(victim.name)
            podman("kill", victim.name)
            print(f"step 4: killed {victim.name} after epoch {killed_after}; starting it again", flush=True)
            time.sleep(2)
            cluster.wait_gcs_ready(victim)
            victim.start()
    submitter_rc = int(podman("wait", submitter.name).strip() or 1)
    # The job's state as the operator reads it: the dashboard's job API, with the token.
    status = job_status(dash_port, submission_id, cluster.token)
    rc = 0 if submitter_rc == 0 and status == "SUCCEEDED" else 1
    job_s = time.perf_counter() - job_t0
    logs = podman("logs", submitter.name, check=False)
    with open(os.path.join(state, "job.log"), "w") as fh:
        fh.write(logs)
    final = [l for l in logs.splitlines() if re.match(r"(variant|clean|poisoned)\s", l)][-5:]
    print("\n".join("    " + l for l in final))
    print(f"  RayJob: job {status}, submitter exit {submitter_rc}, {job_s:.0f} s (log {state}/job.log)", flush=True)
    ok &= rc == 0
    print(f"step 3: {'PASSED' if rc == 0 else 'FAILED'} ({time.perf_counter() - t_step:.0f} s; stage Job {stage_s:.0f} s)")

    if 4 in steps:
        resumed = [int(x) for x in re.findall(r"resuming after epoch (\d+)", logs)]
        lost = (killed_after - max(resumed)) if (killed_after and resumed) else None
        good = killed_after is not None and lost is not None and lost <= 1 and rc == 0
        print(f"step 4: worker killed after epoch {killed_after}; the run resumed after epoch "
              f"{max(resumed) if resumed else None}: {lost} epoch(s) lost -> {'ok' if good else 'FAILED'}")
        ok &= good
        time.sleep(12)  # a last scrape of the pushed results
        # Over the whole run: the workers' endpoints live only while a model trains.
        window = f"{int(time.perf_counter() - t_step) + 60}s"
        up = {(r["metric"]["job"], r["metric"]["instance"]): r["value"][1]
              for r in prom_query(prom_port, f"max_over_time(up[{window}])")}
        names = {r["metric"]["__name__"] for r in prom_query(
            prom_port, f'group by (__name__) (last_over_time({{__name__=~"backdoor_train_.+|ray_.+"}}[{window}]))')}
        pushed = prom_query(prom_port, "backdoor_train_final_attack_success_ratio")
        for (job, inst), v in sorted(up.items()):
            print(f"    max up over the run {{job={job}, instance={inst}}} = {v}")
        ours = sorted(n for n in names if n.startswith("backdoor_train_"))
        print(f"    {len(ours)} backdoor_train_* and {len(names) - len(ours)} ray_* series names")
        for r in pushed:
            print(f"    pushed final ASR {r['metric'].get('variant')}: {float(r['value'][1]):.4f} "
                  f"(run_id {r['metric'].get('run_id')}, experiment {r['metric'].get('experiment')})")
        jobs_seen = {job for (job, _), v in up.items() if v == "1"}
        want = {j for j in set(expected_jobs)}
        live = any(n == "backdoor_train_epoch" for n in names)
        good = want <= jobs_seen and live and len(pushed) >= 2
        print(f"step 4 (Prometheus): scrape jobs up {sorted(jobs_seen)}; "
              f"{'ok' if good else 'FAILED (missing ' + str(sorted(want - jobs_seen)) + ')'}")
        ok &= good

    if 5 in steps:
        t0 = time.perf_counter()
        print("step 5: docs/kubernetes.md's interactive walkthrough from the host, against the head's dashboard "
              f"(published on 127.0.0.1:{dash_port}, kubectl port-forward's stand-in)", flush=True)
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{dash_port}/api/jobs/", timeout=10)
            unauth = "answered without a token"
        except urllib.error.HTTPError as exc:
            unauth = f"HTTP {exc.code}"
        print(f"    the job API without the token: {unauth}")
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": cluster.token}
        cli = os.path.join(REPO, ".venv", "bin", "backdoor-train")
        proc = subprocess.run([cli, "submit", "/home/ray/experiment/experiment.yaml", "--address",
                               f"http://127.0.0.1:{dash_port}", "--no-upload"], env=env, capture_output=True, text=True)
        print("\n".join("    " + l for l in (proc.stdout + proc.stderr).strip().splitlines()[-5:]))
        good = proc.returncode == 0 and unauth == "HTTP 401"
        print(f"step 5: {'PASSED' if good else 'FAILED'} ({time.perf_counter() - t0:.0f} s)")
        ok &= good

    print("  peak memory of each pod's container (MiB, from its memory cgroup) against its limit:")
    pods = [s3, gateway, head, *workers]  # running ones: an exited container has no cgroup left
    for pod in pods:
        peaks[pod.name] = peak_mib(pod.name)
    limits = {p.name: ((p.container.get("resources") or {}).get("limits") or {}).get("memory") for p in pods}
    for name, mib in peaks.items():
        print(f"    {name}: {'?' if mib is None else f'{mib:.0f}'} (limit {limits.get(name.split(' ')[0])})")
    if not args.keep:
        down()
        if ok:  # a failed check keeps its logs
            shutil.rmtree(state, ignore_errors=True)
    return 0 if ok else 1


def down() -> None:
    ids = podman("ps", "-aq", "--filter", f"label={LABEL}", check=False).split()
    if ids:
        podman("rm", "-f", "-t", "2", *ids, check=False)
    vols = podman("volume", "ls", "-q", "--filter", f"label={LABEL}", check=False).split()
    if vols:
        podman("volume", "rm", "-f", *vols, check=False)
    podman("network", "rm", "-f", NETWORK, check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="steps 3-5 of scripts/container-check.sh")
    c.add_argument("--overlay", default="local-cpu")
    c.add_argument("--steps", default="3,4,5")
    c.add_argument("--keep", action="store_true", help="leave the containers running")
    sub.add_parser("down", help="remove the containers, volumes and network of a check")
    args = ap.parse_args()
    if args.cmd == "down":
        down()
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
