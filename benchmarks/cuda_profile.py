"""A decode step on a GPU, in process: its time per batch size and torch.profiler's view of it.

    python benchmarks/cuda_profile.py --model-dir DIR [--batches 1 32] [--steps 32] [--out DIR]

Loads the model as a shard does (`load_runner` on the first CUDA device), prefills each batch of
64-token prompts, times `--steps` decode steps (with the engine's sampler, greedy; a synchronize
before each clock read), then records a few batch-32 steps with torch.profiler. Prints the step
times; writes the profiler's tables (by CPU time, and by GPU time) to `--out`/cuda_profile.txt.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

PROMPT_TOKENS = 64


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--out", default=".")
    args = p.parse_args()

    from ember.shard.runner import Sequence, load_runner
    from ember.shard.sampling import BatchSampler, SamplingParams

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")  # cpu: a dry run
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runner = load_runner(Path(args.model_dir), device=device)
    runner.warmup(PROMPT_TOKENS * max(args.batches), 4 * (PROMPT_TOKENS + args.steps) * max(args.batches))
    prompt = [(7 * i) % 1000 + 10 for i in range(PROMPT_TOKENS)]
    next_id = [0]

    def decode(batch: int, steps: int) -> float:
        seqs = [Sequence(seq_id=next_id[0] + i, token_ids=list(prompt)) for i in range(batch)]
        next_id[0] += batch
        sampler = BatchSampler([SamplingParams() for _ in range(batch)], device, runner.info.vocab_size)
        logits = runner.step(seqs).logits
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            result = sampler(logits, [s.token_ids for s in seqs], [PROMPT_TOKENS] * batch)
            for s, t in zip(seqs, result.next_ids):
                s.token_ids.append(int(t))
            logits = runner.step(seqs).logits
        sync()
        elapsed = time.perf_counter() - start
        for s in seqs:
            runner.free(s)
        return 1e3 * elapsed / steps

    lines = []
    for batch in args.batches:
        decode(batch, 4)  # this shape's first steps
        ms = decode(batch, args.steps)
        lines.append(f"batch {batch}: {ms:.2f} ms per decode step (sampler included), {1e3 * batch / ms:.0f} tok/s")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])) as prof:
        decode(max(args.batches), 4)
    averages = prof.key_averages()
    text = ["\n".join(lines), "", "by CPU time (self):",
            averages.table(sort_by="self_cpu_time_total", row_limit=30),
            "by GPU time (self):", averages.table(sort_by="self_cuda_time_total", row_limit=20)]
    Path(args.out, "cuda_profile.txt").write_text("\n".join(text) + "\n")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=18))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
