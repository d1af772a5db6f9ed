"""The router's cost per token: the same streaming load over HTTP and straight over gRPC.

    .venv/bin/python benchmarks/router_overhead.py [--model-id smollm2] [--concurrency 1 8 32] \
        [--max-new-tokens 64] [--waves 2] [--repeats 2]

Starts one `ember-shard` on the model and an `ember-router` on it, then, per
concurrency level and repeat, runs load.py's level over HTTP (OpenAI
`/v1/completions`, streamed, greedy, `ignore_eos` so every request makes
exactly `--max-new-tokens`) and grpc_load.py's level on the same shard (its own
small batching loop, no HTTP). The two alternate, and which goes first swaps
each repeat, so drift in the machine's load touches both alike. The router is
idle while the gRPC load runs; their batch and request ids never meet.

Router overhead per token = HTTP inter-token latency - gRPC inter-token
latency at the same level (p50, and the mean time per output token).
Writes benchmarks/results/router_overhead.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import grpc_load  # noqa: E402
import load  # noqa: E402
import report  # noqa: E402
from servers import http_ok, shard_healthy, start_router, start_shard, stop_process, wait_for  # noqa: E402

# The shard's speed settings, read from the environment: recorded with the command.
SHARD_ENV = ("QUANTIZE", "MATMUL_DTYPE", "DTYPE", "OMP_NUM_THREADS", "PREFILL_CHUNK_TOKENS")

RESULTS = ROOT / "benchmarks" / "results"
DECODE_METRICS = ("tgi_batch_inference_duration", "tgi_batch_forward_duration")
PREFILL_COUNT = 'tgi_batch_inference_count{method="prefill"}'


def decode_totals(url: str) -> dict[str, float]:
    """The router's running sums and counts of its Decode calls, from /metrics."""
    import httpx

    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(PREFILL_COUNT):
            out["prefill_count"] = float(line.rsplit(" ", 1)[1])
        for name in DECODE_METRICS:
            for part in ("_sum", "_count"):
                if line.startswith(f"{name}{part}{{") and 'method="decode"' in line:
                    out[name + part] = float(line.rsplit(" ", 1)[1])
    return out


def decode_step(before: dict[str, float], after: dict[str, float]) -> dict:
    """Mean Decode call and forward per step between two /metrics scrapes, in ms."""

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    n = delta("tgi_batch_inference_duration_count")
    return {
        "calls": int(n),
        "prefill_calls": int(delta("prefill_count")),
        "call_mean_ms": delta("tgi_batch_inference_duration_sum") / n * 1e3 if n else float("nan"),
        "forward_mean_ms": delta("tgi_batch_forward_duration_sum") / n * 1e3 if n else float("nan"),
    }


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system, all threads) of process `pid`, or of this one (the load client)."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_pair(
    url: str, uds: str, level: load.Level, encode, model: str, http_first: bool, pids: dict[str, int] | None = None
) -> dict:
    """One HTTP level and one gRPC level on the same prompts, with the load average around each and the
    CPU time each process spent in it (`pids`: the router's and the shard's; the client is this one)."""
    runs: dict = {}
    pids = pids or {}

    def http() -> dict:
        before = decode_totals(url)
        summary = load.run_async(load.run_level(url, load.APIS["openai"], level, model))
        summary["decode_step"] = decode_step(before, decode_totals(url))
        return summary

    def grpc() -> dict:
        return load.run_async(grpc_load.run_level(uds, level, encode))

    order: list[tuple[str, Callable[[], dict]]] = [("http", http), ("grpc", grpc)]
    for name, fn in order if http_first else order[::-1]:
        load_before = os.getloadavg()[0]
        cpu_before = {who: cpu_seconds(pid) for who, pid in pids.items()} | {"client": cpu_seconds()}
        summary = fn()
        cpu_after = {who: cpu_seconds(pid) for who, pid in pids.items()} | {"client": cpu_seconds()}
        summary["cpu_s"] = {who: cpu_after[who] - cpu_before[who] for who in cpu_before}
        summary["loadavg_1m"] = [load_before, os.getloadavg()[0]]
        runs[name] = summary
        print(
            f"{name:>4} {load.format_summary(summary)} step={summary['decode_step']['call_mean_ms']:.1f}ms "
            f"prefills={summary['decode_step']['prefill_calls']} "
            f"load={load_before:.1f}",
            flush=True,
        )
    return runs


def median_of(runs: list[dict], metric: str, stat: str) -> float:
    return statistics.median(r[metric][stat] for r in runs)


