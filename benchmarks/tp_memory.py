"""Tensor parallelism on this machine: per-rank memory and decode speed at batch 8, N = 1 vs N = 3.

    .venv/bin/python benchmarks/tp_memory.py [--model-id smollm2] [--num-shard 1 3] \
        [--max-new-tokens 64] [--kv-cache-tokens-bytes 96MiB] [--repeats 2]

For each N, starts `ember-launcher --num-shard N` as a user would and, once it
serves:
- reads each `ember-shard` rank's resident memory from /proc/<pid>/status
  (pids from the launcher's `started shard r (pid P)` lines): VmRSS, split into
  anonymous (tensors) and file-backed (mapped safetensors, libraries), and the
  peak VmHWM;
- computes the rank's parameter bytes from the safetensors headers with Ember's
  split (column-parallel q/k/v and gate/up, row-parallel o and down, vocab-parallel
  embedding; norms replicated), so each rank's share of the layer weights shows;
- takes the KV cache size each rank logged (the budget is split so every N holds
  the same number of tokens: `--kv-cache-bytes TOTAL/N` per rank);
- runs 8 concurrent streamed requests through HTTP (OpenAI `/v1/completions`,
  greedy, `ignore_eos`: TGI's `/generate` has no way to force a length) and
  reports decode tokens/s at batch 8 (8 / mean time per output token) and the
  overall output tokens/s; memory is read again after the load;
- asks the France question greedily, as a correctness check across N.
Writes benchmarks/results/tp.json and tp.md.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent

import load  # noqa: E402
import report  # noqa: E402
from servers import Launcher, free_port  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
STARTED = re.compile(r"^\[launcher\] started (shard (\d+)|router) \(pid (\d+)\)")
KV_LINE = re.compile(r"^\[shard (\d+)\].*KV cache: (\d+) blocks of (\d+) tokens = (\d+) tokens \((\d+) bytes\)")
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # split on output rows (weight and bias)
ROW = ("o_proj", "down_proj")  # split on input columns (weight only)
VOCAB = ("embed_tokens", "lm_head")  # split on vocabulary rows, padded
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ---------------------------------------------------------------- parameters per rank


def rank_elements(name: str, shape: list[int], world_size: int) -> int:
    """Elements of tensor `name` that one rank holds under Ember's tensor-parallel split."""
    total = math.prod(shape)
    parts = name.split(".")
    if any(p in COLUMN for p in parts):
        return total // world_size
    if any(p in ROW for p in parts) and parts[-1] == "weight":
        return total // world_size
    if any(p in VOCAB for p in parts):
        return math.ceil(shape[0] / world_size) * math.prod(shape[1:])
    return total  # norms, row-parallel biases: replicated


def _tensors(model_dir: Path, dtype_bytes: int):
    """(Hugging Face name, shape, bytes per element) of every weight, from the safetensors headers or, in a
    converted GGUF's directory, from the GGUF's tensor table (its own bytes: Ember keeps them)."""
    gguf = model_dir / "model.gguf"
    if gguf.is_file():
        from gguf import GGUFReader

        from ember.shard.weights import hf_name

        for tensor in GGUFReader(gguf).tensors:
            name = hf_name(tensor.name)
            if name is not None:
                shape = [int(n) for n in reversed(tensor.shape)]
                yield name, shape, int(tensor.n_bytes) / math.prod(shape)
        return
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, list(f.get_slice(name).get_shape()), dtype_bytes


def rank_parameters(model_dir: Path, world_size: int, dtype_bytes: int) -> dict:
    """Bytes one rank holds, by group, computed from the weight files' headers (no tensor is read)."""
    groups = {"layers": [0, 0], "embedding_and_head": [0, 0], "other": [0, 0]}  # [rank, whole model]
    for name, shape, per_element in _tensors(model_dir, dtype_bytes):
        group = "layers" if ".layers." in name else "embedding_and_head" if any(v in name for v in VOCAB) else "other"
        groups[group][0] += round(rank_elements(name, shape, world_size) * per_element)
        groups[group][1] += round(math.prod(shape) * per_element)
    out = {g: {"rank_bytes": r, "model_bytes": m, "share": r / m if m else 0.0} for g, (r, m) in groups.items()}
    out["total"] = {"rank_bytes": sum(r for r, _ in groups.values()), "model_bytes": sum(m for _, m in groups.values())}
    out["total"]["share"] = out["total"]["rank_bytes"] / out["total"]["model_bytes"]
    return out


