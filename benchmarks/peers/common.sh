# Shared settings for the peer scripts: where the virtualenvs live, and the
# interpreter that creates them. Sourced, not run.
set -euo pipefail
EMBER_CACHE="${EMBER_CACHE:-$HOME/.cache/ember}"
BENCH_DIR="${EMBER_BENCH_DIR:-$EMBER_CACHE/bench}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$BENCH_DIR"

# Create a virtualenv at $1 unless one is already there and marked complete.
# Prints nothing; returns 1 when the venv exists and is marked installed.
venv_needed() {
    local venv="$1"
    if [[ -f "$venv/.installed" ]]; then
        return 1
    fi
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    return 0
}

# Ember's own interpreter (the repo's .venv), which can ask the model store for paths.
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
EMBER_PY="${EMBER_PY:-$REPO_ROOT/.venv/bin/python}"
model_path() {  # model_path dir|hf|gguf: the benchmarked model, from the env or the store
    case "$1" in
        dir) echo "${EMBER_BENCH_MODEL_DIR:-$("$EMBER_PY" "$REPO_ROOT/benchmarks/peers/model_paths.py" dir)}" ;;
        hf) echo "${EMBER_BENCH_MODEL_DIR:-$("$EMBER_PY" "$REPO_ROOT/benchmarks/peers/model_paths.py" hf)}" ;;
        gguf) echo "${EMBER_BENCH_GGUF:-$("$EMBER_PY" "$REPO_ROOT/benchmarks/peers/model_paths.py" gguf)}" ;;
    esac
}
SERVED_NAME="${EMBER_BENCH_SERVED_NAME:-smollm2}"

# Hold an exclusive lock for the rest of the script: two installs of one peer
# (the harness and a person, say) never build the same virtualenv at once.
lock_install() {
    exec 9>"$BENCH_DIR/.$1.lock"
    flock 9
}
