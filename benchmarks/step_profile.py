"""Where a batched decode step's time goes, in process (no gRPC, no router).

    .venv/bin/python benchmarks/step_profile.py [--model-id smollm2] [--quantize w4a8] [--batch 32] \
        [--steps 48] [--repeats 3]

Loads the model as a shard does (`load_runner`, with `--quantize` / `--matmul-dtype`), prefills
`--batch` sequences of a 64-token prompt, then times `--steps` greedy decode steps, split into the
decoder layers (`model(...)`), the LM head (`model.logits`), the rest of `runner.step` (metadata,
cache blocks, Python) and the sampler (the engine's BatchSampler, greedy). Under `--quantize w4a8`
the shard's C kernels are built once more with `-DEMBER_PROFILE` (a private copy, under a temporary
directory) so the fused layer call also reports its phases: thread 0's time in each, barriers
included. Medians over repeats; writes benchmarks/results/step_profile.json and .md.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import tempfile
import time
from pathlib import Path

import report
import run_all

ROOT = Path(__file__).resolve().parent.parent
PROMPT_TOKENS = 64

# decode_layers' phases (shard/kernels/fused_step.c, PHASE(i)), in order
PHASES = (
    "norm + quantize (input)",
    "qkv projection",
    "rotary + K/V write + attention + quantize",
    "o projection",
    "add + norm + quantize (post)",
    "gate/up projection",
    "silu*mul + quantize",
    "down projection",
)


def profiled_kernels(tmp: str):
    """Build the profiling variant of the shard's kernels and make it the one the model uses."""
    from ember.shard import native

    path = native.build(Path(tmp) / "ember_native_profile.so", [*native.FLAGS, "-DEMBER_PROFILE"])
    native._loaded = native.load(path)
    lib = ctypes.CDLL(str(path))  # the same loaded object: its phase counters
    lib.ember_phase_seconds.restype = ctypes.POINTER(ctypes.c_double)
    return lib.ember_phase_seconds()