# ---------------------------------------------------------------- processes


def proc_memory(pid: int) -> dict:
    """VmRSS, RssAnon, RssFile, RssShmem and VmHWM of one process, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0]) * 1024
    fields["cmdline"] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    return fields


def child_pids(lines: list[str]) -> dict[str, int]:
    """`shard 0`, `router` -> pid, from the launcher's `started` lines."""
    found = {}
    for line in lines:
        m = STARTED.match(line)
        if m:
            found[m.group(1)] = int(m.group(3))
    return found


def kv_bytes(lines: list[str]) -> dict[int, dict]:
    """Each rank's logged KV cache (the last Warmup's)."""
    out = {}
    for line in lines:
        m = KV_LINE.match(line)
        if m:
            out[int(m.group(1))] = {"blocks": int(m.group(2)), "tokens": int(m.group(4)), "bytes": int(m.group(5))}
    return out


def memory_snapshot(pids: dict[str, int]) -> dict[str, dict]:
    return {name: proc_memory(pid) for name, pid in sorted(pids.items())}


# ---------------------------------------------------------------- load


def decode_level(url: str, model: str, level: load.Level) -> dict:
    summary = load.run_async(load.run_level(url, load.APIS["openai"], level, model))
    tpot = summary["tpot_ms"]["mean"]
    summary["decode_tokens_per_s_batch"] = level.concurrency * 1e3 / tpot if tpot == tpot and tpot > 0 else None
    summary["loadavg_1m"] = os.getloadavg()[0]
    print(f"  {load.format_summary(summary)} decode={summary['decode_tokens_per_s_batch']:.1f} tok/s", flush=True)
    return summary


def france(url: str) -> str:
    body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 8, "do_sample": False}}
    return httpx.post(f"{url}/generate", json=body, timeout=300).json().get("generated_text", "")


def measure(n: int, args: argparse.Namespace, model_dir: Path, source, first: int) -> dict:
    """One launcher with N ranks: memory at rest, the batch-8 load, memory after, the France answer."""
    port = free_port()
    kv_per_rank = args.kv_cache_bytes // n
    with tempfile.TemporaryDirectory() as tmp:
        launcher = Launcher(
            "--model-id",
            str(model_dir),
            "--num-shard",
            str(n),
            "--shard-uds-path",
            f"{tmp}/ember",
            "--port",
            str(port),
            "--hostname",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            "--kv-cache-bytes",
            str(kv_per_rank),
            "--max-total-tokens",
            "512",
            "--max-input-tokens",
            "256",
            "--max-batch-prefill-tokens",
            "1024",
            *(["--dtype", args.dtype] if args.dtype else []),
        )
        try:
            started = time.perf_counter()
            launcher.wait_for_line("[launcher] serving ", timeout=600)
            ready_s = time.perf_counter() - started
            url = f"http://127.0.0.1:{port}"
            pids = child_pids(launcher.output())
            rest = memory_snapshot(pids)
            print(
                f"N={n}: serving after {ready_s:.0f}s; "
                + ", ".join(f"{k} RSS {v['VmRSS'] / 2**20:.0f} MiB" for k, v in rest.items()),
                flush=True,
            )
            answer = france(url)
            decode_level(url, args.model_id, load.Level(8, 8, args.time_limit, 8, source, 50_000 + first))  # warm
            runs = []
            for r in range(args.repeats):
                level = load.Level(8, 8, args.time_limit, args.max_new_tokens, source, first + 8 * r)
                runs.append(decode_level(url, args.model_id, level))
            after = memory_snapshot(pids)
            lines = launcher.output()
        finally:
            launcher.kill()
    return {
        "num_shard": n,
        "ready_s": ready_s,
        "kv_cache_bytes_per_rank_flag": kv_per_rank,
        "kv_cache": {str(k): v for k, v in kv_bytes(lines).items()},
        "memory_at_rest": rest,
        "memory_after_load": after,
        "parameters_per_rank": rank_parameters(model_dir, n, DTYPE_BYTES[args.dtype or "float32"]),
        "france": answer,
        "decode_batch8": {
            "runs": runs,
            "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s_batch"] for r in runs),
            "output_tokens_per_s": statistics.median(r["output_tokens_per_s"] for r in runs),
            "itl_p50_ms": statistics.median(r["itl_ms"]["p50"] for r in runs),
            "ttft_p50_ms": statistics.median(r["ttft_ms"]["p50"] for r in runs),
        },
    }


