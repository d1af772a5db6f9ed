#!/usr/bin/env bash
# Install llama-cpp-python's OpenAI server into its own virtualenv under the bench
# cache. The wheel is compiled from source (10-20 min on 2 cores), on one core at
# the lowest priority so the machine stays usable; the venv is kept once complete
# and pip's cache keeps the built wheel for a reinstall.
source "$(dirname "$0")/common.sh"
VENV="$BENCH_DIR/llama-cpp"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
# -march=native turns on llama.cpp's AMX kernels on Xeons that have AMX, and those die with SIGILL
# at their first tile instruction (the tile configuration is lost first: llama.cpp PR #26954). They
# are left out there; every other native feature (AVX-512 VNNI, BF16, ...) stays. CMake reads the
# flags from CFLAGS/CXXFLAGS; gcc's explicit -mno-* win over -march=native whatever their order.
NO_AMX=""
if grep -qw amx_tile /proc/cpuinfo; then
    NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
lock_install llama-cpp
if venv_needed "$VENV"; then
    CMAKE_BUILD_PARALLEL_LEVEL=1 MAKEFLAGS=-j1 CFLAGS="${CFLAGS:-} $NO_AMX" CXXFLAGS="${CXXFLAGS:-} $NO_AMX" \
        nice -n 19 "$VENV/bin/pip" install "llama-cpp-python[server]==$VERSION"
    "$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
    touch "$VENV/.installed"
fi
echo "$VENV"
