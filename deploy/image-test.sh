#!/usr/bin/env bash
# `make image-test`: build Ember's image from this checkout with buildah, on a Debian bookworm base made
# here with debootstrap, and boot it as a container would be booted:
#
#   1. base    debootstrap bookworm (minbase) into a tarball, cached between runs, imported as an image
#   2. image   `buildah bud` of the Dockerfile with BASE_IMAGE set to that base and torch from the local
#              CPU wheel (the `torch-wheels` build context)
#   3. run     the image's entrypoint and command (`buildah run`, host network, an empty /data volume, a free
#              PORT): the default model is fetched, /health answers, the image's HEALTHCHECK passes,
#              /generate and /v1/chat/completions answer, SIGTERM to the container's PID 1 stops it, exit 0
#   4. serve   as SageMaker runs it: argument `serve`, HF_MODEL_ID and SM_NUM_GPUS, port 8080: /ping and
#              /invocations (TGI's and the chat shape) answer, SIGTERM stops it, exit 0
#
# Root, buildah and debootstrap needed; Debian's archive and PyPI reachable. Re-runnable: the rootfs, the
# base image and the build's layers are reused. `--cold` drops the rootfs (and the packages debootstrap
# fetched) and builds without the layer cache, to time a first run (the images of earlier builds stay:
# `buildah rmi` them, then `buildah rmi --prune`, to free their space).
#
# Environment: EMBER_IMAGE_CACHE (default ~/.cache/ember/image), EMBER_IMAGE (localhost/ember:image-test),
# DEBIAN_MIRROR, TORCH_SPEC (torch==2.13.0), TORCH_WHEELS_DIR (a directory holding torch's wheel; default:
# the one pip finds locally), HEALTH_TIMEOUT_S (first start to /health, default 600).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${EMBER_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ember/image}
IMAGE=${EMBER_IMAGE:-localhost/ember:image-test}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
HEALTH_TIMEOUT_S=${HEALTH_TIMEOUT_S:-600}
STOP_TIMEOUT_S=${STOP_TIMEOUT_S:-60}
SAGEMAKER_PORT=8080
ROOTFS_TAR=$CACHE/$SUITE-rootfs.tar
COLD=0

for arg in "$@"; do
    case "$arg" in
        --cold) COLD=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "image-test: unknown argument $arg (see --help)" >&2; exit 2 ;;
    esac
done

# --- output and timing -------------------------------------------------------------------------------------

T0=$(date +%s.%N)
SUMMARY=("$(printf '%-34s %s' "machine" "$(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg) at the start")")

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
step() { printf '\n== %s (%ss)\n' "$*" "$(since "$T0")"; }
say() { printf '   %s\n' "$*"; }
note() { SUMMARY+=("$(printf '%-34s %s' "$1" "$2")"); }
fail() {
    printf '\nimage-test: FAILED: %s\n' "$*" >&2
    exit 1
}

# --- cleanup of what this run started (by pid and container id only) --------------------------------------

RUNNERS=()     # pids of `buildah run` processes whose container has not been stopped yet
NAMESPACES=()  # the mount namespace of each such container (how its processes are found)
JOBS=()        # pids of other background commands (debootstrap)
CONTAINERS=()  # buildah working containers
VOLUMES=()     # data volumes made here

# drop ARRAY VALUE: remove VALUE from the array named ARRAY.
drop() {
    local -n array=$1
    local kept=() v
    for v in "${array[@]}"; do [ "$v" = "$2" ] || kept+=("$v"); done
    array=("${kept[@]}")
}

