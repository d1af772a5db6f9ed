"""A model directory with a real model's config and tokenizer, and random weights.

    python benchmarks/random_model.py --like DIR --out DIR [--dtype bfloat16] [--seed 0]

For a machine the weights cannot reach: a GPU machine with no package
registry, say, where only a few tens of MB travel and SmolLM2's GGUF is 93 MB
(see benchmarks/gpu_bench.sh). Serving speed depends on the shapes, not on the
values, and every benchmark forces its output lengths (`ignore_eos`), so the
figures hold for the real weights; quality does not, and is not measured so.

`--like` needs `config.json` and the tokenizer files; every file in it except
weights is copied, and `model.safetensors` is written from transformers' own
initialisation of that config (seeded).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
NOT_COPIED = ("ember_source.json",)  # the store's record of where real weights came from


def build(like: Path, out: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Write `out`: `like`'s config and tokenizer files, and seeded random weights of that config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    like, out = Path(like), Path(out)
    if not (like / "config.json").is_file():
        raise FileNotFoundError(f"{like} holds no config.json")
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(like.iterdir()):
        if (
            path.is_file()
            and not path.name.endswith(WEIGHT_SUFFIXES)
            and not path.name.endswith(".index.json")
            and path.name not in NOT_COPIED
        ):
            shutil.copy2(path, out / path.name)
    config = AutoConfig.from_pretrained(like, local_files_only=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out, safe_serialization=True)
    config.save_pretrained(out)  # the copy above, but with the dtype the weights are saved in
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()):,} random parameters in {dtype}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--like", required=True, help="a model directory (config.json + tokenizer files)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    build(Path(args.like), Path(args.out), getattr(torch, args.dtype), args.seed)


if __name__ == "__main__":
    main()
