#!/usr/bin/env bash
# Serve the model with Ember's launcher on 127.0.0.1:$1 (shard + router, as users run it).
# The shard socket is per port, so a benchmark never meets a test's default socket.
# Default: --quantize int4 (the GGUF's 4-bit codes for steps of <= 8 rows, bf16 matmuls above)
# with bf16 matmuls, as vLLM CPU runs in bf16 (see docs/architecture.md).
# EMBER_BENCH_QUANTIZE="" serves bf16 matmuls only; EMBER_BENCH_MATMUL_DTYPE=float32 (with it) the default.
source "$(dirname "$0")/common.sh"
PORT="${1:?usage: start_ember.sh PORT}"
QUANTIZE_ARGS=()
if [[ -n "${EMBER_BENCH_QUANTIZE-int4}" ]]; then
    QUANTIZE_ARGS=(--quantize "${EMBER_BENCH_QUANTIZE-int4}")
fi
MATMUL_DTYPE="${EMBER_BENCH_MATMUL_DTYPE:-bfloat16}" exec "$REPO_ROOT/.venv/bin/ember-launcher" --model-id "${EMBER_BENCH_MODEL_ID:-${EMBER_BENCH_MODEL_DIR:-smollm2}}" \
    --hostname 127.0.0.1 --port "$PORT" --shard-uds-path "/tmp/ember-bench-$PORT" "${QUANTIZE_ARGS[@]}" ${EMBER_EXTRA_ARGS:-}
