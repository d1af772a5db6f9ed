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
