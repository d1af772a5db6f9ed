#!/usr/bin/env bash
# Serve the model's GGUF with llama-cpp-python's OpenAI server on 127.0.0.1:$1.
# It serves one request at a time; --interrupt_requests False keeps a new request
# from cancelling the running one, so queued requests wait their turn. LLAMA_THREADS
# (default: every CPU) sets its threads for decode and prompt processing alike.
source "$(dirname "$0")/common.sh"
PORT="${1:?usage: start_llamacpp.sh PORT}"
VENV="$BENCH_DIR/llama-cpp"
THREADS="${LLAMA_THREADS:-$(nproc)}"
exec "$VENV/bin/python" -m llama_cpp.server --model "$(model_path gguf)" --model_alias "$SERVED_NAME" \
    --host 127.0.0.1 --port "$PORT" --n_threads "$THREADS" --n_threads_batch "$THREADS" \
    --n_ctx "${LLAMA_N_CTX:-2048}" --interrupt_requests False
