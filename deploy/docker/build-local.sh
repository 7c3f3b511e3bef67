#!/bin/sh
# Build and run the oodserve images with Debian's podman on a machine with no Docker daemon and no registry.
#
# A user with real Docker (or podman) and a registry needs none of this: `docker build --target cpu -t oodserve:cpu .`
# pulls python:3.11-slim-bookworm and builds the same image. This script exists for machines where that base cannot
# be pulled (this project's CI): it makes a stand-in for it, then builds and runs the Dockerfile unchanged.
#
# usage: deploy/docker/build-local.sh base | build [TARGET] | run [PODMAN-RUN-ARGS...] | remove | podman ARGS...
#   base    make the stand-in base docker.io/library/python:3.11-slim-bookworm, unless an image of that name exists:
#           a bookworm minbase from debootstrap (python3 3.11, python3-venv, python3-pip, ca-certificates), slimmed,
#           with /usr/local/bin/python linked as in the official image, imported with the label oodserve.stand-in=1.
#           It is cached with `podman save` under $OODSERVE_CACHE (default ~/.cache/oodserve) and loaded from there
#           next time (seconds instead of minutes).
#   build   base, then `podman build --target TARGET` (default cpu) of the Dockerfile, tagged $IMAGE. The host's CA
#           bundle is mounted read-only into the build's RUN steps so pip can reach the package index through this
#           machine's proxy; nothing of it stays in the image. --format docker keeps HEALTHCHECK (OCI drops it).
#           The gpu target needs its nvidia/cuda base in local storage (`podman pull` it where a registry is
#           reachable). Without one, CUDA_IMAGE=docker.io/library/python:3.11-slim-bookworm runs the gpu target's
#           steps on the stand-in: onnxruntime-gpu installs and imports, but with no CUDA libraries it is no GPU image.
#   run     run $IMAGE with its own CMD and user, hardened as deploy/compose.yaml runs it (read-only root, a /tmp
#           tmpfs, no capabilities, no-new-privileges), published on 127.0.0.1:$PORT.
#           Extra arguments go to `podman run` before the image name (e.g. --detach --name oodserve).
#   remove  remove $IMAGE, and the stand-in base if this script made it (the saved copy in the cache stays).
#   podman  podman with the flags below (e.g. `build-local.sh podman healthcheck run oodserve`).
# Environment: IMAGE (default localhost/oodserve:cpu), BUNDLE (a directory of models/bundles/, default the
# Dockerfile's), CUDA_IMAGE (the gpu target's base), PORT (default 8000; empty: publish none), LAYERS (false: keep
# no intermediate images), OODSERVE_CACHE, DEBIAN_MIRROR (default: the first Debian URI of apt's sources).
#
# Why the flags: runc because crun refuses this VM's hybrid cgroups; cgroupfs and a file events backend because
# there is no systemd session; --ulimit because the VM cannot raise rlimits past its own (podman's defaults ask more).
set -eu

repo=$(cd "$(dirname "$0")/../.." && pwd)
IMAGE="${IMAGE:-localhost/oodserve:cpu}"
PORT="${PORT-8000}"
BASE=docker.io/library/python:3.11-slim-bookworm
STAND_IN_LABEL=oodserve.stand-in
# Bump when the recipe below changes, so a stale cached base is not loaded.
STAND_IN_VERSION=1
cache="${OODSERVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/oodserve}"
cached_base="$cache/stand-in-python-3.11-slim-bookworm-v$STAND_IN_VERSION.tar"
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

podman_() {
  podman --cgroup-manager cgroupfs --events-backend file --runtime runc "$@"
}

log() {
  echo "build-local.sh: $*" >&2
}

debian_mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then
    echo "$DEBIAN_MIRROR"
    return
  fi
  # deb822 sources (URIs: ...) first, then one-line sources (deb URI bookworm ...); the Debian archive itself only
  # (a URI ending in /debian), not its security archive nor third-party repositories.
  mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '$1 == "URIs:" && $2 ~ /\/debian\/?$/ {print $2; exit}')
  if [ -z "$mirror" ]; then
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
      | awk '$1 == "deb" && $2 ~ /\/debian\/?$/ && $3 == "bookworm" {print $2; exit}')
  fi
  echo "${mirror:-http://deb.debian.org/debian}"
}

