#!/usr/bin/env bash
# Serve the naive transformers baseline on 127.0.0.1:$1 (runs in Ember's .venv:
# it needs only torch, transformers, starlette and uvicorn).
source "$(dirname "$0")/common.sh"
PORT="${1:?usage: start_naive.sh PORT}"
exec "$EMBER_PY" "$REPO_ROOT/benchmarks/peers/naive_server.py" --model-dir "$(model_path hf)" \
    --served-model-name "$SERVED_NAME" --port "$PORT" --dtype "${NAIVE_DTYPE:-float32}" --device "${NAIVE_DEVICE:-auto}"
