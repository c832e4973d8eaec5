"""Images and Kubernetes manifests, checked statically: lint, render, schemas, consistency."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
import yaml

from backdoor_train.config import ExperimentConfig
from backdoor_train.storage.staging import ENV_CACHE_DIR
from backdoor_train.storage.s3 import S3_ENV_VARS, split_s3_uri

from conftest import REPO_ROOT

# One reading of label selectors and resource quantities: the container check's
# (scripts/podman_kuberay.py runs the pods these tests check statically).
sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
from podman_kuberay import quantity, selects  # noqa: E402

OVERLAYS = ("local-cpu", "gpu", "interactive", "aws-s3")
GPU_OVERLAYS = ("gpu", "aws-s3")
MINIO_OVERLAYS = ("local-cpu", "gpu", "interactive")  # aws-s3 uses a real bucket
# The image placeholders of k8s/base: the Ray pods' (CPU or GPU image, by overlay) and the one of
# the pods that never need a GPU (the RayJob's submitter, the stage-mnist Job): always CPU.
CPU_ONLY_PODS = ("RayJob/backdoor-article/submitter", "Job/stage-mnist")
CRD_DIR = os.path.join(REPO_ROOT, "..", "shared", "k8s", "crds")
K8S_VERSION = "1.32.0"
CUSTOM_GROUPS = ("ray.io/", "monitoring.coreos.com/")

with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as _fh:
    PYPROJECT = tomllib.load(_fh)
VERSION = PYPROJECT["project"]["version"]
# The exact versions: constraints.txt (pyproject.toml holds ranges).
with open(os.path.join(REPO_ROOT, "constraints.txt"), encoding="utf-8") as _fh:
    PINS = dict(line.split("#")[0].strip().split("==") for line in _fh if line.split("#")[0].strip())
RAY_VERSION = PINS["ray"]


def _tool(name: str) -> str:
    path = shutil.which(name) or os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(path):
        pytest.fail(f"{name} is not installed: run scripts/setup.sh --test")
    return path


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    out = {}
    for overlay in OVERLAYS:
        proc = subprocess.run([_tool("kubectl"), "kustomize", os.path.join(REPO_ROOT, "k8s", "overlays", overlay)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, f"{overlay}: {proc.stderr}"
        out[overlay] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


def _objects(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def _ray_cluster_specs(docs):
    specs = [d["spec"]["rayClusterSpec"] for d in _objects(docs, "RayJob")]
    return specs + [d["spec"] for d in _objects(docs, "RayCluster")]


def _pod_specs(docs):
    """Every pod template's spec, with a name saying where it came from."""
    for d in docs:
        spec = d.get("spec", {})
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield f"{d['kind']}/{d['metadata']['name']}", spec["template"]["spec"]
        if d["kind"] == "RayJob":
            yield f"RayJob/{d['metadata']['name']}/submitter", spec["submitterPodTemplate"]["spec"]
    for cluster in _ray_cluster_specs(docs):
        yield "ray-head", cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster["workerGroupSpecs"]:
            yield f"ray-workers/{group['groupName']}", group["template"]["spec"]


