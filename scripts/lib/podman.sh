# Shared by scripts/build-ray-standin.sh and scripts/container-check.sh (sourced, not run).
# podman as this kind of machine needs it: runc (crun refuses the cgroup layout of nested
# containers), file and process limits at what the host allows (raising them is refused), and
# for builds that install from package registries the host network plus a CA bundle mounted
# read-only for the build only (registries reached through a TLS proxy); nothing of it is
# written into a layer.

PODMAN_RUN_FLAGS=(--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

_t0=0
step() { _t0=$(date +%s.%N); printf '%s ... ' "$*"; }
done_step() { printf 'ok (%.0f s) %s\n' "$(echo "$(date +%s.%N) - $_t0" | bc)" "${1:-}"; }
fail_step() { printf 'FAILED (%.0f s): %s\n' "$(echo "$(date +%s.%N) - $_t0" | bc)" "$*"; exit 1; }

# podman build with the build-time-only network and CA mounts; a failed build prints its log.
bt_build() {
  local mounts=() log
  # Over the image's own bundle (Debian's and Ubuntu's path), which pip >= 24.2 reads through
  # the system trust store: a mount over an existing file leaves nothing behind in the image.
  [[ -f $CA_BUNDLE ]] && mounts+=(-v "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
  log=$(mktemp /var/tmp/bt-build.XXXXXX.log)
  if ! podman build --runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --network host \
      "${mounts[@]}" "$@" > "$log" 2>&1; then
    tail -40 "$log"; rm -f "$log"; return 1
  fi
  rm -f "$log"
}
