#!/usr/bin/env bash
# Every GPU figure of the fast path, in one run on a GPU host whose Python has torch but no Ray
# (the device machine): prints what docs/RESULTS.md records for one GPU.
#   1. bench/job_bench.py jobs/article-gpu.yaml --plain --no-article-script: the whole
#      `backdoor-train run` (Ray start-up included) and, per variant, the per-epoch training
#      throughput of the Ray worker against a plain tensor-resident loop on the same GPU;
#   2. `backdoor-train sweep jobs/seed_sweep-gpu.yaml` (8 seeds x clean + poisoned), timed.
# Prepare here, from the repository root (.device/ is git-ignored and carried):
#   ../shared/tools/pack-ray-site.sh .device/site.tar.xz
#   mkdir -p .device/mnist/MNIST/raw && cp ../shared/datasets/mnist/MNIST/raw/*.gz .device/mnist/MNIST/raw/
# Then on the device, from the repository root:  bash bench/gpu_check.sh
# Here, to test the script itself on CPU (short, no GPU):  GPU_CHECK_CPU=1 bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
py=python3
sets=()
if [[ -n "${GPU_CHECK_CPU:-}" ]]; then
  py=.venv/bin/python
  sets=(--set scaling.use_gpu=false --set train.epochs=1 --set data.train_samples=6000 --set data.test_samples=1000)
else
  site=/tmp/site
  [[ -d $site ]] || tar -xJf .device/site.tar.xz -C /tmp
  export PYTHONPATH=$site:$PWD
  sets=(--set "data.root=$PWD/.device/mnist")
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
export RAY_TMPDIR=$(mktemp -d /tmp/rgXXXX)
out=$(mktemp -d /tmp/gpu-check-XXXX)

echo "== 1. backdoor-train run jobs/article-gpu.yaml, against the plain tensor-resident loop"
$py bench/job_bench.py jobs/article-gpu.yaml --no-article-script --plain "${sets[@]}"

echo "== 2. backdoor-train sweep jobs/seed_sweep-gpu.yaml (8 seeds x clean + poisoned)"
t0=$(date +%s.%N)
$py -m backdoor_train sweep jobs/seed_sweep-gpu.yaml "${sets[@]}" --set "storage.path=$out" 2>&1 \
  | grep -v "RayTrainWorker\|^\s*$" | tail -20
echo "sweep wall: $($py -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$t0") s (Ray start-up included)"
rm -rf "$RAY_TMPDIR"
