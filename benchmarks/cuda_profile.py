"""A decode step on a GPU, in process: its time per batch size and torch.profiler's view of it.

    python benchmarks/cuda_profile.py --model-dir DIR [--batches 1 32] [--steps 32] [--out DIR]

Loads the model as a shard does (`load_runner` on the first CUDA device), once with decode steps
replayed from CUDA graphs (the default) and once eagerly (`--cuda-graphs 0`); for each, prefills
each batch of 64-token prompts, times `--steps` decode steps (with the engine's sampler, greedy; a
synchronize before each clock read), and records a few steps of the largest batch with
torch.profiler. Prints the step times and their ratio; writes the profiler's tables (by CPU time,
and by GPU time) to `--out`/cuda_profile.txt.
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

    from ember.shard.runner import load_runner

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")  # cpu: a dry run
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    prompt = [(7 * i) % 1000 + 10 for i in range(PROMPT_TOKENS)]
    next_id = [0]
    lines, text, per_mode = [], [], {}
    for mode, graphs in (("graphs", None), ("eager", ())):
        runner = load_runner(Path(args.model_dir), device=device, cuda_graphs=graphs)
        runner.warmup(PROMPT_TOKENS * max(args.batches), 4 * (PROMPT_TOKENS + args.steps) * max(args.batches))
        per_mode[mode] = profile_runner(runner, args, prompt, next_id, sync, device)
        lines += [
            f"{mode}: batch {b}: {ms:.2f} ms per decode step (sampler included), {1e3 * b / ms:.0f} tok/s"
            for b, ms in per_mode[mode][0].items()
        ]
        text += [
            f"== {mode}",
            "by CPU time (self):",
            per_mode[mode][1].table(sort_by="self_cpu_time_total", row_limit=25),
            "by GPU time (self):",
            per_mode[mode][1].table(sort_by="self_cuda_time_total", row_limit=15),
        ]
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for b in args.batches:
        lines.append(f"batch {b}: graphs {per_mode['eager'][0][b] / per_mode['graphs'][0][b]:.1f}x faster than eager")
    Path(args.out, "cuda_profile.txt").write_text("\n".join(lines + [""] + text) + "\n")
    print("\n".join(lines))


def profile_runner(runner, args, prompt, next_id, sync, device):
    """({batch: ms per decode step}, torch.profiler's averages over a few steps of the largest batch)."""
    from ember.shard.runner import Sequence
    from ember.shard.sampling import BatchSampler, SamplingParams

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

    times = {}
    for batch in args.batches:
        decode(batch, args.steps)  # this shape's first steps (and its graphs' captures)
        times[batch] = decode(batch, args.steps)
    from torch.profiler import ProfilerActivity, profile

    with profile(
        activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    ) as prof:
        decode(max(args.batches), 4)
    return times, prof.key_averages()


if __name__ == "__main__":
    main()
