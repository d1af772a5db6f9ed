#!/usr/bin/env bash
# The real deployment parts the tests run (nginx, Prometheus's promtool and server), installed
# idempotently from Debian's archive: CI starts on a bare machine. Nothing happens when all are there.
# Without root or apt-get the tests that need them skip with a reason.
set -euo pipefail

need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v promtool >/dev/null || need+=(prometheus)

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "deploy/tools.sh: missing ${need[*]} and cannot install them (needs root and apt-get)" >&2
    exit 0
fi
echo "deploy/tools.sh: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