def overhead(level_runs: list[dict]) -> dict:
    """Medians over repeats of each side, and the HTTP-minus-gRPC differences per token."""
    out: dict = {}
    for side in ("http", "grpc"):
        runs = [r[side] for r in level_runs]
        out[side] = {
            "itl_p50_ms": median_of(runs, "itl_ms", "p50"),
            "itl_p99_ms": median_of(runs, "itl_ms", "p99"),
            "tpot_mean_ms": median_of(runs, "tpot_ms", "mean"),
            "ttft_p50_ms": median_of(runs, "ttft_ms", "p50"),
            "ttft_p99_ms": median_of(runs, "ttft_ms", "p99"),
            "output_tokens_per_s": statistics.median(r["output_tokens_per_s"] for r in runs),
            "decode_call_ms": statistics.median(r["decode_step"]["call_mean_ms"] for r in runs),
            "prefill_calls": statistics.median(r["decode_step"]["prefill_calls"] for r in runs),
            # Each token's time outside the shard's Decode call: the part a router can add to.
            "tpot_beyond_decode_ms": statistics.median(
                r["tpot_ms"]["mean"] - r["decode_step"]["call_mean_ms"] for r in runs
            ),
            "errors": sum(r["errors"] for r in runs),
        }
    h, g = out["http"], out["grpc"]
    out["overhead_per_token_ms"] = {
        "itl_p50": h["itl_p50_ms"] - g["itl_p50_ms"],
        "tpot_mean": h["tpot_mean_ms"] - g["tpot_mean_ms"],
        "itl_p99": h["itl_p99_ms"] - g["itl_p99_ms"],
        "beyond_decode": h["tpot_beyond_decode_ms"] - g["tpot_beyond_decode_ms"],
    }
    out["overhead_ttft_p50_ms"] = h["ttft_p50_ms"] - g["ttft_p50_ms"]
    # CPU time per shard call (Decode and Prefill) while each side ran: on a machine whose cores the
    # shard's threads all use, the router's time is taken from the shard's steps, and so is the load
    # client's, which differs between the sides (HTTP parsing per token against one gRPC reply per step).
    cpu: dict = {}
    for side in ("http", "grpc"):
        runs = [r[side] for r in level_runs if "cpu_s" in r[side]]
        if not runs:
            continue
        calls = lambda r: r["decode_step"]["calls"] + r["decode_step"]["prefill_calls"]  # noqa: E731
        cpu[side] = {
            who: statistics.median(1e3 * r["cpu_s"][who] / max(calls(r), 1) for r in runs) for who in runs[0]["cpu_s"]
        }
    if cpu:
        cpu["router_share_of_step"] = cpu["http"].get("router", float("nan")) / g["decode_call_ms"]
        out["cpu_ms_per_call"] = cpu
    # Each repeat's two runs follow each other within seconds: their difference cancels the
    # machine's slower drift, which moves the medians of either side by more than the overhead.
    paired = [r["http"]["itl_ms"]["p50"] - r["grpc"]["itl_ms"]["p50"] for r in level_runs]
    step = g["itl_p50_ms"]
    out["paired_itl_p50"] = {
        "median_ms": statistics.median(paired),
        "min_ms": min(paired),
        "max_ms": max(paired),
        "share_of_step": statistics.median(paired) / step if step else float("nan"),
    }
    return out


