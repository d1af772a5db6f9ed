#!/usr/bin/env bash
# Ember as `make run` starts it: the launcher with no speed flags, so the shard picks its own precision
# (for the default model, a Q4_1 GGUF: w4a8 where the CPU has AVX-512 VNNI, else int4). Only where it
# listens differs (port, loopback, a socket per port), which does not touch the speed.
source "$(dirname "$0")/common.sh"
PORT="${1:?usage: start_ember_default.sh PORT}"
unset DTYPE QUANTIZE MATMUL_DTYPE KV_CACHE_DTYPE PREFILL_CHUNK_TOKENS PREFILL_CHUNKING NUM_THREADS OMP_NUM_THREADS
[ "${EMBER_BENCH_KEEP_PREFIX_CACHING:-}" = 1 ] || unset PREFIX_CACHING
[ "${EMBER_BENCH_KEEP_SPECULATE:-}" = 1 ] || unset SPECULATE
exec "$REPO_ROOT/.venv/bin/ember-launcher" --model-id "${EMBER_BENCH_MODEL_ID:-${EMBER_BENCH_MODEL_DIR:-smollm2}}" \
    --hostname 127.0.0.1 --port "$PORT" --shard-uds-path "/tmp/ember-bench-$PORT"