cleanup() {
    local status=$? pid init ns
    for pid in "${JOBS[@]}"; do kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; done
    # A container still running gets SIGTERM on its PID 1, then SIGKILL on whatever is left in it ten
    # seconds later; `buildah run` itself is never signalled (it would SIGKILL only the PID 1, orphaning the
    # launcher).
    for pid in "${RUNNERS[@]}"; do  # a container whose namespace was not known yet
        [ "$(ps -o ppid= -p "$pid" 2>/dev/null | tr -d ' ')" = $$ ] || continue  # gone (its pid may be reused)
        ns=$(container_ns "$pid" || true)
        if [ -n "$ns" ]; then NAMESPACES+=("$ns"); fi
    done
    for ns in "${NAMESPACES[@]}"; do
        init=$(container_init "$ns" || true)
        [ -n "$init" ] || continue
        say "cleanup: SIGTERM to the container's PID 1 ($init)"
        kill -TERM "$init" 2>/dev/null || true
        for _ in $(seq 20); do [ -n "$(in_container "$ns")" ] || break; sleep 0.5; done
        for pid in $(in_container "$ns"); do kill -KILL "$pid" 2>/dev/null || true; done
    done
    for pid in "${RUNNERS[@]}"; do wait "$pid" 2>/dev/null || true; done
    for ctr in "${CONTAINERS[@]}"; do buildah rm "$ctr" >/dev/null 2>&1 || true; done
    for vol in "${VOLUMES[@]}"; do rm -rf "$vol"; done
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- checks ------------------------------------------------------------------------------------------------

[ "$(id -u)" = 0 ] || fail "run as root (debootstrap and buildah's chroot isolation need it)"
for tool in buildah debootstrap curl tar sha256sum "$PYTHON"; do
    command -v "$tool" >/dev/null || fail "$tool is not installed"
done
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
ROOTFS_TAR=$CACHE/$SUITE-rootfs.tar

# The host's CA bundle goes to pip, in the build and in the containers: where a TLS-intercepting proxy
# stands between this machine and PyPI it holds that proxy's CA; elsewhere it holds the public CAs anyway.
# It is mounted as a folder on /mnt, which every Debian image has: a mount point the build had to create
# would stay in the image as an empty file.
HOST_CA=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
BUILD_CA_ARGS=()
RUN_CA_ARGS=()
if [ -r "$HOST_CA" ]; then
    mkdir -p "$CACHE/ca"
    cp "$HOST_CA" "$CACHE/ca/host-ca.crt"
    BUILD_CA_ARGS=(--volume "$CACHE/ca:/mnt:ro" --build-arg PIP_CERT=/mnt/host-ca.crt)
    RUN_CA_ARGS=(--volume "$CACHE/ca:/mnt:ro" --env PIP_CERT=/mnt/host-ca.crt
        --env SSL_CERT_FILE=/mnt/host-ca.crt --env REQUESTS_CA_BUNDLE=/mnt/host-ca.crt)
fi

# --- 1. the base -------------------------------------------------------------------------------------------

step "1. base: Debian $SUITE (debootstrap, cached in $CACHE)"
if [ "$COLD" = 1 ]; then
    say "--cold: dropping the cached rootfs and packages"
    rm -rf "$ROOTFS_TAR" "$CACHE/debs"
fi
if [ -f "$ROOTFS_TAR" ]; then
    say "cached: $ROOTFS_TAR"
    note "base (debootstrap $SUITE)" "cached"
else
    t=$(now)
    rootfs=$CACHE/$SUITE-rootfs.partial
    rm -rf "$rootfs" "$ROOTFS_TAR.partial"
    mkdir -p "$CACHE/debs"
    log=$CACHE/debootstrap.log
    say "debootstrap --variant=minbase $SUITE $MIRROR (log: $log)"
    debootstrap --variant=minbase --cache-dir="$CACHE/debs" "$SUITE" "$rootfs" "$MIRROR" > "$log" 2>&1 &
    JOBS=($!)
    while kill -0 "${JOBS[0]}" 2>/dev/null; do
        sleep 10
        say "debootstrap: $(since "$t")s ($(tail -n 1 "$log" | cut -c1-100))"
    done
    if ! wait "${JOBS[0]}" || ! grep -q '^I: Base system installed successfully' "$log"; then
        tail -n 20 "$log" | sed 's/^/   | /'
        fail "debootstrap failed (log: $log)"
    fi
    JOBS=()
    cat > "$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb ${SECURITY_MIRROR:-http://deb.debian.org/debian-security} $SUITE-security main
EOF
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log
    tar --numeric-owner --xattrs -C "$rootfs" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
        -cf "$ROOTFS_TAR.partial" .
    mv "$ROOTFS_TAR.partial" "$ROOTFS_TAR"
    rm -rf "$rootfs"
    say "rootfs: $(du -h "$ROOTFS_TAR" | cut -f1) in $(since "$t")s"
    note "base (debootstrap $SUITE)" "$(since "$t") s"
fi

# The image is named after the tarball's digest: a new tarball is imported once, an old one never again.
digest=$(sha256sum "$ROOTFS_TAR" | cut -c1-12)
BASE_IMAGE=localhost/ember-base:$SUITE-$digest
if buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    say "base image: $BASE_IMAGE (imported before)"
else
    t=$(now)
    ctr=$(buildah from --pull=never scratch)
    CONTAINERS+=("$ctr")
    buildah add --quiet "$ctr" "$ROOTFS_TAR" / >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd /bin/bash --label "org.opencontainers.image.description=Debian $SUITE ($MIRROR), debootstrap minbase" \
        "$ctr"
    buildah commit --quiet --rm "$ctr" "$BASE_IMAGE" >/dev/null
    drop CONTAINERS "$ctr"
    say "base image: $BASE_IMAGE (imported in $(since "$t")s)"
fi

# --- 2. the image ------------------------------------------------------------------------------------------

step "2. image: $IMAGE from this checkout"
if [ -n "${TORCH_WHEELS_DIR:-}" ]; then
    wheels=$(cd "$TORCH_WHEELS_DIR" && pwd)
else
    # pip finds the CPU wheel where `pip install torch==...` finds it (its find-links and local indexes);
    # --no-index keeps it from fetching PyPI's multi-GB CUDA build when no local wheel is there.
    wheels=$CACHE/torch-wheels
    mkdir -p "$wheels"
    "$PYTHON" -m pip download --quiet --no-index --no-deps --only-binary=:all: --implementation cp \
        --python-version 3.11 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        --dest "$wheels" "$TORCH_SPEC" ||
        fail "no local wheel for $TORCH_SPEC (Python 3.11): set TORCH_WHEELS_DIR to a directory holding torch's CPU wheel"
fi
wheel=$(cd "$wheels" && ls torch-*.whl 2>/dev/null | head -1)
[ -n "$wheel" ] || fail "no torch wheel in $wheels"
say "torch: $wheels/$wheel"

t=$(now)
build_args=(--isolation chroot --layers --format docker
    --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_SPEC=$TORCH_SPEC"
    --build-context "torch-wheels=$wheels" "${BUILD_CA_ARGS[@]}"
    --tag "$IMAGE" --file Dockerfile)
if [ "$COLD" = 1 ]; then build_args+=(--no-cache); fi
say "buildah bud ${build_args[*]} ."
buildah bud "${build_args[@]}" . 2>&1 |
    grep --line-buffered -v -E '^(Copying (blob|config)|Writing manifest|Storing signatures|Getting image source)' |
    sed 's/^/   | /' || fail "buildah bud failed"
build_s=$(since "$t")
size=$(buildah images --format '{{.Size}}' "$IMAGE")
say "built in ${build_s}s: $size, on a base of $(buildah images --format '{{.Size}}' "$BASE_IMAGE")"
note "image build" "$build_s s"
note "image size (uncompressed)" "$size"

# The image's own configuration: what a container runtime would run, as whom, and its health check.
CONFIG=$(buildah inspect --type image "$IMAGE")
# config EXPRESSION: a Python expression on the image's Docker config `c`, giving a list of words.
config() {
    "$PYTHON" -c 'import json, sys
c = json.loads(sys.stdin.read())["Docker"]["config"]
print("\0".join(eval(sys.argv[1], {"c": c})), end="")' "$1" <<< "$CONFIG"
}
mapfile -d '' ENTRYPOINT < <(config 'c.get("Entrypoint") or []')
mapfile -d '' CMD < <(config 'c.get("Cmd") or []')
mapfile -d '' HEALTHCHECK < <(config '(lambda t: t[1:] if t[0] == "CMD" else ["/bin/sh", "-c", t[1]] if t[0] == "CMD-SHELL" else [])((c.get("Healthcheck") or {}).get("Test") or ["NONE"])')
USER_ID=$(config '[(c.get("User") or "").split(":")[0]]')
[ "${#ENTRYPOINT[@]}" -gt 0 ] || fail "the image has no ENTRYPOINT"
[ "${#HEALTHCHECK[@]}" -gt 0 ] || fail "the image has no HEALTHCHECK (CMD form)"
case "$USER_ID" in "" | 0 | root) fail "the image runs as root (USER is '${USER_ID}')" ;; esac
say "entrypoint: ${ENTRYPOINT[*]} ${CMD[*]:-}; user $USER_ID; healthcheck: ${HEALTHCHECK[*]}"

