#!/usr/bin/env bash
# Ember with bf16 matmuls and no quantization (the same weights' precision as vLLM CPU's bf16).
EMBER_BENCH_QUANTIZE="" exec "$(dirname "$0")/start_ember.sh" "$@"
