#!/usr/bin/env bash
# Install llama-cpp-python's OpenAI server into its own virtualenv under the bench
# cache. The wheel is compiled from source (10-20 min on 2 cores), on one core at
# the lowest priority so the machine stays usable; the venv is kept once complete
# and pip's cache keeps the built wheel for a reinstall.
source "$(dirname "$0")/common.sh"
VENV="$BENCH_DIR/llama-cpp"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
lock_install llama-cpp
if venv_needed "$VENV"; then
    CMAKE_BUILD_PARALLEL_LEVEL=1 MAKEFLAGS=-j1 \
        nice -n 19 "$VENV/bin/pip" install "llama-cpp-python[server]==$VERSION"
    "$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
    touch "$VENV/.installed"
fi
echo "$VENV"