# --- running containers ------------------------------------------------------------------------------------

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

port_free() {
    "$PYTHON" -c 'import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("", int(sys.argv[1])))
except OSError:
    sys.exit(1)' "$1"
}

# With chroot isolation a container shares the host's process table: its processes are those in its own
# mount namespace, but for buildah's helpers (`buildah-chroot-*`, which set the container up and wait).
# The namespace outlives the helpers, so even a process orphaned by them is found.
ns_of() { readlink "/proc/$1/ns/mnt" 2>/dev/null || true; }
helper() { case "$(ps -o comm= -p "$1" 2>/dev/null)" in *buildah*) return 0 ;; *) return 1 ;; esac; }

# in_container NS: the pids of the container's processes.
in_container() {
    local p
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        if [ "$(ns_of "$p")" = "$1" ] && ! helper "$p"; then echo "$p"; fi
    done
}

# container_init NS: the container's PID 1, the one of its processes whose parent is not one of them.
container_init() {
    local pid parent
    for pid in $(in_container "$1"); do
        parent=$(ps -o ppid= -p "$pid" 2>/dev/null | tr -d ' ')
        [ -n "$parent" ] || continue
        if [ "$(ns_of "$parent")" != "$1" ] || helper "$parent"; then echo "$pid"; return 0; fi
    done
    return 1
}

