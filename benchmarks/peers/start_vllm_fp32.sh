#!/usr/bin/env bash
# vLLM CPU as start_vllm.sh starts it, in float32: on a CPU without bf16 instructions (no AVX-512 BF16 or
# AMX: AMD before Zen 4, Intel before Cooper Lake) its default bf16 is emulated, and float32 is the dtype
# a user there would pick.
export VLLM_DTYPE=float32
exec "$(dirname "$0")/start_vllm.sh" "$@"