def markdown(result: dict) -> str:
    lines = [
        "# Router overhead per token (HTTP vs gRPC straight to the shard)",
        "",
        f"Model {result['model_id']}, {result['max_new_tokens']} new tokens per request (forced, greedy), "
        f"prompts `{result['scenario']}` ({result['prompt_tokens']} tokens), "
        f"median of {result['repeats']} repeats. Machine: {result['machine']['cpus']} CPUs, "
        f"1-minute load average {result['machine']['loadavg_start']:.1f} at start and "
        f"{result['machine']['loadavg_end']:.1f} at the end (other work shared the cores).",
        "",
        "| concurrency | HTTP ITL p50 / p99 (ms) | gRPC ITL p50 / p99 (ms) "
        "| overhead/token p50, paired (ms) [min–max] | share of a step | overhead/token p50 (ms) "
        "| overhead/token mean TPOT (ms) | Decode call HTTP / gRPC (ms) | overhead/token beyond Decode (ms) "
        "| Prefill calls HTTP / gRPC | HTTP TTFT p50 (ms) | gRPC TTFT p50 (ms) | HTTP tok/s | gRPC tok/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, lv in result["levels"].items():
        h, g, o = lv["summary"]["http"], lv["summary"]["grpc"], lv["summary"]["overhead_per_token_ms"]
        pr = lv["summary"]["paired_itl_p50"]
        lines.append(
            f"| {c} | {h['itl_p50_ms']:.1f} / {h['itl_p99_ms']:.1f} | {g['itl_p50_ms']:.1f} / {g['itl_p99_ms']:.1f} "
            f"| {pr['median_ms']:+.2f} [{pr['min_ms']:+.1f} – {pr['max_ms']:+.1f}] | {100 * pr['share_of_step']:.1f} % "
            f"| {o['itl_p50']:+.1f} | {o['tpot_mean']:+.1f} | {h['decode_call_ms']:.1f} / {g['decode_call_ms']:.1f} "
            f"| {o['beyond_decode']:+.1f} | {h['prefill_calls']:.0f} / {g['prefill_calls']:.0f} "
            f"| {h['ttft_p50_ms']:.0f} | {g['ttft_p50_ms']:.0f} "
            f"| {h['output_tokens_per_s']:.1f} | {g['output_tokens_per_s']:.1f} |"
        )
    cpu_rows = [
        (c, lv["summary"]["cpu_ms_per_call"])
        for c, lv in result["levels"].items()
        if "cpu_ms_per_call" in lv["summary"]
    ]
    if cpu_rows:
        lines += [
            "",
            "CPU time per shard call (Decode or Prefill) while each side ran, ms (medians over repeats):",
            "",
            "| concurrency | router (HTTP side) | router ÷ gRPC Decode call | shard HTTP / gRPC "
            "| load client HTTP / gRPC |",
            "|---:|---:|---:|---:|---:|",
        ]
        for c, cpu in cpu_rows:
            h, g = cpu["http"], cpu["grpc"]
            lines.append(
                f"| {c} | {h['router']:.2f} | {100 * cpu['router_share_of_step']:.1f} % "
                f"| {h['shard']:.1f} / {g['shard']:.1f} | {h['client']:.2f} / {g['client']:.2f} |"
            )
        lines += [
            "",
            "The shard's threads use every core here, so the CPU time of the router and of the load "
            "client competes with the shard's steps: the router's time per call bounds what it can add "
            "to a step, and the paired ITL column above is what it did add (part of the router's work "
            "runs while the shard waits between steps, e.g. on its own gRPC reply). The load client's "
            "time differs between the sides (an SSE event to parse per token against one gRPC reply "
            "per step) and lands in the HTTP side's latencies too.",
        ]
    lines += [
        "",
        "Overhead = HTTP − gRPC at the same level. The paired column takes each repeat's HTTP "
        "and gRPC runs (back to back, order swapped every repeat) and gives the median of their "
        "differences in ITL p50, and its share of the gRPC ITL p50 (a decode step): the machine's "
        "drift between repeats cancels there, not in the columns that subtract each side's median. "
        "HTTP is the router's OpenAI `/v1/completions` "
        "stream (validation, queue, batching task, SSE, load.py's HTTP client); gRPC is grpc_load.py's own "
        "batching loop on the same shard with the router's onboarding rule. Both stamp tokens on "
        "arrival at the client. The shard's speed drifts with the machine's load, so the last overhead "
        "column subtracts each run's mean Decode call (router: `tgi_batch_inference_duration` from "
        "/metrics; gRPC: timed by the loop) from its mean time per output token before comparing: "
        "it is the time per token spent outside the shard, HTTP minus gRPC. Prefill calls per level "
        "(median): requests reaching the router one by one are prefilled in more, smaller batches, "
        "and each prefill stalls the running batch's next token.",
        "",
        "Command:",
        "",
        f"    {result['command']}",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-id", default="smollm2")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--waves", type=int, default=2, help="requests per level = max(8, waves x concurrency)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--scenario", choices=["short", "long", "mix"], default="short")
    p.add_argument("--time-limit", type=float, default=600)
    p.add_argument("--out", default=str(RESULTS / "router_overhead.json"))
    args = p.parse_args()

    from prompts import prompt_set

    from ember.store import resolve_model

    model_dir = resolve_model(args.model_id).path
    prompts = prompt_set(args.scenario, model_dir / "tokenizer.json")
    source = lambda i: (prompts.text(i), prompts.tokens(i))  # noqa: E731
    encode = grpc_load.tokenizer_encode(model_dir / "tokenizer.json")
    result: dict = {
        "command": " ".join(
            [
                *(f"{k}={os.environ[k]}" for k in SHARD_ENV if os.environ.get(k)),
                ".venv/bin/python",
                "benchmarks/router_overhead.py",
                *sys.argv[1:],
            ]
        ),
        "model_id": args.model_id,
        "max_new_tokens": args.max_new_tokens,
        "scenario": args.scenario,
        "prompt_tokens": prompts.tokens(0),
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()[0]},
        "levels": {},
    }
    first = 0
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as procs:
        shard, uds = start_shard(model_dir, f"{tmp}/ember", env={"LOG_LEVEL": "WARNING"})
        procs.callback(stop_process, shard)
        wait_for(lambda: shard_healthy(uds), 300, "shard", shard)
        router_log = procs.enter_context(open(Path(tmp) / "router.log", "wb"))
        router, url = start_router(uds, model_dir, model_id=args.model_id, stderr=router_log)
        procs.callback(stop_process, router)
        wait_for(lambda: http_ok(f"{url}/health"), 300, "router", router)
        pids = {"router": router.pid, "shard": shard.pid}
        warm = load.Level(2, 2, args.time_limit, 8, source, 10_000)
        run_pair(url, uds, warm, encode, args.model_id, True)  # first-request costs, not measured
        for c in args.concurrency:
            n = max(8, args.waves * c)
            level_runs = []
            for repeat in range(args.repeats):
                level = load.Level(c, n, args.time_limit, args.max_new_tokens, source, first)
                first += n
                level_runs.append(
                    run_pair(url, uds, level, encode, args.model_id, http_first=repeat % 2 == 0, pids=pids)
                )
            result["levels"][str(c)] = {"runs": level_runs, "summary": overhead(level_runs)}
            print(json.dumps({c: result["levels"][str(c)]["summary"]["overhead_per_token_ms"]}), flush=True)
    report.write_result(result, Path(args.out), markdown)


if __name__ == "__main__":
    main()
