#!/usr/bin/env bash
# Ember as `make run` starts it, with prefix caching turned off: what caching buys on the same build.
export PREFIX_CACHING=false EMBER_BENCH_KEEP_PREFIX_CACHING=1
exec "$(dirname "$0")/start_ember_default.sh" "$@"
