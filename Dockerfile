# Ember's image. CPU by default; for CUDA build with
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 --build-arg TORCH_SPEC=torch -t ember:cuda .
# and run with --gpus all (the launcher shards over the visible GPUs).
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    EMBER_CACHE=/data \
    PORT=80

WORKDIR /usr/src/ember
# A C compiler: the shard builds its CPU kernels (shard/kernels/) for the host's CPU at first start,
# into $EMBER_CACHE/kernels; without one it runs on torch ops alone (slower, and no --quantize w4a8).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --index-url "$TORCH_INDEX" "$TORCH_SPEC"
COPY pyproject.toml README.md ./
COPY common ./common
COPY proto ./proto
COPY router ./router
COPY shard ./shard
COPY launcher ./launcher
RUN pip install .

VOLUME /data
EXPOSE 80
# Flags and environment variables carry TGI's names (MODEL_ID, NUM_SHARD, MAX_INPUT_TOKENS, ...).
# Docker sets HOSTNAME to the container id; bind all interfaces unless told otherwise.
ENTRYPOINT ["ember-launcher", "--hostname", "0.0.0.0"]
