"""What each CPU speed option costs in precision: SmolLM2-135M's next-token distributions against float32.

    .venv/bin/python benchmarks/quality.py [--tokens 400]

Teacher-forced over fixed texts (this repository's docs and TGI's reference: no
sampling, no model hub), every position's full next-token distribution of each
setting is compared with float32's (the GGUF's Q4_1 weights, dequantized
exactly): KL divergence (nats per token) and how often the top token agrees.
Settings: `--matmul-dtype bfloat16`, `--quantize int8`, `--quantize int4`
(torch's kernels, bf16 activations) and `--quantize w4a8` (Ember's VNNI kernel,
int8 activations). The LM head's rescoring of each row's 16 best candidates in
float32 applies as in serving, so the KL also carries each head's rounding of
the other logits. Writes benchmarks/results/quality.json/.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402

TEXTS = [ROOT / "README.md", ROOT / "docs" / "architecture.md", ROOT.parent / "shared" / "reference" / "tgi.md"]
SETTINGS = {
    "bf16 matmuls": {"matmul_dtype": "bfloat16"},
    "int8": {"quantize": "int8"},
    "int4": {"quantize": "int4"},
    "w4a8": {"quantize": "w4a8"},
}


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

    from ember.store import resolve_model
    from ember.shard.runner import load_runner

    torch.set_num_threads(os.cpu_count() or 1)
    model = resolve_model("smollm2").path
    tok = AutoTokenizer.from_pretrained(model)
    texts = [t for t in TEXTS if t.is_file()]
    token_lists = [tok(t.read_text())["input_ids"][: args.tokens] for t in texts]
    result = {"command": " ".join([".venv/bin/python", *sys.argv]), "texts": [str(t.relative_to(ROOT.parent))
              for t in texts], "tokens": [len(t) for t in token_lists],
              "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()[0]}, "rows": []}
    reference = distributions(load_runner(model, dtype="float32"), token_lists)
    for name, kwargs in SETTINGS.items():
        try:
            got = distributions(load_runner(model, dtype="float32", **kwargs), token_lists)
        except ValueError as err:  # w4a8 without the kernel on this machine
            result["rows"].append({"setting": name, "error": str(err)})
            continue
        ref_all, got_all = torch.cat(reference), torch.cat(got)
        kl = F.kl_div(F.log_softmax(got_all, -1), F.log_softmax(ref_all, -1), log_target=True,
                      reduction="batchmean").item()
        agree = (ref_all.argmax(-1) == got_all.argmax(-1)).float().mean().item()
        result["rows"].append({"setting": name, "kwargs": kwargs, "kl": kl, "top1": agree})
        print(f"{name}: KL {kl:.5f} nats/token, top-1 agreement {agree:.4f}", flush=True)
    report.write_result(result, Path(args.out), render)


def render(result: dict) -> str:
    lines = ["# Precision of the CPU speed options: SmolLM2-135M against float32", "",
             f"Teacher-forced next-token distributions over {sum(result['tokens'])} positions of "
             f"{', '.join(result['texts'])}. KL(float32 ‖ setting) in nats per token; top-1: how often the "
             "most likely token is float32's.", "",
             "| setting | KL | top-1 agreement |", "|---|---:|---:|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['setting']} | – | not run: {r['error']} |")
        else:
            lines.append(f"| {r['setting']} | {r['kl']:.5f} | {100 * r['top1']:.1f} % |")
    return "\n".join(lines + ["", "Command:", "", "    " + result["command"], ""])


if __name__ == "__main__":
    main()
