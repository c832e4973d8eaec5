#!/usr/bin/env bash
# Set up a development environment on a fresh Debian/Ubuntu machine with Python 3.11.
#   scripts/setup.sh          the package and its runtime dependencies in .venv
#   scripts/setup.sh --test   plus the test tools (pytest, moto_server, validators) and the
#                             Debian packages the integration tests run for real
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

if [[ $want_test == 1 ]]; then
  apt_pkgs=(prometheus prometheus-pushgateway kubectl)
  missing=()
  for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if (( ${#missing[@]} )); then
    sudo_cmd=""; [[ $(id -u) != 0 ]] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
if [[ $want_test == 1 ]]; then
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
else
  .venv/bin/python -m pip install -q -c constraints.txt -e .
fi
echo "set up: $(.venv/bin/python -c 'import torch, ray; print("torch", torch.__version__, "ray", ray.__version__)')"
