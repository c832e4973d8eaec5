#!/usr/bin/env bash
# Set up a development environment on a fresh Debian/Ubuntu machine with Python 3.11.
#   scripts/setup.sh            the package and its runtime dependencies in .venv
#   scripts/setup.sh --test     plus the test tools (pytest, moto_server, validators) and the
#                               Debian packages the integration tests run for real
#   scripts/setup.sh --cpu      torch and torchvision's CPU build, from PyTorch's CPU wheel index
#                               (~0.7 GB; the default, PyPI's torch, brings ~5 GB of CUDA), for
#                               machines without an NVIDIA GPU; combines with --test
#   scripts/setup.sh --dry-run  print the install commands instead of running them
# Every install takes its versions from constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '3,9s/^#   //p' "$0"; }
want_test=0 want_cpu=0 dry_run=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    --cpu) want_cpu=1 ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "scripts/setup.sh: unknown option $arg; the options are:" >&2; usage >&2; exit 2 ;;
  esac
done

# A command, or with --dry-run its shell-quoted line.
run() {
  if [[ $dry_run == 1 ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}

if [[ $want_test == 1 ]]; then
  apt_pkgs=(prometheus prometheus-pushgateway kubectl)
  missing=()
  for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if (( ${#missing[@]} )); then
    sudo_cmd=(); [[ $(id -u) != 0 ]] && sudo_cmd=(sudo)
    run "${sudo_cmd[@]}" apt-get update -qq
    run "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [[ $want_cpu == 1 && -x .venv/bin/python ]] &&
   .venv/bin/python -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
  # pip keeps an installed torch 2.14.1 (it satisfies the pin) and its CUDA wheels with it.
  echo "scripts/setup.sh: error: .venv holds torch's CUDA build; remove .venv (rm -rf .venv) and rerun with --cpu" >&2
  exit 2
fi
[[ -x .venv/bin/python ]] || run "$PY" -m venv .venv
pip_cmd=(.venv/bin/python -m pip)
[[ -x .venv/bin/python ]] || pip_cmd=("$PY" -m pip)  # --dry-run on a machine with no .venv yet

if [[ $want_cpu == 1 ]]; then
  # torch and torchvision first, from PyTorch's CPU index; their other dependencies from the index
  # pip uses otherwise (kept as an extra index; the configured extra indexes stay too). The CPU
  # build is versioned 2.14.1+cpu, which constraints.txt's ==2.14.1 matches, so the install of the
  # package below keeps it.
  torch_index=${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}
  usual_index=${PIP_INDEX_URL:-$("${pip_cmd[@]}" config get install.index-url 2>/dev/null ||
                                 "${pip_cmd[@]}" config get global.index-url 2>/dev/null ||
                                 echo https://pypi.org/simple)}
  run .venv/bin/python -m pip install -q -c constraints.txt --index-url "$torch_index" \
      --extra-index-url "$usual_index" torch torchvision
fi
if [[ $want_test == 1 ]]; then
  run .venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
else
  run .venv/bin/python -m pip install -q -c constraints.txt -e .
fi
[[ $dry_run == 1 ]] && exit 0
if [[ $want_cpu == 1 ]] && ! .venv/bin/python -c 'import sys, torch; sys.exit(1 if torch.version.cuda else 0)'; then
  echo "scripts/setup.sh: error: --cpu installed torch's CUDA build (an index other than $torch_index offered" \
       "a higher torch version); remove .venv and check pip's index settings" >&2
  exit 1
fi
echo "set up: $(.venv/bin/python -c 'import torch, ray; print("torch", torch.__version__, "ray", ray.__version__)')"
