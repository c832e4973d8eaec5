#!/usr/bin/env bash
# Builds a stand-in for the Ray base image, for machines that cannot pull rayproject/ray
# (no registry access): a Debian bookworm root file system from debootstrap, imported as an
# image, then docker/standin/Dockerfile.ray on it (user ray uid 1000 / group users, Python 3.11
# and pip at /home/ray/anaconda3, ray[default] at the pinned version). Needs root, debootstrap
# and podman (Debian packages); the Debian mirror and PyPI must be reachable.
#
#   scripts/build-ray-standin.sh            -> localhost/backdoor-train/ray-standin:2.58.0-py311-cpu
#
# Then build the product images on it: docker/Dockerfile.cpu --build-arg BASE_IMAGE=<that tag>
# (scripts/container-check.sh does all of it). Environment:
#   DEBIAN_MIRROR   (default http://deb.debian.org/debian)
#   CA_BUNDLE       a CA bundle for TLS through a proxy, mounted read-only at build time only
#                   (default /etc/ssl/certs/ca-certificates.crt when it exists); never in a layer
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/podman.sh

RAY_VERSION=$(sed -n 's/^ray==//p' constraints.txt)
DEBIAN_IMAGE=localhost/backdoor-train/debian-minbase:bookworm
STANDIN_IMAGE=${STANDIN_IMAGE:-localhost/backdoor-train/ray-standin:${RAY_VERSION}-py311-cpu}

if ! podman image exists "$DEBIAN_IMAGE"; then
  rootfs=$(mktemp -d /var/tmp/bt-rootfs.XXXXXX)
  trap 'rm -rf "$rootfs"' EXIT
  step "debootstrap bookworm (minbase, python3, python3-venv, ca-certificates)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" > "$rootfs.log" 2>&1 \
    || { tail -20 "$rootfs.log"; exit 1; }
  rm -f "$rootfs.log"
  tar -C "$rootfs" -c . | podman import -q - "$DEBIAN_IMAGE" > /dev/null
  done_step "$DEBIAN_IMAGE"
fi

step "Ray stand-in base (ray[default]==$RAY_VERSION)"
bt_build -f docker/standin/Dockerfile.ray --build-arg DEBIAN_BASE="$DEBIAN_IMAGE" \
  --build-arg RAY_VERSION="$RAY_VERSION" -t "$STANDIN_IMAGE" docker/standin
done_step "$STANDIN_IMAGE"