make_base() {
  if podman_ image exists "$BASE"; then
    log "base $BASE present"
    return
  fi
  if [ -f "$cached_base" ]; then
    log "loading the stand-in base from $cached_base"
    podman_ load --quiet --input "$cached_base" >/dev/null
    return
  fi
  command -v debootstrap >/dev/null || { log "debootstrap missing: apt-get install debootstrap"; exit 1; }
  rootfs=$(mktemp -d "${TMPDIR:-/tmp}/oodserve-base.XXXXXX")
  trap 'rm -rf "$rootfs"' EXIT
  mirror=$(debian_mirror)
  log "debootstrap bookworm from $mirror into $rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$rootfs" "$mirror" >&2
  # Slim it as the official image is: no apt lists or package cache, docs, man pages or locales.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/log/*.log
  find "$rootfs"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
  find "$rootfs"/usr/lib/python3* -name __pycache__ -type d -prune -exec rm -rf {} +
  # The official image's interpreter is /usr/local/bin/python (and python3); link them to Debian's python3.11.
  ln -sf /usr/bin/python3 "$rootfs"/usr/local/bin/python
  ln -sf /usr/bin/python3 "$rootfs"/usr/local/bin/python3
  log "importing $BASE"
  tar -C "$rootfs" -c . | podman_ import --quiet \
    --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' --change "LABEL $STAND_IN_LABEL=$STAND_IN_VERSION" \
    - "$BASE" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
  mkdir -p "$cache"
  podman_ save --quiet --format docker-archive --output "$cached_base.partial" "$BASE"
  mv "$cached_base.partial" "$cached_base"
  log "saved the stand-in base to $cached_base"
}

build() {
  target="${1:-cpu}"
  make_base
  set -- --format docker --pull=never --layers="${LAYERS:-true}" --force-rm --target "$target" --tag "$IMAGE" --file "$repo/Dockerfile"
  [ -n "${BUNDLE:-}" ] && set -- "$@" --build-arg "BUNDLE=$BUNDLE"
  [ -n "${CUDA_IMAGE:-}" ] && set -- "$@" --build-arg "CUDA_IMAGE=$CUDA_IMAGE"
  # The proxy's CA, for pip in the build's RUN steps only (a volume, not a layer).
  [ -f "$CA_BUNDLE" ] && set -- "$@" --volume "$CA_BUNDLE:$CA_BUNDLE:ro"
  log "podman build $*"
  podman_ build "$@" "$repo"
  podman_ image inspect --format 'build-local.sh: {{.Id}} {{.Size}} bytes' "$IMAGE" >&2
}

run() {
  # Without systemd podman cannot schedule the HEALTHCHECK (it logs "unable to get systemd connection" and goes on);
  # `build-local.sh podman healthcheck run NAME` runs it on demand.
  # deploy/compose.yaml's hardening: read-only root, a small /tmp, no capabilities, no privilege gain.
  # PORT= (empty) publishes nothing, e.g. for --network host.
  [ -z "$PORT" ] || set -- --publish "127.0.0.1:$PORT:8000" "$@"
  podman_ run --rm --read-only --tmpfs /tmp:size=64m,mode=1777 --cap-drop ALL --security-opt no-new-privileges \
    --ulimit nofile=20000:20000 --ulimit nproc=32768:32768 "$@" "$IMAGE"
}

remove() {
  podman_ rmi --force "$IMAGE" >/dev/null 2>&1 || true
  if podman_ image inspect --format "{{index .Labels \"$STAND_IN_LABEL\"}}" "$BASE" 2>/dev/null | grep -qv '<no value>'; then
    podman_ rmi --force "$BASE" >/dev/null 2>&1 || true
  fi
}

command="${1:-}"
[ $# -gt 0 ] && shift
case "$command" in
  base) make_base ;;
  build) build "$@" ;;
  run) run "$@" ;;
  remove) remove ;;
  podman) podman_ "$@" ;;
  *) sed -n '2,30p' "$0" >&2; exit 2 ;;
esac
