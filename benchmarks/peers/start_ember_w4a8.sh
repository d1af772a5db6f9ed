#!/usr/bin/env bash
# Ember with --quantize w4a8: the GGUF's Q4_1 weights times int8 activations on Ember's VNNI kernel
# (llama.cpp's Q4_1 x Q8_1 scheme; see benchmarks/results/quality.md for what it costs in precision).
EMBER_BENCH_QUANTIZE="w4a8" exec "$(dirname "$0")/start_ember.sh" "$@"
