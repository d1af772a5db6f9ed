#!/usr/bin/env bash
# Serve the model with Ember's launcher on 127.0.0.1:$1 (shard + router, as users run it).
# The shard socket is per port, so a benchmark never meets a test's default socket.
source "$(dirname "$0")/common.sh"
PORT="${1:?usage: start_ember.sh PORT}"
# bf16 matmuls, as vLLM CPU runs in bf16 (see docs/architecture.md); EMBER_BENCH_MATMUL_DTYPE=float32 for the default.
MATMUL_DTYPE="${EMBER_BENCH_MATMUL_DTYPE:-bfloat16}" exec "$REPO_ROOT/.venv/bin/ember-launcher" --model-id "${EMBER_BENCH_MODEL_ID:-smollm2}" \
    --hostname 127.0.0.1 --port "$PORT" --shard-uds-path "/tmp/ember-bench-$PORT" ${EMBER_EXTRA_ARGS:-}