def _render(tmp_path, name: str, resources: list[str], components: list[str] = (), *extra: str) -> list[dict]:
    """An overlay a user would write in their own repository, rendered: ``resources`` and
    ``components`` are paths below k8s/, ``extra`` more lines of its kustomization.yaml."""
    overlay = tmp_path / name
    overlay.mkdir(parents=True)
    k8s = os.path.join(REPO_ROOT, "k8s")

    def rel(paths):
        return "[" + ", ".join(os.path.relpath(os.path.join(k8s, p), overlay) for p in paths) + "]"

    (overlay / "kustomization.yaml").write_text("\n".join([
        "apiVersion: kustomize.config.k8s.io/v1beta1", "kind: Kustomization",
        f"resources: {rel(resources)}", *([f"components: {rel(components)}"] if components else []), *extra]))
    proc = subprocess.run([_tool("kubectl"), "kustomize", str(overlay), "--load-restrictor", "LoadRestrictionsNone"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _experiment(docs) -> ExperimentConfig:
    cm = next(d for d in _objects(docs, "ConfigMap") if d["metadata"]["name"] == "backdoor-train-experiment")
    return ExperimentConfig.from_dict(yaml.safe_load(cm["data"]["experiment.yaml"]))


# --- images --------------------------------------------------------------------------------

@pytest.mark.parametrize("flavor", ["cpu", "gpu"])
def test_dockerfile_is_hadolint_clean_and_pinned(flavor):
    path = os.path.join(REPO_ROOT, "docker", f"Dockerfile.{flavor}")
    lint = subprocess.run([_tool("hadolint"), path], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    text = open(path).read()
    # One CUDA stack on GPU: the torch wheel's, on Ray's CUDA-free image (no -gpu / -cuXY base);
    # a build arg only so that a stand-in can be named where the registry is out of reach.
    assert re.search(rf"^ARG BASE_IMAGE=rayproject/ray:{re.escape(RAY_VERSION)}-py311-cpu\nFROM \$\{{BASE_IMAGE\}}$",
                     text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://(download\.pytorch\.org/whl/cpu|pypi\.org/simple)$", text, re.M)
    assert ("download.pytorch.org/whl/cpu" in text) == (flavor == "cpu")
    assert re.search(r"^ARG MNIST_SOURCE=download$", text, re.M)
    # MNIST is fetched before the code is copied: code changes reuse its layer.
    assert text.index("fetch_mnist.py") < text.index("COPY --chown=1000:100 constraints.txt")
    # WORKDIR creates a missing folder as root (Buildah, Kaniko, the classic builder): the user makes it first.
    workdir = re.search(r"^WORKDIR (\S+)$", text, re.M)
    assert workdir and re.search(rf"^RUN mkdir -p {re.escape(workdir.group(1))}$", text[:workdir.start()], re.M)
    for pkg in ("torch", "torchvision"):
        assert f"{pkg}=={PINS[pkg]}" in text
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and all(u.isdigit() and u != "0" for u in users), users
    for src in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for item in src.split():
            assert os.path.exists(os.path.join(REPO_ROOT, item)), item
    assert "pip install" not in " ".join(re.findall(r"^(?:CMD|ENTRYPOINT).*$", text, re.M))


def test_the_gpu_image_states_the_cuda_of_its_torch_wheel():
    import torch

    # The image installs the PyPI wheel this environment was installed from (the same pin).
    if torch.version.cuda is None:
        pytest.skip("a CPU-only torch build here: the PyPI wheel's CUDA cannot be read from it")
    major = torch.version.cuda.split(".")[0]
    text = open(os.path.join(REPO_ROOT, "docker", "Dockerfile.gpu")).read()
    assert f"torch.version.cuda.startswith('{major}.')" in text
    doc = open(os.path.join(REPO_ROOT, "docs", "kubernetes.md")).read()
    assert re.search(rf"CUDA {major}\.\d+ .*driver .*>= ?\d+", doc), "docs/kubernetes.md must state the CUDA and driver"


def test_dockerignore_admits_only_what_the_images_copy():
    lines = [ln.strip() for ln in open(os.path.join(REPO_ROOT, ".dockerignore")) if ln.strip() and ln[0] != "#"]
    assert lines[0] == "*"  # an allowlist: docs/, runs/, .venv, tool folders stay out
    admitted = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = set()
    for flavor in ("cpu", "gpu"):
        text = open(os.path.join(REPO_ROOT, "docker", f"Dockerfile.{flavor}")).read()
        for src in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
            copied |= {item.rstrip("/") for item in src.split()}
    assert admitted == copied


# --- rendering and schemas -----------------------------------------------------------------

def test_every_overlay_renders_the_core_objects(rendered):
    for overlay, docs in rendered.items():
        kinds = {d["kind"] for d in docs}
        assert {"Namespace", "Service", "Job", "ConfigMap", "Deployment"} <= kinds, overlay
        minio = [d for d in docs if d["metadata"]["name"] == "minio"]
        assert {d["kind"] for d in minio} == ({"StatefulSet", "Service"} if overlay in MINIO_OVERLAYS else set())
        assert kinds & {"RayJob", "RayCluster"}, overlay
        assert all(d["metadata"].get("namespace") == "backdoor-train" for d in docs if d["kind"] != "Namespace")


def test_core_objects_validate_against_kubernetes(rendered):
    import kubernetes_validate

    for overlay, docs in rendered.items():
        for d in docs:
            if d["apiVersion"].startswith(CUSTOM_GROUPS):
                continue
            try:
                kubernetes_validate.validate(d, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{overlay} {d['kind']}/{d['metadata']['name']}: {exc.message} at {list(exc.path)}")


def unknown_fields(obj, schema, path="") -> list[str]:
    """Fields of ``obj`` its structural schema does not declare: the API server rejects them
    (``kubectl apply --validate=strict``, the default) where JSON Schema lets them pass."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(obj, dict) and schema.get("type") == "object":
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, value in obj.items():
            if props is not None and key in props:
                found += unknown_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(value, extra, f"{path}.{key}")
            elif props is not None and not extra and not (path == "" and key in ("apiVersion", "kind", "metadata")):
                found.append(f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


@pytest.fixture(scope="module")
def crd_schemas():
    if not os.path.isdir(CRD_DIR):
        pytest.skip(f"KubeRay CRD schemas not found at {CRD_DIR}")
    schemas = {}
    for name, kind in (("ray.io_rayjobs.yaml", "RayJob"), ("ray.io_rayclusters.yaml", "RayCluster")):
        crd = yaml.safe_load(open(os.path.join(CRD_DIR, name)))
        schemas[kind] = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    return schemas


def crd_errors(d, schemas) -> list[str]:
    import jsonschema

    errors = [f"{list(e.path)}: {e.message}" for e in jsonschema.Draft7Validator(schemas[d["kind"]]).iter_errors(d)]
    return sorted(errors) + [f"{f}: unknown field" for f in unknown_fields(d, schemas[d["kind"]])]


def test_ray_objects_validate_strictly_against_the_kuberay_crds(rendered, crd_schemas):
    checked = 0
    for overlay, docs in rendered.items():
        for d in docs:
            if d["kind"] in crd_schemas:
                assert d["apiVersion"] == "ray.io/v1"
                errors = crd_errors(d, crd_schemas)
                assert not errors, f"{overlay} {d['kind']}: " + "; ".join(errors[:5])
                checked += 1
    assert checked >= 3


def test_a_misspelt_field_is_refused_as_the_api_server_would(rendered, crd_schemas):
    import copy

    job = copy.deepcopy(_objects(rendered["local-cpu"], "RayJob")[0])
    job["spec"]["shutdownAfterJobFinish"] = job["spec"].pop("shutdownAfterJobFinishes")
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    errors = crd_errors(job, crd_schemas)
    assert ".spec.shutdownAfterJobFinish: unknown field" in errors
    assert any(e.endswith("containers[0].imagePullPolicyy: unknown field") for e in errors), errors


# --- consistency ---------------------------------------------------------------------------

def test_ray_version_and_image_tags_match_the_pins(rendered):
    for overlay, docs in rendered.items():
        for cluster in _ray_cluster_specs(docs):
            assert cluster["rayVersion"] == RAY_VERSION
        pods = dict(_pod_specs(docs))
        assert set(CPU_ONLY_PODS) & set(pods), overlay
        for where, pod in pods.items():
            # The submitter and the stage Job never pull the ~7 GB GPU image.
            flavor = "gpu" if overlay in GPU_OVERLAYS and where not in CPU_ONLY_PODS else "cpu"
            for c in pod["containers"] + pod.get("initContainers", []):
                image = c["image"]
                # Mapped by the overlay's `images:`: a placeholder left bare has no registry or tag.
                assert re.search(r":[^:/]+$", image) and not image.endswith(":latest"), f"{where}: {image}"
                if "backdoor-train" in image:
                    assert image == f"ghcr.io/backdoor-train/backdoor-train:{VERSION}-{flavor}", \
                        f"{overlay} {where}: {image}"


def test_env_vars_in_manifests_are_the_ones_the_code_reads(rendered):
    read_by_code = set(S3_ENV_VARS) | {ENV_CACHE_DIR}
    minio_own = {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}
    for overlay, docs in rendered.items():
        secrets = {d["metadata"]["name"]: d for d in _objects(docs, "Secret")}
        for where, pod in _pod_specs(docs):
            for c in pod["containers"]:
                names = {e["name"] for e in c.get("env", [])}
                allowed = read_by_code | (minio_own if c["name"] == "minio" else set())
                assert names <= allowed, f"{overlay} {where}: {names - allowed}"
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in read_by_code
                for src in c.get("envFrom", []):
                    name = src.get("secretRef", {}).get("name")
                    if name in secrets:  # the gpu overlay expects it created out of band
                        assert set(secrets[name]["stringData" if "stringData" in secrets[name] else "data"]) \
                            <= read_by_code


def test_endpoints_ports_and_buckets_agree(rendered):
    from backdoor_train.training.metrics import worker_port

    for overlay, docs in rendered.items():
        cfg = _experiment(docs)
        services = {d["metadata"]["name"]: d for d in _objects(docs, "Service")}
        # Pushgateway and MinIO URLs point at the Services, on their ports.
        m = re.match(r"^http://([a-z0-9-]+)\.backdoor-train\.svc:(\d+)$", cfg.metrics.pushgateway)
        assert m and int(m.group(2)) in [p["port"] for p in services[m.group(1)]["spec"]["ports"]]
        for where, pod in _pod_specs(docs):
            for c in pod["containers"]:
                for e in c.get("env", []):
                    if e["name"] == "AWS_ENDPOINT_URL":
                        m = re.match(r"^http://([a-z0-9-]+)\.backdoor-train\.svc:(\d+)$", e["value"])
                        assert m and int(m.group(2)) in [p["port"] for p in services[m.group(1)]["spec"]["ports"]]
        # Every Service's named targetPort is a port of the pods it selects.
        for svc in services.values():
            pods = [p for w, p in _pod_specs(docs) if w.split("/")[-1] == svc["metadata"]["name"]
                    or w.endswith("/" + svc["metadata"]["name"])]
            names = {p["name"] for pod in pods for c in pod["containers"] for p in c.get("ports", [])}
            for port in svc["spec"]["ports"]:
                assert port["targetPort"] in names, (svc["metadata"]["name"], port)
        # Workers expose the ports the PodMonitor scrapes by name: on a pod, the first worker of
        # fit k (0 clean, 1 poisoned) serves metrics.port + k (backdoor_train.training.metrics.worker_port).
        for cluster in _ray_cluster_specs(docs):
            group = cluster["workerGroupSpecs"][0]
            ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
            assert ports == {"train-metrics": worker_port(cfg.metrics.port, 0, 0, 2),
                             "train-metrics-1": worker_port(cfg.metrics.port, 0, 1, 2)} == \
                {"train-metrics": 9100, "train-metrics-1": 9101}, overlay
            assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == cfg.scaling.num_workers
            gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
            assert cfg.scaling.use_gpu == (overlay in GPU_OVERLAYS) == (gpus == "1")
            if gpus:
                # One GPU pod holds one worker of each model (half a GPU each), both at once:
                # its Ray CPUs are sized for the two, and the job needs one GPU in all.
                per_pod = int(group["rayStartParams"]["num-gpus"]) / cfg.scaling.gpus_per_worker
                assert int(group["rayStartParams"]["num-gpus"]) == 1 and per_pod == 2, overlay
                assert int(group["rayStartParams"]["num-cpus"]) == per_pod * cfg.scaling.cpus_per_worker
                assert group["replicas"] * int(group["rayStartParams"]["num-gpus"]) == 1
                assert any(t["key"] == "nvidia.com/gpu" for t in group["template"]["spec"]["tolerations"])
            else:
                assert int(group["rayStartParams"]["num-cpus"]) == cfg.scaling.cpus_per_worker
        # The staging Job fills the bucket the experiment reads and writes.
        job = next(d for d in _objects(docs, "Job") if d["metadata"]["name"] == "stage-mnist")
        dest = job["spec"]["template"]["spec"]["containers"][0]["command"][2]
        assert dest == cfg.data.root
        assert split_s3_uri(cfg.storage.path)[0] == split_s3_uri(dest)[0]


def test_rayjob_retries_resume_and_nothing_installs_at_start(rendered):
    for overlay in ("local-cpu", "gpu", "aws-s3"):
        docs = rendered[overlay]
        job = _objects(docs, "RayJob")[0]["spec"]
        assert job["shutdownAfterJobFinishes"] is True and job["backoffLimit"] >= 1
        assert "runtimeEnvYAML" not in job and "pip" not in job["entrypoint"]
        assert job["entrypoint"] == "backdoor-train run /home/ray/experiment/experiment.yaml"
        assert _experiment(docs).train.max_failures >= 1
        head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
        volume = next(v for v in head["volumes"] if v["name"] == mounts["/home/ray/experiment"])
        assert volume["configMap"]["name"] == "backdoor-train-experiment"


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def restricted_violations(pod: dict) -> list[str]:
    """What in a pod spec breaks the Pod Security Standard "restricted" (v1.32): the checks
    the namespace's admission makes. KubeRay's injected wait-gcs-ready init container copies
    the Ray container's securityContext, so checking the template covers it."""
    bad = []
    psc = pod.get("securityContext", {})
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(host):
            bad.append(host)
    for v in pod.get("volumes", []):
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            bad.append(f"volume {v['name']}: {kinds - RESTRICTED_VOLUMES}")
    if psc.get("runAsUser") == 0:
        bad.append("pod runAsUser 0")
    for c in pod["containers"] + pod.get("initContainers", []):
        sc, name = c.get("securityContext", {}), c["name"]
        if sc.get("privileged"):
            bad.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: capabilities must drop ALL and add at most NET_BIND_SERVICE")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            bad.append(f"{name}: runAsNonRoot must be true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            bad.append(f"{name}: runAsUser 0")
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            bad.append(f"{name}: hostPort")
    return bad


def test_every_pod_meets_the_restricted_level_the_namespace_enforces(rendered):
    assert restricted_violations({"containers": [{"name": "x", "securityContext": {}}]})  # the check can fail
    for overlay, docs in rendered.items():
        ns = _objects(docs, "Namespace")[0]["metadata"]["labels"]
        assert ns["pod-security.kubernetes.io/enforce"] == "restricted", overlay
        for where, pod in _pod_specs(docs):
            assert not restricted_violations(pod), f"{overlay} {where}: {restricted_violations(pod)}"
            for c in pod["containers"]:
                assert {"cpu", "memory"} <= set(c["resources"]["requests"]) <= set(c["resources"]["limits"]), where


def test_local_cpu_fits_a_two_cpu_eight_gib_kind_node_without_extra_crds(rendered):
    docs = rendered["local-cpu"]
    # Only KubeRay's CRDs: `kubectl apply -k` works on a bare kind cluster with the operator.
    assert {d["apiVersion"].split("/")[0] for d in docs if "." in d["apiVersion"].split("/")[0]} <= \
        {"ray.io", "apps", "batch", "networking.k8s.io"}
    pods = list(_pod_specs(docs))
    replicas = {"ray-workers/workers": _objects(docs, "RayJob")[0]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
                ["replicas"]}
    cpu = sum(quantity(c["resources"]["requests"]["cpu"]) * replicas.get(w, 1) for w, p in pods for c in p["containers"])
    mem = sum(quantity(c["resources"]["requests"]["memory"]) * replicas.get(w, 1) for w, p in pods for c in p["containers"])
    # kind's own pods request ~0.95 CPU and ~0.3 GiB, the KubeRay operator 0.1 CPU and 0.5 GiB.
    assert cpu <= 0.95 and mem <= 7.0 * 2**30, (cpu, mem / 2**30)


def test_the_ray_apis_admit_only_the_namespace_and_need_a_token(rendered):
    for overlay, docs in rendered.items():
        policies = {p["metadata"]["name"]: p["spec"] for p in _objects(docs, "NetworkPolicy")}
        default = policies["same-namespace-only"]
        assert default["podSelector"] == {} and default["ingress"] == [{"from": [{"podSelector": {}}]}]
        operator = policies["kuberay-operator-to-dashboard"]
        assert operator["ingress"][0]["ports"] == [{"port": 8265, "protocol": "TCP"}]
        # The operator where docs/kubernetes.md's quick start (kuberay-system) and KubeRay's own (default)
        # install it, by the label its Helm chart and its kustomize manifests both set.
        peer = operator["ingress"][0]["from"][0]
        assert selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": "kuberay-system"})
        assert selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": "default"})
        assert not selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": "backdoor-train"})
        assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/component": "kuberay-operator"}}
        for cluster in _ray_cluster_specs(docs):
            assert cluster["authOptions"] == {"mode": "token"}, overlay
        for job in _objects(docs, "RayJob"):
            assert job["spec"]["ttlSecondsAfterFinished"] <= 600  # minutes: finished pods hold GPUs


def _render_with_monitoring(tmp_path, *extra: str) -> list[dict]:
    """local-cpu plus the opt-in monitoring component, as a user's overlay adds it."""
    return _render(tmp_path, "monitored", ["overlays/local-cpu"], ["components/monitoring"], *extra)


@pytest.mark.integration  # kubectl: a system binary
def test_the_operator_policy_takes_another_namespace_as_its_comment_says(tmp_path):
    docs = _render(tmp_path, "operator-elsewhere", ["overlays/local-cpu"], [], "patches:",
                   "  - target: {kind: NetworkPolicy, name: kuberay-operator-to-dashboard}", "    patch: |-",
                   "      - op: replace",
                   "        path: /spec/ingress/0/from/0/namespaceSelector/matchExpressions/0/values",
                   "        value: [my-operator-namespace]")
    policy = next(p for p in _objects(docs, "NetworkPolicy")
                  if p["metadata"]["name"] == "kuberay-operator-to-dashboard")
    selector = policy["spec"]["ingress"][0]["from"][0]["namespaceSelector"]
    assert selects(selector, {"kubernetes.io/metadata.name": "my-operator-namespace"})
    assert not selects(selector, {"kubernetes.io/metadata.name": "kuberay-system"})
    comment = open(os.path.join(REPO_ROOT, "k8s", "base", "networkpolicy.yaml")).read()
    assert "/spec/ingress/0/from/0/namespaceSelector/matchExpressions/0/values" in comment


@pytest.mark.integration  # kubectl: a system binary
def test_monitors_select_the_pods_by_their_port_names_and_a_release_label(tmp_path):
    docs = _render_with_monitoring(tmp_path)
    templates = []
    for cluster in _ray_cluster_specs(docs):
        templates.append(cluster["headGroupSpec"]["template"])
        templates += [g["template"] for g in cluster["workerGroupSpecs"]]
    monitors = _objects(docs, "PodMonitor") + _objects(docs, "ServiceMonitor")
    assert len(monitors) == 3 and all(m["metadata"]["labels"]["release"] == "kube-prometheus-stack" for m in monitors)
    for mon in _objects(docs, "PodMonitor"):
        selected = [t for t in templates if selects(mon["spec"]["selector"], t["metadata"]["labels"])]
        assert selected, mon["metadata"]["name"]
        for endpoint in mon["spec"]["podMetricsEndpoints"]:
            if endpoint["port"] == "metrics":
                continue  # the name KubeRay gives Ray's own port (8080) on every Ray pod
            for t in selected:
                assert endpoint["port"] in {p["name"] for c in t["spec"]["containers"] for p in c.get("ports", [])}
    # Prometheus may reach every port the worker monitor scrapes.
    scrape = next(p for p in _objects(docs, "NetworkPolicy") if p["metadata"]["name"] == "prometheus-scrapes")
    admitted = {p["port"] for rule in scrape["spec"]["ingress"] for p in rule["ports"]}
    workers = next(m for m in _objects(docs, "PodMonitor") if m["metadata"]["name"] == "backdoor-train-workers")
    assert [e["port"] for e in workers["spec"]["podMetricsEndpoints"]] == ["train-metrics", "train-metrics-1"]
    worker_ports = {p["name"]: p["containerPort"] for t in templates for c in t["spec"]["containers"]
                    for p in c.get("ports", []) if p["name"].startswith("train-metrics")}
    assert worker_ports == {"train-metrics": 9100, "train-metrics-1": 9101} and set(worker_ports.values()) <= admitted
    # No container of ours takes KubeRay's name for Ray's metrics port.
    assert all(p["name"] != "metrics" for t in templates for c in t["spec"]["containers"] for p in c.get("ports", []))
    pushgateway = _objects(docs, "ServiceMonitor")[0]
    service = next(s for s in _objects(docs, "Service") if s["metadata"]["name"] == "pushgateway")
    assert selects(pushgateway["spec"]["selector"], service["metadata"]["labels"])
    assert pushgateway["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    dashboard = next(c for c in _objects(docs, "ConfigMap") if c["metadata"]["name"].endswith("grafana-dashboard"))
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"

    # Another Prometheus release: one patch in the user's overlay relabels every monitor.
    patched = _render_with_monitoring(tmp_path / "other", "patches:", "  - target: {group: monitoring.coreos.com}",
                                      "    patch: |-", "      - op: replace", "        path: /metadata/labels/release",
                                      "        value: prom")
    assert {m["metadata"]["labels"]["release"] for m in _objects(patched, "PodMonitor") +
            _objects(patched, "ServiceMonitor")} == {"prom"}


def test_aws_s3_takes_credentials_from_the_default_chain(rendered):
    from backdoor_train.storage.s3 import S3Settings

    docs = rendered["aws-s3"]
    accounts = {d["metadata"]["name"]: d for d in _objects(docs, "ServiceAccount")}
    assert set(accounts) == {"backdoor-train"}
    # IRSA's annotation, a placeholder to replace (or to delete for EKS Pod Identity).
    role = accounts["backdoor-train"]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert role.startswith("arn:aws:iam::")
    assert not _objects(docs, "Secret") and not _objects(docs, "StatefulSet")
    s3_pods = {"ray-head", "ray-workers/gpu-workers", "Job/stage-mnist"}
    pods = dict(_pod_specs(docs))
    assert s3_pods | set(CPU_ONLY_PODS) <= set(pods)
    for where, pod in pods.items():
        if where in s3_pods | set(CPU_ONLY_PODS):
            assert pod.get("serviceAccountName") == "backdoor-train", where
        for c in pod["containers"]:
            assert not c.get("envFrom"), where  # no Secret of keys
            env = {e["name"]: e["value"] for e in c.get("env", [])}
            settings = S3Settings.from_env(env)
            # No endpoint: AWS S3 itself; no keys: boto3's and pyarrow's default chain.
            assert settings.endpoint_url is None and settings.access_key is None, where
            if where in s3_pods:
                assert env.get("AWS_REGION"), where
    # The bucket exists (infrastructure): staging into it creates nothing.
    job = next(d for d in _objects(docs, "Job") if d["metadata"]["name"] == "stage-mnist")
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--create-bucket" not in command
    cfg = _experiment(docs)
    assert split_s3_uri(cfg.data.root)[0] == split_s3_uri(cfg.storage.path)[0] == "replace-with-your-bucket"


@pytest.mark.integration  # kubectl: a system binary
def test_the_shared_gpu_cluster_component_validates_and_queues_the_job(tmp_path, crd_schemas):
    import kubernetes_validate

    docs = _render(tmp_path, "shared", ["overlays/gpu"], ["components/shared-gpu-cluster"])
    job = _objects(docs, "RayJob")[0]
    errors = crd_errors(job, crd_schemas)
    assert not errors, "; ".join(errors[:5])
    spec = job["spec"]
    # Kueue's RayJob integration: the queue label, created suspended (Kueue unsuspends it on
    # admission), the cluster deleted when the job ends (Kueue refuses the job otherwise).
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]
    assert spec["suspend"] is True and spec["shutdownAfterJobFinishes"] is True
    assert "preRunningDeadlineSeconds" in crd_schemas["RayJob"]["properties"]["spec"]["properties"]
    assert 0 < spec["preRunningDeadlineSeconds"] < spec["activeDeadlineSeconds"]
    classes = {w: p.get("priorityClassName") for w, p in _pod_specs([job])}
    assert len(classes) == 3 and len(set(classes.values())) == 1, classes
    # The PriorityClass it names, for clusters without one (applied by an admin, not by kustomize).
    path = os.path.join(REPO_ROOT, "k8s", "components", "shared-gpu-cluster", "priorityclass.yaml")
    priority_class = yaml.safe_load(open(path))
    kubernetes_validate.validate(priority_class, K8S_VERSION, strict=True)
    assert priority_class["metadata"]["name"] == set(classes.values()).pop()
    assert not _objects(docs, "PriorityClass")
    # The rest of the overlay is unchanged, and every pod still meets "restricted".
    for where, pod in _pod_specs(docs):
        assert not restricted_violations(pod), where


def test_the_images_workflow_pins_its_actions_and_pushes_only_tags():
    path = os.path.join(REPO_ROOT, ".github", "workflows", "images.yml")
    text = open(path).read()
    workflow = yaml.safe_load(text)
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as true
    assert set(triggers) == {"push", "pull_request"} and triggers["push"] == {"tags": ["v*"]}
    job = workflow["jobs"]["image"]
    assert job["strategy"]["matrix"]["flavor"] == ["cpu", "gpu"]
    steps = job["steps"]
    used = [s["uses"] for s in steps if "uses" in s]
    assert {u.split("@")[0] for u in used} == {"actions/checkout", "docker/setup-buildx-action", "docker/login-action",
                                             "docker/metadata-action", "docker/build-push-action"}
    for uses in used:
        # A full commit SHA, with the release it was read from beside it.
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", uses), uses
        assert re.search(rf"uses: {re.escape(uses)}  # v\d+\.\d+\.\d+$", text, re.M), uses
    by_name = {s["name"]: s for s in steps}
    assert "backdoor-train --help" in by_name["Smoke test"]["run"]
    names = list(by_name)
    assert names.index("Smoke test") < names.index("Push")
    for name in ("Log in to ghcr.io", "Push"):
        assert by_name[name]["if"] == "github.event_name == 'push' && github.ref_type == 'tag'"
    assert by_name["Push"]["with"]["push"] is True and by_name["Build for the test"]["with"]["push"] is False
    assert "steps.push.outputs.digest" in by_name["Pushed digest"]["env"]["DIGEST"]
    assert by_name["Build for the test"]["with"]["file"] == "docker/Dockerfile.${{ matrix.flavor }}"


def test_the_interactive_raycluster_matches_the_rayjob(rendered):
    job = _objects(rendered["local-cpu"], "RayJob")[0]["spec"]["rayClusterSpec"]
    cluster = _objects(rendered["interactive"], "RayCluster")[0]["spec"]
    assert cluster == job


def test_experiment_configs_in_the_manifests_load(rendered):
    for overlay, docs in rendered.items():
        cfg = _experiment(docs)
        assert cfg.data.root.startswith("s3://") and cfg.storage.path.startswith("s3://")
        assert (cfg.train.epochs, cfg.train.batch_size, cfg.poison.rate, cfg.poison.target) == (10, 500, 0.01, 8)


def test_images_and_ci_install_the_same_pinned_versions():
    from importlib.metadata import version

    from packaging.requirements import Requirement

    # Exact pins only in constraints.txt; pyproject.toml's ranges each hold their pin.
    deps = {(r := Requirement(d)).name.lower(): r.specifier for d in PYPROJECT["project"]["dependencies"]}
    assert set(PINS) <= set(deps)
    for name, ver in PINS.items():
        assert not any(s.operator in ("==", "===") for s in deps[name]), f"pyproject.toml pins {name} exactly"
        assert deps[name].contains(ver), f"pyproject.toml's {name}{deps[name]} excludes constraints.txt's {ver}"
    for flavor in ("cpu", "gpu"):
        text = open(os.path.join(REPO_ROOT, "docker", f"Dockerfile.{flavor}")).read()
        assert "pip install --no-cache-dir -c constraints.txt ." in text
    assert "-c constraints.txt" in open(os.path.join(REPO_ROOT, "scripts", "setup.sh")).read()
    # This environment was installed the way CI installs: it holds exactly those versions.
    for name, ver in PINS.items():
        assert version(name).split("+")[0] == ver, name


def test_the_container_check_runs_each_pod_as_the_manifests_and_kuberay_say(rendered, tmp_path):
    # scripts/podman_kuberay.py turns the rendered objects into `podman run` lines; what it
    # reads must be what the manifests say (not retyped), and what KubeRay adds must be there.
    from podman_kuberay import Manifests, RayJobCluster

    m = Manifests(rendered["local-cpu"])
    cluster = RayJobCluster(m, m.one("RayJob"), str(tmp_path))
    spec = m.one("RayJob")["spec"]["rayClusterSpec"]
    head = cluster.head_pod("127.0.0.1:8265:8265")
    workers = cluster.worker_pods()
    assert len(workers) == spec["workerGroupSpecs"][0]["replicas"]
    for pod, group in [(head, spec["headGroupSpec"]), *((w, spec["workerGroupSpecs"][0]) for w in workers)]:
        args = pod.run_args()
        line = " ".join(args)
        container = group["template"]["spec"]["containers"][0]
        assert args[args.index("--user") + 1] == "1000:100"
        for flag in ("--cap-drop ALL", "--security-opt no-new-privileges", "--read-only --read-only-tmpfs=false"):
            assert flag in line
        limit = int(quantity(container["resources"]["limits"]["memory"]))
        assert f"--memory {limit}" in line and f"--memory={limit}" in line  # cgroup and Ray's view
        for key, value in group["rayStartParams"].items():
            assert f"--{key}={value}" in line
        assert "--metrics-export-port=8080" in line and "RAY_AUTH_MODE=token" in line
        assert f"RAY_AUTH_TOKEN={cluster.token}" in line
        assert container["image"] == args[args.index("/bin/bash") - 1]
        for mount in container["volumeMounts"]:
            assert f"dst={mount['mountPath']}" in line or f" {mount['mountPath']}:" in line \
                or f":{mount['mountPath']}:ro" in line
    assert f"--address={cluster.head_host}:6379" in " ".join(workers[0].run_args())
    assert f"{cluster.head_svc}.backdoor-train.svc" in " ".join(head.run_args())
    assert "--head" in " ".join(head.run_args()) and "--head" not in " ".join(workers[0].run_args())
    # The submitter runs the RayJob's own entrypoint in the submitter template's (CPU) image.
    submitter = " ".join(cluster.submitter("id-1").run_args())
    assert m.one("RayJob")["spec"]["entrypoint"] in submitter
    assert m.one("RayJob")["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] in submitter


def test_same_figures_ignores_where_and_when_but_not_what(tmp_path):
    sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
    from same_figures import main as same_figures

    import dataclasses

    from fake_results import experiment_results

    def results(asr: float, seconds: float, path: str) -> dict:
        cfg = ExperimentConfig.from_dict({"storage": {"path": path}})
        out = experiment_results(cfg, {"poisoned": (0.98, [0.5, asr])}, run_id=path)
        poisoned = out.variants["poisoned"]
        history = tuple(dataclasses.replace(h, epoch_seconds=seconds) for h in poisoned.history)
        poisoned = dataclasses.replace(poisoned, fit_seconds=seconds, checkpoint=path, history=history)
        return dataclasses.replace(out, started_at=seconds, variants={"poisoned": poisoned}).to_dict()

    a, b, c, d = (tmp_path / n for n in ("a.json", "b.json", "c.json", "d.json"))
    a.write_text(json.dumps(results(0.8787, 10.0, "/runs")))
    b.write_text(json.dumps(results(0.8787, 12.5, "s3://x/runs")))
    c.write_text(json.dumps(results(0.8788, 10.0, "/runs")))
    d.write_text(json.dumps({"variants": {}}))
    assert same_figures(str(a), str(b)) == 0
    assert same_figures(str(a), str(c)) == 1
    assert same_figures(str(a), str(d)) == 2  # not a results file: said so, not compared
