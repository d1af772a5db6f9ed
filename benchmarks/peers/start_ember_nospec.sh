#!/usr/bin/env bash
# Ember as `make run` starts it, with n-gram speculative decoding off (--speculate 0, whatever the default
# becomes): the baseline ember-speculate is measured against on the same build.
export SPECULATE=0 EMBER_BENCH_KEEP_SPECULATE=1
exec "$(dirname "$0")/start_ember_default.sh" "$@"
