"""Where the benchmarked model lies, found through Ember's model store (fetched once).

    python benchmarks/peers/model_paths.py dir|gguf|tokenizer [--model-id smollm2]

Every server loads the same weights: Ember, vLLM and the naive server the
converted safetensors directory, llama.cpp the GGUF it was converted from.
`EMBER_BENCH_MODEL_DIR` / `EMBER_BENCH_GGUF` name other files (a machine the
store cannot fetch on, say: see benchmarks/gpu_bench.sh).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ember.store import DEFAULT_MODELS, cache_root, resolve_model


def model_dir(model_id: str = "smollm2") -> Path:
    """The converted Hugging Face directory (config, tokenizer, model.safetensors)."""
    if os.environ.get("EMBER_BENCH_MODEL_DIR"):
        return Path(os.environ["EMBER_BENCH_MODEL_DIR"])
    return resolve_model(model_id).path


def gguf_path(model_id: str = "smollm2") -> Path:
    """The GGUF the default model was converted from, fetched into `<cache>/gguf/` by the store."""
    if os.environ.get("EMBER_BENCH_GGUF"):
        return Path(os.environ["EMBER_BENCH_GGUF"])
    if os.environ.get("EMBER_BENCH_MODEL_DIR"):
        raise FileNotFoundError("EMBER_BENCH_MODEL_DIR names the model and EMBER_BENCH_GGUF is unset: no GGUF")
    if model_id not in DEFAULT_MODELS:
        raise ValueError(f"no GGUF known for {model_id!r}; the store ships {sorted(DEFAULT_MODELS)}")
    resolve_model(model_id)  # fetches the GGUF if the cache lacks it
    path = cache_root() / "gguf" / Path(DEFAULT_MODELS[model_id].member).name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing although {model_id!r} resolved; delete the cache entry and retry")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["dir", "gguf", "tokenizer"])
    p.add_argument("--model-id", default="smollm2")
    args = p.parse_args()
    if args.what == "gguf":
        print(gguf_path(args.model_id))
    elif args.what == "dir":
        print(model_dir(args.model_id))
    else:
        print(model_dir(args.model_id) / "tokenizer.json")


if __name__ == "__main__":
    main()
