"""What each CPU speed option costs in precision: SmolLM2-135M's next-token distributions against float32.

    .venv/bin/python benchmarks/quality.py [--tokens 400]

Teacher-forced over fixed texts (this repository's README and docs as of commit
TEXTS_REVISION, read with `git show`, so later edits do not move the figures; no
sampling, no model hub), every position's full next-token distribution of each
setting is compared with float32's (the GGUF's Q4_1 weights, dequantized
exactly): KL divergence (nats per token) and how often the top token agrees.
Settings: `--matmul-dtype bfloat16`, `--quantize int8`, `--quantize int4`
(torch's kernels, bf16 activations) and `--quantize w4a8` (Ember's VNNI kernel,
int8 activations). The LM head's rescoring of each row's 16 best candidates in
float32 applies as in serving, so the KL also carries each head's rounding of
the other logits. Each setting has a bound (`BOUNDS`) that the automatic
precision (`ember.shard.precision`) relies on; the report says whether it holds,
and tests/test_quality_bounds.py keeps the same bounds on the tiny model.
Writes benchmarks/results/quality.json/.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402
from tiny_gguf import random_blocks  # noqa: E402

TEXTS_REVISION = "677469e"
TEXTS = ["README.md", "docs/architecture.md", "benchmarks/README.md"]
SETTINGS = {
    "bf16 matmuls": {"matmul_dtype": "bfloat16"},
    "int8": {"quantize": "int8"},
    "int4": {"quantize": "int4"},
    "w4a8": {"quantize": "w4a8"},
}
# What each setting must hold against float32: (most mean KL in nats per token, least top-1 agreement).
# bf16 matmuls and int4 (on weights that are 4-bit already, as a Q4_1 GGUF's) are near-lossless; int8 and
# w4a8 round every activation or weight to 8 bits and pay about ten times that.
BOUNDS = {
    "bf16 matmuls": (0.001, 0.98),
    "int8": (0.01, 0.95),
    "int4": (0.001, 0.98),
    "w4a8": (0.01, 0.95),
}


def text(path: str) -> str:
    return subprocess.run(
        ["git", "show", f"{TEXTS_REVISION}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout


def compare(reference: list[torch.Tensor], got: list[torch.Tensor]) -> tuple[float, float]:
    """Mean KL(reference ‖ got) in nats per position, and how often the top tokens agree."""
    ref_all, got_all = torch.cat(reference), torch.cat(got)
    kl = F.kl_div(F.log_softmax(got_all, -1), F.log_softmax(ref_all, -1), log_target=True, reduction="batchmean").item()
    return kl, (ref_all.argmax(-1) == got_all.argmax(-1)).float().mean().item()


def within(name: str, kl: float, top1: float) -> bool:
    max_kl, min_top1 = BOUNDS[name]
    return kl <= max_kl and top1 >= min_top1


def distributions(runner, token_lists: list[list[int]]) -> list[torch.Tensor]:
    from ember.shard.runner import Sequence

    out = []
    for ids in token_lists:
        seq = Sequence(0, list(ids))
        out.append(runner.step([seq], want_prompt_logits=True).prompt_logits[0].float())
        runner.free(seq)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=400, help="tokens per text")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality.json"))
    args = p.parse_args()
    from transformers import AutoTokenizer

    from ember.shard.runner import load_runner
    from ember.store import resolve_model

    torch.set_num_threads(os.cpu_count() or 1)
    model = resolve_model("smollm2").path
    tok = AutoTokenizer.from_pretrained(model)
    token_lists = [tok(text(t))["input_ids"][: args.tokens] for t in TEXTS]
    result = {
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "texts": [f"{t} at {TEXTS_REVISION}" for t in TEXTS],
        "tokens": [len(t) for t in token_lists],
        "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()[0]},
        "rows": [],
    }
    reference = distributions(load_runner(model, dtype="float32"), token_lists)
    for name, kwargs in SETTINGS.items():
        try:
            got = distributions(load_runner(model, dtype="float32", **kwargs), token_lists)
        except ValueError as err:  # w4a8 without the kernel on this machine
            result["rows"].append({"setting": name, "error": str(err)})
            continue
        kl, agree = compare(reference, got)
        result["rows"].append(
            {
                "setting": name,
                "kwargs": kwargs,
                "kl": kl,
                "top1": agree,
                "bound": BOUNDS[name],
                "holds": within(name, kl, agree),
            }
        )
        print(f"{name}: KL {kl:.5f} nats/token, top-1 agreement {agree:.4f}", flush=True)
    result["gguf_types"] = repack_costs()
    report.write_result(result, Path(args.out), render)


def repack_costs(rows: int = 64, cols: int = 4096) -> list[dict]:
    """Per GGUF block type: the form Ember's kernel holds it in, and how far its weights move from the
    `gguf` package's own dequantization (largest |Δw| over the largest |w|) on random blocks: seeded
    normal weights for the types the package quantizes, random code and scale bytes for the K types."""
    import gguf
    import numpy as np

    from ember.shard import gguf_blocks, native

    out = []
    rng = np.random.default_rng(0)
    for name, (_, _, bits) in gguf_blocks.LAYOUTS.items():
        qtype = gguf.GGMLQuantizationType[name]
        raw = random_blocks(name, rows, cols, rng, weight_std=0.02, scale_range=(1e-4, 2e-3))
        want = gguf.quants.dequantize(raw, qtype).reshape(rows, cols)
        codes = gguf_blocks.decode(name, torch.from_numpy(raw.reshape(rows, -1)), (rows, cols))
        held = native.Q4Weight.pack(codes.codes, codes.scale, codes.low, bits=codes.bits).dequantize().numpy()
        out.append(
            {
                "type": name,
                "bits": bits,
                "max_rel_error": float(np.abs(held - want).max() / np.abs(want).max()),
            }
        )
    return out


def render(result: dict) -> str:
    lines = [
        "# Precision of the CPU speed options: SmolLM2-135M against float32",
        "",
        f"Teacher-forced next-token distributions over {sum(result['tokens'])} positions of "
        f"{', '.join(result['texts'])}. KL(float32 ‖ setting) in nats per token; top-1: how often the "
        "most likely token is float32's. Bound: what the setting must hold (KL at most, top-1 at least); "
        "the automatic precision picks only settings that hold theirs, and tests/test_quality_bounds.py "
        "keeps the same bounds on the tiny model.",
        "",
        "| setting | KL | top-1 agreement | bound | holds |",
        "|---|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['setting']} | – | not run: {r['error']} | | |")
        else:
            max_kl, min_top1 = r["bound"]
            lines.append(
                f"| {r['setting']} | {r['kl']:.5f} | {100 * r['top1']:.1f} % | ≤ {max_kl} / "
                f"≥ {100 * min_top1:.0f} % | {'yes' if r['holds'] else '**no**'} |"
            )
    if result.get("gguf_types"):
        lines += [
            "",
            "## GGUF tensors as Ember holds them",
            "",
            "Under w4a8 a GGUF's quantized tensors go to Ember's kernel block for block (`shard/gguf_blocks.py`):",
            "codes 4 or 8 bits wide with a float16 scale and minimum per 32 inputs. Largest change of a weight",
            "against the `gguf` package's own dequantization, over the largest weight, on random blocks; 0 is",
            "exact. The K types' products d·scale are rounded to float16; Q6_K's groups whose two 16-wide halves",
            "carry different scales are requantized to 8 bits over their range. SmolLM2's Q4_1 layers and Q8_0",
            "embedding are exact, so the w4a8 row above differs from float32 by the int8 activations alone.",
            "",
            "| GGUF type | Ember's codes | largest change / largest weight |",
            "|---|---:|---:|",
        ]
        for r in result["gguf_types"]:
            lines.append(f"| {r['type']} | {r['bits']}-bit | {r['max_rel_error']:.1e} |")
    return "\n".join(lines + ["", "Command:", "", "    " + result["command"], ""])


if __name__ == "__main__":
    main()
