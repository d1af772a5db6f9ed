#!/usr/bin/env bash
# Ember as `make run` starts it, with n-gram speculative decoding (--speculate 4: up to 4 draft tokens a
# step, from the request's own prompt and output): what speculation buys on the same build.
export SPECULATE=4 EMBER_BENCH_KEEP_SPECULATE=1
exec "$(dirname "$0")/start_ember_default.sh" "$@"
