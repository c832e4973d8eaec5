#!/usr/bin/env bash
# The deployment, executed: builds both images and runs the product in them as the manifests
# say. Opt-in (not part of the test suite): run as root on a machine with podman, buildah,
# debootstrap, kubectl and Debian's prometheus + prometheus-pushgateway. Measured on 2 vCPUs
# (AMD EPYC): ~22 minutes with the images cached, ~16 more for cold builds (docs/kubernetes.md,
# "Executed"; the figures of a run are in docs/RESULTS.md, "Container check").
#
#   scripts/container-check.sh [--steps 1,2,3,4,5]
#
#   1. builds the Ray stand-in base (scripts/build-ray-standin.sh), the CPU and GPU images
#      (tags read from the rendered overlays) and the S3 stand-in; checks the GPU image's
#      imports without a GPU; prints their sizes
#   2. `backdoor-train run jobs/article.yaml` on this host and inside the CPU image as uid 1000
#      under the pods' security context (capabilities dropped, no-new-privileges, read-only root,
#      the manifests' writable mounts only): the same figures, and both wall times
#   3-5. scripts/podman_kuberay.py: the local-cpu overlay's cluster in containers, the RayJob's
#      entrypoint submitted with token auth; a worker killed mid-run and replaced; Prometheus
#      scraping by the monitors' port names; docs/kubernetes.md's interactive walkthrough
#
# Each step prints its result and time; the exit status is 0 only when every step passed.
# Environment: MNIST_ROOT (default ../shared/datasets/mnist), TORCH_INDEX_URL (default PyPI:
# this machine reaches only the package registries; PyPI's torch is the CUDA build, so the
# CPU image is as large as the GPU one here), CA_BUNDLE (scripts/lib/podman.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/podman.sh

steps=1,2,3,4,5
[[ "${1:-}" == "--steps" ]] && steps=$2
want() { [[ ",$steps," == *",$1,"* ]]; }
[[ $(id -u) == 0 ]] || { echo "run as root (podman builds and the check's volumes)"; exit 2; }
for tool in podman debootstrap kubectl bc; do
  command -v $tool > /dev/null || { echo "missing $tool: apt-get install podman buildah debootstrap kubectl bc"; exit 2; }
done
[[ -x .venv/bin/backdoor-train ]] || scripts/setup.sh > /dev/null

MNIST_ROOT=${MNIST_ROOT:-../shared/datasets/mnist}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://pypi.org/simple}
RAY_VERSION=$(sed -n 's/^ray==//p' constraints.txt)
STANDIN_IMAGE=localhost/backdoor-train/ray-standin:${RAY_VERSION}-py311-cpu
export S3_IMAGE=localhost/backdoor-train/s3-standin:moto
# The tags the overlays deploy, so the cluster of steps 3-5 runs exactly what they name.
image_of() { kubectl kustomize "k8s/overlays/$1" | sed -n "s/^ *image: \(.*-$2\)$/\1/p" | sort -u | head -1; }
CPU_IMAGE=$(image_of local-cpu cpu)
GPU_IMAGE=$(image_of gpu gpu)
t_all=$(date +%s)
failed=0

