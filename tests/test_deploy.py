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
from backdoor_train.s3 import S3_ENV_VARS, split_s3_uri

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
    assert re.search(rf"^FROM rayproject/ray:{re.escape(RAY_VERSION)}-py311-{flavor}$", text, re.M)
    for pkg in ("torch", "torchvision"):
        assert f"{pkg}=={PINS[pkg]}" in text
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and all(u.isdigit() and u != "0" for u in users), users
    for src in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for item in src.split():
            assert os.path.exists(os.path.join(REPO_ROOT, item)), item
    assert "pip install" not in " ".join(re.findall(r"^(?:CMD|ENTRYPOINT).*$", text, re.M))


def test_dockerignore_keeps_the_context_small():
    ignored = open(os.path.join(REPO_ROOT, ".dockerignore")).read().split()
    for entry in (".git", ".venv", "runs", "tests"):
        assert entry in ignored


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


def test_ray_objects_validate_against_the_kuberay_crds(rendered):
    if not os.path.isdir(CRD_DIR):
        pytest.skip(f"KubeRay CRD schemas not found at {CRD_DIR}")
    import jsonschema

    schemas = {}
    for name, kind in (("ray.io_rayjobs.yaml", "RayJob"), ("ray.io_rayclusters.yaml", "RayCluster")):
        crd = yaml.safe_load(open(os.path.join(CRD_DIR, name)))
        schemas[kind] = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    checked = 0
    for overlay, docs in rendered.items():
        for d in docs:
            if d["kind"] in schemas:
                assert d["apiVersion"] == "ray.io/v1"
                errors = sorted(jsonschema.Draft7Validator(schemas[d["kind"]]).iter_errors(d), key=str)
                assert not errors, f"{overlay} {d['kind']}: " + "; ".join(
                    f"{list(e.path)}: {e.message}" for e in errors[:5])
                checked += 1
    assert checked >= 3


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
            assert ports["metrics"] == cfg.metrics.port
            assert group["replicas"] == group["minReplicas"] == cfg.scaling.num_workers
            assert int(group["rayStartParams"]["num-cpus"]) == cfg.scaling.cpus_per_worker
            gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
            assert cfg.scaling.use_gpu == (overlay == "gpu") == (gpus == "1")
            if gpus:
                assert int(group["rayStartParams"]["num-gpus"]) == 1
                assert any(t["key"] == "nvidia.com/gpu" for t in group["template"]["spec"]["tolerations"])
        for mon in _objects(docs, "PodMonitor"):
            assert mon["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
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


def test_pods_are_non_root_without_escalation_and_have_limits(rendered):
    for overlay, docs in rendered.items():
        for where, pod in _pod_specs(docs):
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            for c in pod["containers"]:
                assert c["securityContext"]["allowPrivilegeEscalation"] is False, where
                assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], where
                assert {"cpu", "memory"} <= set(c["resources"]["requests"]) <= set(c["resources"]["limits"]), where


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