class Clock:
    """Seconds spent inside a wrapped callable."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def run(args: argparse.Namespace, model_dir: Path, phases) -> list[dict]:
    from transformers import AutoTokenizer

    from ember.shard.runner import Sequence, load_runner
    from ember.shard.sampling import BatchSampler, SamplingParams

    runner = load_runner(model_dir, quantize=args.quantize, matmul_dtype=args.matmul_dtype)
    runner.warmup(PROMPT_TOKENS * args.batch, 2 * (PROMPT_TOKENS + args.steps) * args.batch)
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = tok("The history of the city of Paris begins with a small settlement on an island")["input_ids"]
    prompt = (base * (PROMPT_TOKENS // len(base) + 1))[:PROMPT_TOKENS]
    model = runner.model
    forward, head = Clock(model.forward), Clock(model.logits)
    model.forward, model.logits = forward, head  # instance attributes: the runner calls these
    sampler = BatchSampler([SamplingParams() for _ in range(args.batch)], "cpu", runner.info.vocab_size)
    out = []
    for repeat in range(args.repeats + 1):  # the first pass only warms this shape up
        seqs = [Sequence(seq_id=repeat * 1000 + i, token_ids=list(prompt)) for i in range(args.batch)]
        logits = runner.step(seqs).logits
        forward.seconds = head.seconds = 0.0
        if phases is not None:
            for i in range(len(PHASES)):
                phases[i] = 0.0
        step_s = sample_s = 0.0
        for _ in range(args.steps):
            start = time.perf_counter()
            result = sampler(logits, [s.token_ids for s in seqs], [len(prompt)] * args.batch)
            mid = time.perf_counter()
            for s, t in zip(seqs, result.next_ids):
                s.token_ids.append(int(t))
            logits = runner.step(seqs).logits
            step_s += time.perf_counter() - mid
            sample_s += mid - start
        for s in seqs:
            runner.free(s)
        n = args.steps
        row = {
            "step_ms": 1e3 * (step_s + sample_s) / n,
            "layers_ms": 1e3 * forward.seconds / n,
            "head_ms": 1e3 * head.seconds / n,
            "sampler_ms": 1e3 * sample_s / n,
        }
        row["runner_other_ms"] = row["step_ms"] - row["layers_ms"] - row["head_ms"] - row["sampler_ms"]
        if phases is not None:
            row["phases_ms"] = {name: 1e3 * phases[i] / n for i, name in enumerate(PHASES)}
        if repeat:
            out.append(row)
            print(
                {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items() if k != "phases_ms"},
                flush=True,
            )
    return out


def summarize(runs: list[dict]) -> dict:
    keys = ("step_ms", "layers_ms", "head_ms", "runner_other_ms", "sampler_ms")
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["spread_step_ms"] = [min(r["step_ms"] for r in runs), max(r["step_ms"] for r in runs)]
    if "phases_ms" in runs[0]:
        out["phases_ms"] = {p: statistics.median(r["phases_ms"][p] for r in runs) for p in PHASES}
    return out


def markdown(result: dict) -> str:
    s = result["summary"]
    b = result["batch"]
    lines = [
        f"# Where a decode step's time goes (batch {b}, in process)",
        "",
        f"Model {result['model_id']}, quantize `{result['quantize']}`, matmul dtype `{result['matmul_dtype']}`, "
        f"{b} sequences of a {result['prompt_tokens']}-token prompt, {result['steps']} greedy decode steps, "
        f"median of {result['repeats']} repeats. Machine: {result['machine'].get('cpu_model')}, "
        f"{result['machine'].get('logical_cpus')} CPUs, load average {result['machine']['loadavg_at_start'][0]:.1f} "
        "at start.",
        "",
        "| part | ms per step | share |",
        "|---|---:|---:|",
    ]
    step = s["step_ms"]
    for key, name in (
        ("layers_ms", "decoder layers (`model.forward`)"),
        ("head_ms", "LM head (`model.logits`)"),
        ("runner_other_ms", "runner's other work (metadata, blocks, Python)"),
        ("sampler_ms", "sampler (greedy)"),
    ):
        lines.append(f"| {name} | {s[key]:.2f} | {100 * s[key] / step:.0f} % |")
    lines.append(
        f"| **step** [min–max] | **{step:.2f}** [{s['spread_step_ms'][0]:.2f}–{s['spread_step_ms'][1]:.2f}] | 100 % |"
    )
    lines.append(f"| tokens/s (batch / step) | {1e3 * b / step:.0f} | |")
    if "phases_ms" in s:
        lines += [
            "",
            "Phases of the fused layer call (`decode_layers`, thread 0's view, barriers included):",
            "",
            "| phase | ms per step | share of the layers |",
            "|---|---:|---:|",
        ]
        total = sum(s["phases_ms"].values())
        for name, ms in s["phases_ms"].items():
            lines.append(f"| {name} | {ms:.2f} | {100 * ms / total:.0f} % |")
    lines += ["", "Command:", "", f"    {result['command']}", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-id", default="smollm2")
    p.add_argument("--quantize", default="w4a8", help="'' for none")
    p.add_argument("--matmul-dtype", default=None)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_profile.json"))
    args = p.parse_args()
    args.quantize = args.quantize or None

    from ember.store import resolve_model

    model_dir = resolve_model(args.model_id).path
    machine = run_all.machine_info()
    machine.pop("flags", None)  # comparison.md lists them; here the model name and cores are enough
    result = {
        "command": " ".join([".venv/bin/python", "benchmarks/step_profile.py", *sys.argv[1:]]),
        "model_id": args.model_id,
        "quantize": args.quantize,
        "matmul_dtype": args.matmul_dtype,
        "batch": args.batch,
        "steps": args.steps,
        "repeats": args.repeats,
        "prompt_tokens": PROMPT_TOKENS,
        "machine": machine,
    }
    with tempfile.TemporaryDirectory() as tmp:
        phases = profiled_kernels(tmp) if args.quantize == "w4a8" else None
        runs = run(args, model_dir, phases)
    result["runs"] = runs
    result["summary"] = summarize(runs)
    report.write_result(result, Path(args.out), markdown)


if __name__ == "__main__":
    main()