if want 1; then
  echo "step 1: images (base ${STANDIN_IMAGE}, torch from ${TORCH_INDEX_URL})"
  t1=$(date +%s)
  scripts/build-ray-standin.sh
  # MNIST from the build context: the build cannot download it here.
  mkdir -p docker/mnist/MNIST/raw
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    [[ -f docker/mnist/MNIST/raw/$f.gz ]] || cp "$MNIST_ROOT/MNIST/raw/$f.gz" docker/mnist/MNIST/raw/
  done
  for flavor in cpu gpu; do
    image=$CPU_IMAGE; [[ $flavor == gpu ]] && image=$GPU_IMAGE
    step "build docker/Dockerfile.$flavor -> $image"
    bt_build -f "docker/Dockerfile.$flavor" --build-arg BASE_IMAGE="$STANDIN_IMAGE" \
      --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" --build-arg MNIST_SOURCE=context -t "$image" . \
      || fail_step "docker/Dockerfile.$flavor"
    done_step "$(podman image inspect "$image" --format '{{.Size}}' | awk '{printf "%.2f GB", $1/1e9}')"
  done
  step "S3 stand-in (moto_server) for MinIO"
  bt_build -f docker/standin/Dockerfile.s3 --build-arg BASE_IMAGE="$STANDIN_IMAGE" -t "$S3_IMAGE" docker/standin \
    || fail_step "docker/standin/Dockerfile.s3"
  done_step "$S3_IMAGE"
  step "imports in the GPU image, no GPU present"
  out=$(podman run --rm "${PODMAN_RUN_FLAGS[@]}" --user 1000 "$GPU_IMAGE" python -c \
    "import torch, ray, backdoor_train; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'ray', ray.__version__, 'cuda available', torch.cuda.is_available())") \
    || fail_step "imports"
  done_step "$out"
  echo "step 1: PASSED ($(( $(date +%s) - t1 )) s)"
fi

if want 2; then
  echo "step 2: jobs/article.yaml on the host and in $CPU_IMAGE"
  t2=$(date +%s)
  work=$(mktemp -d /var/tmp/bt-job.XXXXXX)
  # The pods' writable mounts (k8s/base/rayjob.yaml): emptyDirs for the cache and /tmp, a
  # memory emptyDir on /dev/shm; here also the runs folder, to read the results back.
  mkdir -p "$work"/{host,runs,cache,tmp}
  chown 1000:100 "$work"/{runs,cache,tmp}
  step "host: backdoor-train run jobs/article.yaml"
  th=$(date +%s.%N)
  .venv/bin/backdoor-train run jobs/article.yaml --set storage.path="$work/host" > "$work/host.log" 2>&1 \
    || { tail -20 "$work/host.log"; fail_step "host run"; }
  host_s=$(echo "$(date +%s.%N) - $th" | bc)
  done_step "$(printf '%.0f s' "$host_s")"
  step "container: the same, as uid 1000, capabilities dropped, no-new-privileges, read-only root"
  tc=$(date +%s.%N)
  podman run --rm "${PODMAN_RUN_FLAGS[@]}" --user 1000:100 --cap-drop ALL --security-opt no-new-privileges \
    --read-only --read-only-tmpfs=false --tmpfs /dev/shm:rw,mode=1777 \
    -v "$work/cache:/cache" -v "$work/tmp:/tmp" -v "$work/runs:/runs" -e BACKDOOR_TRAIN_CACHE_DIR=/cache \
    "$CPU_IMAGE" backdoor-train run jobs/article.yaml --set data.root=/home/ray/mnist --set storage.path=/runs \
    > "$work/container.log" 2>&1 || { tail -20 "$work/container.log"; fail_step "container run"; }
  ctr_s=$(echo "$(date +%s.%N) - $tc" | bc)
  done_step "$(printf '%.0f s' "$ctr_s")"
  grep -E "^(clean|poisoned) " "$work/container.log" | sed "s/^/    container: /"
  if .venv/bin/python scripts/same_figures.py "$work/host/article/results.json" "$work/runs/article/results.json"; then
    printf 'step 2: PASSED (%.0f s; host %.0f s, container %.0f s, container/host %.2fx)\n' \
      "$(( $(date +%s) - t2 ))" "$host_s" "$ctr_s" "$(echo "$ctr_s / $host_s" | bc -l)"
  else
    echo "step 2: FAILED (figures differ; logs in $work)"; failed=1
  fi
  [[ $failed == 0 ]] && rm -rf "$work"
fi

if want 3 || want 4 || want 5; then
  kube_steps=$(echo "$steps" | tr ',' '\n' | grep -E '^[345]$' | paste -sd, -)
  .venv/bin/python scripts/podman_kuberay.py check --overlay local-cpu --steps "$kube_steps" || failed=1
fi

echo "container check: $([[ $failed == 0 ]] && echo PASSED || echo FAILED) ($(( $(date +%s) - t_all )) s)"
exit $failed