# ---------------------------------------------------------------- report


def _mib(b: float) -> str:
    return f"{b / 2**20:.0f}"


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Tensor parallelism: per-rank memory and decode speed (SmolLM2, CPU)",
        "",
        f"Model {result['model_id']} in {result['dtype']}, {m['cpus']} CPUs, 1-minute load average "
        f"{m['loadavg_start']:.1f} at start and {m['loadavg_end']:.1f} at the end (other work shared the cores). "
        f"KV cache: {_mib(result['kv_cache_bytes_total'])} MiB in all, split over the ranks "
        "(same token capacity for every N).",
        "",
        "## Memory per rank (MiB)",
        "",
        "| N | rank | RSS at rest | anon | file | RSS after load | peak (HWM) | KV cache | parameters (computed) "
        "| layer-weight share | all-weight share |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        n, params = run["num_shard"], run["parameters_per_rank"]
        for r in range(n):
            rest, after = run["memory_at_rest"][f"shard {r}"], run["memory_after_load"][f"shard {r}"]
            kv = run["kv_cache"].get(str(r), {}).get("bytes", float("nan"))
            lines.append(
                f"| {n} | {r} | {_mib(rest['VmRSS'])} | {_mib(rest['RssAnon'])} | {_mib(rest['RssFile'])} "
                f"| {_mib(after['VmRSS'])} | {_mib(after['VmHWM'])} | {_mib(kv)} "
                f"| {_mib(params['total']['rank_bytes'])} | {params['layers']['share']:.3f} "
                f"| {params['total']['share']:.3f} |"
            )
    lines += [
        "",
        "## Decode at batch 8 (8 concurrent streams through HTTP)",
        "",
        "| N | decode tok/s (8 / TPOT) | output tok/s (incl. prefill) | ITL p50 (ms) | TTFT p50 (ms) | France answer |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for run in result["runs"]:
        d = run["decode_batch8"]
        lines.append(
            f"| {run['num_shard']} | {d['decode_tokens_per_s']:.1f} | {d['output_tokens_per_s']:.1f} "
            f"| {d['itl_p50_ms']:.1f} | {d['ttft_p50_ms']:.0f} | {run['france']!r} |"
        )
    lines += [
        "",
        "RSS = resident set of the `ember-shard` process (anon: tensors and heap; file: mapped "
        "libraries and safetensors pages). Parameter bytes are computed from the safetensors headers with "
        "Ember's split; shares are rank bytes / whole-model bytes. On 2 cores N = 3 cannot be faster: "
        "the point is that each rank holds ~1/N of the layer weights and the answers agree.",
        "",
        "Command:",
        "",
        f"    {result['command']}",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    from prompts import prompt_set

    from ember.settings import parse_bytes
    from ember.store import resolve_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-id", default="smollm2")
    p.add_argument("--num-shard", type=int, nargs="+", default=[1, 3])
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--kv-cache-bytes",
        type=parse_bytes,
        default=parse_bytes("96MiB"),
        help="KV cache of all ranks together; each rank gets 1/N",
    )
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), help="default: the shard's (float32 on CPU)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--time-limit", type=float, default=600)
    p.add_argument("--out", default=str(RESULTS / "tp.json"))
    args = p.parse_args()

    model_dir = resolve_model(args.model_id).path
    prompts = prompt_set("short", model_dir / "tokenizer.json")
    source = lambda i: (prompts.text(i), prompts.tokens(i))  # noqa: E731
    result: dict = {
        "command": " ".join([".venv/bin/python", "benchmarks/tp_memory.py", *sys.argv[1:]]),
        "model_id": args.model_id,
        "dtype": args.dtype or "float32",
        "max_new_tokens": args.max_new_tokens,
        "kv_cache_bytes_total": args.kv_cache_bytes,
        "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()[0]},
        "runs": [],
    }
    for i, n in enumerate(args.num_shard):
        result["runs"].append(measure(n, args, model_dir, source, first=i * 100))
    report.write_result(result, Path(args.out), markdown)


if __name__ == "__main__":
    main()
