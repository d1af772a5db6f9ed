"""Where the benchmarked model lies, found through Ember's model store (fetched once).

    python benchmarks/peers/model_paths.py dir|hf|gguf|tokenizer [--model-id smollm2]

Every server loads the same weights: Ember its model directory (the GGUF kept
as it is, `dir`), llama.cpp the GGUF, vLLM and the naive server a float32
safetensors directory of the same weights, made once from the GGUF (`hf`).
`EMBER_BENCH_MODEL_DIR` / `EMBER_BENCH_GGUF` name other files (a machine the
store cannot fetch on, say: see benchmarks/gpu_bench.sh).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from ember import store
from ember.store import DEFAULT_MODELS, GGUF_FILE, cache_root, resolve_model


def model_dir(model_id: str = "smollm2") -> Path:
    """The directory Ember loads (config, tokenizer, and the GGUF itself or safetensors)."""
    if os.environ.get("EMBER_BENCH_MODEL_DIR"):
        return Path(os.environ["EMBER_BENCH_MODEL_DIR"])
    return resolve_model(model_id).path


def hf_dir(model_id: str = "smollm2") -> Path:
    """A Hugging Face directory of the same weights in float32 safetensors, for servers that read only those
    (vLLM, the naive server): transformers' reading of the GGUF, made once under `<cache>/bench/hf/<sha>`."""
    ember_dir = model_dir(model_id)
    if not (ember_dir / GGUF_FILE).is_file():
        return ember_dir  # safetensors already
    target = cache_root() / "bench" / "hf" / resolve_model(model_id).sha
    if not (target / "config.json").is_file():
        temp = target.with_name(f"{target.name}.partial-{os.getpid()}")
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
        store.float_directory(ember_dir / GGUF_FILE, temp)
        shutil.rmtree(target, ignore_errors=True)
        os.rename(temp, target)
    return target


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
    p.add_argument("what", choices=["dir", "hf", "gguf", "tokenizer"])
    p.add_argument("--model-id", default="smollm2")
    args = p.parse_args()
    if args.what == "gguf":
        print(gguf_path(args.model_id))
    elif args.what == "dir":
        print(model_dir(args.model_id))
    elif args.what == "hf":
        print(hf_dir(args.model_id))
    else:
        print(model_dir(args.model_id) / "tokenizer.json")


if __name__ == "__main__":
    main()
