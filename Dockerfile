# Ember's image: `docker build -t ember .`, then `docker run -p 8080:80 -v ember-data:/data ember`.
#
# Build arguments:
#   BASE_IMAGE    the image to build on (default python:3.11-slim). Any Debian or Ubuntu image works: what it
#                 lacks of python3 (with venv), gcc, libc6-dev and tini is installed with apt.
#   TORCH_SPEC    the torch requirement (default torch==2.13.0, the build the tests run on).
#   TORCH_INDEX   where torch comes from (default PyTorch's CPU index).
#   torch-wheels  a named build context, not an argument: with `--build-context torch-wheels=DIR` (docker
#                 buildx, buildah 1.28+) torch comes from the wheels in DIR instead of TORCH_INDEX (its
#                 dependencies still come from the package index).
#   PIP_INDEX_URL, PIP_CERT
#                 the package index (default PyPI) and a CA bundle for a build behind a mirror or a
#                 TLS-intercepting proxy; they serve the build only and stay out of the image's environment.
#   EMBER_UID     the uid Ember runs as (default 1000; group 0, so that any uid OpenShift assigns works too).
#
# CUDA: the same file, with torch's CUDA build (its wheels bring the CUDA libraries; the driver comes from
# the host through the NVIDIA container toolkit):
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t ember:cuda .
#   docker run --gpus all --shm-size 1g -p 8080:80 -v ember-data:/data ember:cuda
# The launcher shards over the visible GPUs (NUM_SHARD to choose).
#
# Running: PID 1 is tini, which forwards signals to the launcher and reaps orphans. SIGTERM drains in-flight
# requests (GRACEFUL_TERMINATION_TIMEOUT, 90 s), then the launcher stops its shards and exits 0: give
# the container that long (`docker stop -t 90`, compose's stop_grace_period, Kubernetes'
# terminationGracePeriodSeconds), Docker's default is 10 s. Ember listens on $PORT (80) as uid 1000: Docker
# lets an unprivileged process bind a low port in a container's own network namespace; where a runtime
# does not (host networking, some Kubernetes runtimes), set PORT=8080. Models and built kernels are cached
# in the /data volume: a named volume works as is, a bind mount must be writable by uid 1000 or group 0.
# `serve` as the argument runs it the way Amazon SageMaker does (port 8080, HF_MODEL_ID, SM_NUM_GPUS, ...:
# deploy/entrypoint.sh). Settings carry TGI's flag and environment names (MODEL_ID, NUM_SHARD, ...).

ARG BASE_IMAGE=python:3.11-slim

# Empty unless the build is given `--build-context torch-wheels=DIR`.
FROM scratch AS torch-wheels

FROM ${BASE_IMAGE}

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
ARG EMBER_UID=1000
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_CERT=""

ENV PATH=/opt/ember/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    EMBER_CACHE=/data \
    HOME=/home/ember \
    PORT=80 \
    TINI_SUBREAPER=1

# Python where the base has none (a plain Debian), a C compiler (the shard builds its CPU kernels for the
# host's CPU at first start, into $EMBER_CACHE/kernels; without one it runs on torch ops alone, slower and
# without --quantize w4a8) and tini.
RUN set -eu; \
    packages="ca-certificates gcc libc6-dev tini"; \
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then packages="$packages python3 python3-venv"; fi; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $packages; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb

RUN python3 -m venv /opt/ember && pip install --upgrade pip

RUN --mount=type=bind,from=torch-wheels,target=/tmp/torch-wheels \
    set -eu; \
    if ls /tmp/torch-wheels/*.whl >/dev/null 2>&1; then \
        pip install --no-index --no-deps --find-links /tmp/torch-wheels "$TORCH_SPEC"; \
        pip install --find-links /tmp/torch-wheels "$TORCH_SPEC"; \
    else \
        pip install --index-url "$TORCH_INDEX" "$TORCH_SPEC"; \
    fi

# Ember's dependencies in a layer of their own, so that a change to the code rebuilds only the layer below.
WORKDIR /usr/src/ember
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY README.md ./
COPY common ./common
COPY proto ./proto
COPY router ./router
COPY shard ./shard
COPY launcher ./launcher
RUN pip install --no-deps . && rm -rf build ./*.egg-info

COPY deploy/entrypoint.sh /usr/local/bin/ember-entrypoint
COPY deploy/healthcheck.py /usr/local/bin/ember-healthcheck
RUN set -eu; \
    chmod 0755 /usr/local/bin/ember-entrypoint /usr/local/bin/ember-healthcheck; \
    useradd --uid "$EMBER_UID" --gid 0 --non-unique --home-dir /home/ember --create-home --shell /bin/sh ember; \
    mkdir -p /data; \
    chown -R "$EMBER_UID:0" /data /home/ember; \
    chmod -R g=u /data /home/ember

LABEL org.opencontainers.image.title="Ember" \
      org.opencontainers.image.description="A text-generation inference server with TGI's API: launcher, torch shards, router"

USER ${EMBER_UID}
WORKDIR /home/ember
VOLUME /data
EXPOSE 80
# The first start downloads and converts the model: the start period allows for it. /health asks every shard
# for a one-token forward (10 s deadline): the timeout leaves it that long.
HEALTHCHECK --interval=15s --timeout=15s --start-period=10m --retries=3 CMD ["/usr/local/bin/ember-healthcheck"]
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/ember-entrypoint"]
