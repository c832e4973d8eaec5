"""Images and Kubernetes manifests, checked statically: lint, render, schemas, consistency."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
import yaml

from backdoor_train.config import ExperimentConfig
from backdoor_train.datasource import ENV_CACHE_DIR
from backdoor_train.storage.s3 import S3_ENV_VARS, split_s3_uri

from conftest import REPO_ROOT

OVERLAYS = ("local-cpu", "gpu", "interactive")
CRD_DIR = os.path.join(REPO_ROOT, "..", "shared", "k8s", "crds")
K8S_VERSION = "1.32.0"
CUSTOM_GROUPS = ("ray.io/", "monitoring.coreos.com/")

with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as _fh:
    PYPROJECT = tomllib.load(_fh)
VERSION = PYPROJECT["project"]["version"]
PINS = dict(re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(.+)$", d).groups()
            for d in PYPROJECT["project"]["dependencies"] if "==" in d)
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
    readme = open(os.path.join(REPO_ROOT, "README.md")).read()
    assert re.search(rf"CUDA {major}\.\d+ .*driver .*>= ?\d+", readme), "README must state the CUDA and driver"


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
        assert {"Namespace", "StatefulSet", "Service", "Job", "ConfigMap", "Deployment"} <= kinds, overlay
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
        flavor = "gpu" if overlay == "gpu" else "cpu"
        for cluster in _ray_cluster_specs(docs):
            assert cluster["rayVersion"] == RAY_VERSION
        for where, pod in _pod_specs(docs):
            for c in pod["containers"] + pod.get("initContainers", []):
                image = c["image"]
                assert re.search(r":[^:/]+$", image) and not image.endswith(":latest"), f"{where}: {image}"
                if "backdoor-train" in image:
                    assert image.endswith(f":{VERSION}-{flavor}"), f"{overlay} {where}: {image}"


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
                    name = src["secretRef"]["name"]
                    if name in secrets:  # the gpu overlay expects it created out of band
                        assert set(secrets[name]["stringData" if "stringData" in secrets[name] else "data"]) \
                            <= read_by_code


def test_endpoints_ports_and_buckets_agree(rendered):
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
        # Workers expose metrics.port under the name the PodMonitor scrapes.
        for cluster in _ray_cluster_specs(docs):
            group = cluster["workerGroupSpecs"][0]
            ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
            assert ports["train-metrics"] == cfg.metrics.port
            assert group["replicas"] == group["minReplicas"] == cfg.scaling.num_workers
            assert int(group["rayStartParams"]["num-cpus"]) == cfg.scaling.cpus_per_worker
            gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
            assert cfg.scaling.use_gpu == (overlay == "gpu") == (gpus == "1")
            if gpus:
                assert int(group["rayStartParams"]["num-gpus"]) == 1
                assert any(t["key"] == "nvidia.com/gpu" for t in group["template"]["spec"]["tolerations"])
        # The staging Job fills the bucket the experiment reads and writes.
        job = next(d for d in _objects(docs, "Job") if d["metadata"]["name"] == "stage-mnist")
        dest = job["spec"]["template"]["spec"]["containers"][0]["command"][2]
        assert dest == cfg.data.root
        assert split_s3_uri(cfg.storage.path)[0] == split_s3_uri(dest)[0]


def test_rayjob_retries_resume_and_nothing_installs_at_start(rendered):
    for overlay in ("local-cpu", "gpu"):
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


def _quantity(value: str) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    m = re.fullmatch(r"([0-9.]+)(m|Ki|Mi|Gi)?", str(value))
    return float(m.group(1)) * units.get(m.group(2) or "", 1)


def test_local_cpu_fits_a_two_cpu_eight_gib_kind_node_without_extra_crds(rendered):
    docs = rendered["local-cpu"]
    # Only KubeRay's CRDs: `kubectl apply -k` works on a bare kind cluster with the operator.
    assert {d["apiVersion"].split("/")[0] for d in docs if "." in d["apiVersion"].split("/")[0]} <= \
        {"ray.io", "apps", "batch", "networking.k8s.io"}
    pods = list(_pod_specs(docs))
    replicas = {"ray-workers/workers": _objects(docs, "RayJob")[0]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
                ["replicas"]}
    cpu = sum(_quantity(c["resources"]["requests"]["cpu"]) * replicas.get(w, 1) for w, p in pods for c in p["containers"])
    mem = sum(_quantity(c["resources"]["requests"]["memory"]) * replicas.get(w, 1) for w, p in pods for c in p["containers"])
    # kind's own pods request ~0.95 CPU and ~0.3 GiB, the KubeRay operator 0.1 CPU and 0.5 GiB.
    assert cpu <= 0.95 and mem <= 7.0 * 2**30, (cpu, mem / 2**30)


def test_the_ray_apis_admit_only_the_namespace_and_need_a_token(rendered):
    for overlay, docs in rendered.items():
        policies = {p["metadata"]["name"]: p["spec"] for p in _objects(docs, "NetworkPolicy")}
        default = policies["same-namespace-only"]
        assert default["podSelector"] == {} and default["ingress"] == [{"from": [{"podSelector": {}}]}]
        operator = policies["kuberay-operator-to-dashboard"]
        assert operator["ingress"][0]["ports"] == [{"port": 8265, "protocol": "TCP"}]
        for cluster in _ray_cluster_specs(docs):
            assert cluster["authOptions"] == {"mode": "token"}, overlay
        for job in _objects(docs, "RayJob"):
            assert job["spec"]["ttlSecondsAfterFinished"] <= 600  # minutes: finished pods hold GPUs


def _render_with_monitoring(tmp_path, *extra: str) -> list[dict]:
    """local-cpu plus the opt-in monitoring component, as a user's overlay adds it."""
    overlay = tmp_path / "monitored"
    overlay.mkdir(parents=True)
    base = os.path.join(REPO_ROOT, "k8s")
    (overlay / "kustomization.yaml").write_text("\n".join([
        "apiVersion: kustomize.config.k8s.io/v1beta1", "kind: Kustomization",
        f"resources: [{os.path.relpath(os.path.join(base, 'overlays', 'local-cpu'), overlay)}]",
        f"components: [{os.path.relpath(os.path.join(base, 'components', 'monitoring'), overlay)}]", *extra]))
    proc = subprocess.run([_tool("kubectl"), "kustomize", str(overlay), "--load-restrictor", "LoadRestrictionsNone"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _selects(selector: dict, labels: dict) -> bool:
    ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
    for e in selector.get("matchExpressions", []):
        ok &= (labels.get(e["key"]) in e["values"]) == (e["operator"] == "In")
    return ok


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
        selected = [t for t in templates if _selects(mon["spec"]["selector"], t["metadata"]["labels"])]
        assert selected, mon["metadata"]["name"]
        for endpoint in mon["spec"]["podMetricsEndpoints"]:
            if endpoint["port"] == "metrics":
                continue  # the name KubeRay gives Ray's own port (8080) on every Ray pod
            for t in selected:
                assert endpoint["port"] in {p["name"] for c in t["spec"]["containers"] for p in c.get("ports", [])}
    # No container of ours takes KubeRay's name for Ray's metrics port.
    assert all(p["name"] != "metrics" for t in templates for c in t["spec"]["containers"] for p in c.get("ports", []))
    pushgateway = _objects(docs, "ServiceMonitor")[0]
    service = next(s for s in _objects(docs, "Service") if s["metadata"]["name"] == "pushgateway")
    assert _selects(pushgateway["spec"]["selector"], service["metadata"]["labels"])
    assert pushgateway["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    dashboard = next(c for c in _objects(docs, "ConfigMap") if c["metadata"]["name"].endswith("grafana-dashboard"))
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"

    # Another Prometheus release: one patch in the user's overlay relabels every monitor.
    patched = _render_with_monitoring(tmp_path / "other", "patches:", "  - target: {group: monitoring.coreos.com}",
                                      "    patch: |-", "      - op: replace", "        path: /metadata/labels/release",
                                      "        value: prom")
    assert {m["metadata"]["labels"]["release"] for m in _objects(patched, "PodMonitor") +
            _objects(patched, "ServiceMonitor")} == {"prom"}


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

    pins = {}
    for line in open(os.path.join(REPO_ROOT, "constraints.txt")):
        line = line.split("#")[0].strip()
        if line:
            name, ver = line.split("==")
            pins[name] = ver
    deps = {re.split(r"[\[=<>]", d)[0].lower() for d in PYPROJECT["project"]["dependencies"]}
    assert set(pins) <= deps
    for name in ("torch", "torchvision", "ray"):
        assert pins[name] == PINS[name]
    for flavor in ("cpu", "gpu"):
        text = open(os.path.join(REPO_ROOT, "docker", f"Dockerfile.{flavor}")).read()
        assert "pip install --no-cache-dir -c constraints.txt ." in text
    assert "-c constraints.txt" in open(os.path.join(REPO_ROOT, "scripts", "setup.sh")).read()
    # This environment was installed the way CI installs: it holds exactly those versions.
    for name, ver in pins.items():
        assert version(name).split("+")[0] == ver, name
