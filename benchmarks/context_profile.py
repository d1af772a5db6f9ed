"""Where chat-like traffic spends a step, in process: prompt chunks over a cached context and decode steps
at long contexts, against the same work without the context.

    .venv/bin/python benchmarks/context_profile.py [--model-id smollm2] [--context 1300] [--repeats 5] [--out DIR]

Loads the model as the shard does with no precision flags (for the default model: w4a8), caches one
`--context`-token prompt, then times (best of `--repeats`, random tokens each time so nothing else is
cached): a chunk of N new tokens taking the context from the prefix cache, the same N tokens fresh,
and a decode step of 16 sequences sharing the context against 16 sequences of 64 tokens. Writes
context_profile.json and .md into `--out` (benchmarks/results/traffic: the Xeon's run; traffic_avx2: the
AVX2 machine's).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "traffic"  # the default --out


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times) * 1e3


def cpu_name() -> str:
    """The CPU's model name and its ISA of note (the chunk kernels differ: AMX tiles, AVX-512 or AVX2)."""
    import run_all

    machine = run_all.machine_info()
    flags = set(machine.get("flags", ()))
    isa = next((n for f, n in (("amx_bf16", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2")) if f in flags), "")
    name = machine.get("cpu_model") or "unknown"
    return f"{name} ({isa})" if isa else name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-id", default="smollm2")
    p.add_argument("--context", type=int, default=1300)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(OUT), help="folder of context_profile.json and .md")
    args = p.parse_args()

    import torch

    from ember.shard.precision import choose
    from ember.shard.runner import Sequence, load_runner
    from ember.store import resolve_model

    model_dir = resolve_model(args.model_id).path
    precision = choose(model_dir, torch.device("cpu"))
    runner = load_runner(
        model_dir,
        precision.dtype,
        kv_cache_bytes=1 << 30,
        quantize=precision.quantize,
        matmul_dtype=precision.matmul_dtype,
    )
    runner.warmup(1024, 2048, 1 << 30)  # the cache as a shard's warmup sizes it by default (1 GiB on CPU)
    rng = random.Random(0)
    vocab = runner.info.vocab_size

    def tokens(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(n)]

    context = tokens(args.context)
    runner.step([Sequence(0, list(context))])  # cached: its full blocks stay in the prefix cache

    rows = []
    for new in (16, 64, 128, 256):

        def over_context(n=new):
            seq = Sequence(1, context + tokens(n))
            runner.reuse_prefix([seq])
            runner.step([seq])
            runner.free(seq)

        def fresh(n=new):
            seq = Sequence(2, tokens(n))
            runner.step([seq])
            runner.free(seq)

        cached_ms, fresh_ms = best(over_context, args.repeats), best(fresh, args.repeats)
        rows.append({"kind": "prompt chunk", "tokens": new, "with_context_ms": cached_ms, "fresh_ms": fresh_ms})

    def decode_step(seqs):
        def run():
            for s in seqs:
                s.token_ids.append(rng.randrange(100, vocab))
            runner.step(seqs)

        return run

    long_seqs = [Sequence(10 + i, context + tokens(8)) for i in range(16)]
    for s in long_seqs:
        runner.reuse_prefix([s])
    runner.step(long_seqs)
    short_seqs = [Sequence(100 + i, tokens(64)) for i in range(16)]
    runner.step(short_seqs)
    rows.append(
        {
            "kind": "decode step, 16 sequences",
            "tokens": 16,
            "with_context_ms": best(decode_step(long_seqs), args.repeats),
            "fresh_ms": best(decode_step(short_seqs), args.repeats),
        }
    )
    result = {
        "command": "python " + " ".join(["benchmarks/context_profile.py", *sys.argv[1:]]),
        "model": args.model_id,
        "precision": precision.summary,
        "context_tokens": args.context,
        "cpu": cpu_name(),
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "context_profile.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Where chat-like steps spend their time",
        "",
        f"`{result['command']}` — {args.model_id} at {precision.summary}, one shard, best of {args.repeats}; "
        f"CPU: {result['cpu']}, {torch.get_num_threads()} threads.",
        "",
        f"| step | new tokens | over a cached {args.context}-token context | without it | the context's share |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        share = 1 - r["fresh_ms"] / r["with_context_ms"]
        lines.append(
            f"| {r['kind']} | {r['tokens']} | {r['with_context_ms']:.1f} ms | {r['fresh_ms']:.1f} ms | {share:.0%} |"
        )
    (out / "context_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