# container_ns RUNNER: the mount namespace of the first process below `buildah run` that is not a helper.
container_ns() {
    local pids=("$1") pid child
    while [ "${#pids[@]}" -gt 0 ]; do
        pid=${pids[0]}
        pids=("${pids[@]:1}")
        for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do
            if ! helper "$child" && [ "$(ns_of "$child")" != "$(ns_of $$)" ]; then ns_of "$child"; return 0; fi
            pids+=("$child")
        done
    done
    return 1
}

# start NAME LOG [buildah-run options...] -- [arguments after the entrypoint...]
# A fresh working container of the image, its entrypoint run in the background: sets CTR, RUNNER and NS.
start() {
    local name=$1 log=$2 opts=() args=()
    shift 2
    while [ $# -gt 0 ] && [ "$1" != -- ]; do opts+=("$1"); shift; done
    [ $# -gt 0 ] && shift
    args=("$@")
    [ "${#args[@]}" -gt 0 ] || args=("${CMD[@]}")
    CTR=$(buildah from --pull=never --name "ember-image-test-$name-$$" "$IMAGE")
    CONTAINERS+=("$CTR")
    say "container $CTR: ${ENTRYPOINT[*]} ${args[*]}"
    buildah run --isolation chroot --network host "${RUN_CA_ARGS[@]}" "${opts[@]}" "$CTR" -- \
        "${ENTRYPOINT[@]}" "${args[@]}" > "$log" 2>&1 &
    RUNNER=$!
    RUNNERS+=("$RUNNER")
    NS=
    for _ in $(seq 120); do  # setting up the container takes a few seconds, more on a busy machine
        NS=$(container_ns "$RUNNER") && break
        kill -0 "$RUNNER" 2>/dev/null || { cat "$log"; fail "the container exited at once"; }
        sleep 0.5
    done
    [ -n "$NS" ] || fail "no process of the container found below buildah run (pid $RUNNER)"
    NAMESPACES+=("$NS")
}

# last_line LOG: the log's last line that says something (a progress bar's last state, not a continuation).
last_line() { tr '\r' '\n' < "$1" | grep -E '^(\[[a-z0-9 ]+\] )?[A-Za-z].{10,}' | tail -n 1 | cut -c1-110 || true; }

# wait_ready URL LOG: poll URL until 200, showing progress (the log's last line) every 15 s. One request at
# a time, each given longer than the router's own Health deadline (10 s): a poll that gave up sooner would
# leave the shard's one-token health forwards piling up behind each other on a busy machine.
wait_ready() {
    local url=$1 log=$2 t last=0 code elapsed
    t=$(now)
    while :; do
        code=$(curl -s -o /dev/null -w '%{http_code}' -m 15 "$url" || true)
        [ "$code" = 200 ] && break
        if ! kill -0 "$RUNNER" 2>/dev/null; then
            tail -n 40 "$log" | sed 's/^/   | /'
            fail "the container exited before $url answered"
        fi
        elapsed=$(since "$t")
        if [ "${elapsed%.*}" -ge "$HEALTH_TIMEOUT_S" ]; then
            tail -n 40 "$log" | sed 's/^/   | /'
            fail "$url did not answer 200 within ${HEALTH_TIMEOUT_S}s"
        fi
        if [ "$((${elapsed%.*} / 15))" -gt "$last" ]; then
            last=$((${elapsed%.*} / 15))
            say "waiting for $url: ${elapsed}s ($(last_line "$log"))"
        fi
        sleep 2
    done
    READY_S=$(since "$t")
}

# request URL BODY CHECK: POST a JSON body (GET where BODY is empty), require 200, and evaluate the Python
# expression CHECK on the parsed answer `r` (it returns the text to show).
request() {
    local url=$1 body=$2 check=$3 out status data=()
    out=$(mktemp)
    if [ -n "$body" ]; then data=(-H 'content-type: application/json' -d "$body"); fi
    status=$(curl -s -o "$out" -w '%{http_code}' -m 120 "${data[@]}" "$url" || true)
    if [ "$status" != 200 ]; then
        say "$(head -c 400 "$out")"
        rm -f "$out"
        fail "$url answered $status"
    fi
    "$PYTHON" - "$out" "$check" <<'EOF' || { rm -f "$out"; fail "$url: unexpected answer"; }
import json, sys
r = json.load(open(sys.argv[1]))
text = eval(sys.argv[2], {"r": r})
if not isinstance(text, str) or not text.strip():
    print(f"   unexpected answer: {json.dumps(r)[:400]}")
    sys.exit(1)
print(f"   -> {text.strip()[:100]!r}")
EOF
    rm -f "$out"
}

# healthcheck: the image's HEALTHCHECK command, run in the running container as a runtime runs it.
healthcheck() {
    buildah run --isolation chroot --network host "$CTR" -- "${HEALTHCHECK[@]}" ||
        fail "the image's HEALTHCHECK (${HEALTHCHECK[*]}) failed while /health answered"
    say "HEALTHCHECK ${HEALTHCHECK[*]}: ok"
}

# stop LOG: SIGTERM to the container's PID 1 (what `docker stop` sends), then require exit 0 within
# STOP_TIMEOUT_S and no process left in the container. Sets STOP_S.
stop() {
    local log=$1 init t status=0 left
    init=$(container_init "$NS") || fail "no process runs in the container"
    say "SIGTERM to the container's PID 1 ($(ps -o comm= -p "$init"), pid $init)"
    t=$(now)
    kill -TERM "$init"
    while kill -0 "$RUNNER" 2>/dev/null; do
        if [ "$(since "$t" | cut -d. -f1)" -ge "$STOP_TIMEOUT_S" ]; then
            tail -n 20 "$log" | sed 's/^/   | /'
            fail "the container did not stop within ${STOP_TIMEOUT_S}s of SIGTERM"
        fi
        sleep 0.2
    done
    wait "$RUNNER" || status=$?
    STOP_S=$(since "$t")
    tail -n 4 "$log" | sed 's/^/   | /'
    [ "$status" = 0 ] || fail "the container exited with status $status after SIGTERM (expected 0)"
    left=$(in_container "$NS")
    [ -z "$left" ] || fail "processes left in the container after it stopped: $(echo $left)"
    say "stopped: exit 0 in ${STOP_S}s, no process left"
    buildah rm "$CTR" >/dev/null
    # Forgotten by the cleanup: a pid or a namespace id may be reused by someone else's process from now on.
    drop CONTAINERS "$CTR"
    drop RUNNERS "$RUNNER"
    drop NAMESPACES "$NS"
}

# An empty data volume, writable by the image's user (as a fresh named volume would be).
VOLUME=$(mktemp -d "$CACHE/data.XXXXXX")
VOLUMES+=("$VOLUME")
chown "$USER_ID:0" "$VOLUME"
chmod 0775 "$VOLUME"

# --- 3. run ------------------------------------------------------------------------------------------------

step "3. run: the entrypoint with an empty /data volume"
PORT=$(free_port)
LOG=$CACHE/run.log
start run "$LOG" --volume "$VOLUME:/data" --env "PORT=$PORT" --
wait_ready "http://127.0.0.1:$PORT/health" "$LOG"
say "healthy after ${READY_S}s (first start: the model's download and conversion, the kernels' build)"
note "first start to healthy" "$READY_S s (port $PORT, model fetched into the empty /data)"
healthcheck
request "http://127.0.0.1:$PORT/generate" \
    '{"inputs": "The three primary colors are", "parameters": {"max_new_tokens": 16}}' 'r["generated_text"]'
request "http://127.0.0.1:$PORT/v1/chat/completions" \
    '{"messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}], "temperature": 0, "max_tokens": 20}' \
    'r["choices"][0]["message"]["content"]'
note "/generate, /v1/chat/completions" "ok"
stop "$LOG"
note "SIGTERM" "exit 0 in $STOP_S s"

# --- 4. SageMaker ------------------------------------------------------------------------------------------

step "4. serve: as SageMaker runs it (port $SAGEMAKER_PORT, HF_MODEL_ID, SM_NUM_GPUS)"
port_free "$SAGEMAKER_PORT" ||
    fail "port $SAGEMAKER_PORT is in use on this host: SageMaker's run needs it (buildah run shares the host's network)"
LOG=$CACHE/serve.log
start serve "$LOG" --volume "$VOLUME:/data" --env HF_MODEL_ID=smollm2 --env SM_NUM_GPUS=0 -- serve
wait_ready "http://127.0.0.1:$SAGEMAKER_PORT/ping" "$LOG"
say "/ping 200 after ${READY_S}s (the model cached in /data by the run before)"
note "SageMaker start to /ping 200" "$READY_S s (cached model)"
request "http://127.0.0.1:$SAGEMAKER_PORT/info" "" \
    '"model_id %s, %s shard(s)" % (r["model_id"], r.get("num_shard", "?")) if r["model_id"] == "smollm2" else ""'
healthcheck
request "http://127.0.0.1:$SAGEMAKER_PORT/invocations" \
    '{"inputs": "The three primary colors are", "parameters": {"max_new_tokens": 16}}' 'r[0]["generated_text"]'
request "http://127.0.0.1:$SAGEMAKER_PORT/invocations" \
    '{"messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}], "temperature": 0, "max_tokens": 20}' \
    'r["choices"][0]["message"]["content"]'
note "SageMaker /ping, /invocations" "ok (inputs and messages)"
stop "$LOG"
note "SageMaker SIGTERM" "exit 0 in $STOP_S s"

# --- summary -----------------------------------------------------------------------------------------------

step "image-test: passed"
for line in "${SUMMARY[@]}"; do say "$line"; done
say "$(printf '%-34s %s' "total wall time" "$(since "$T0") s$([ "$COLD" = 1 ] && echo " (--cold)")")"
