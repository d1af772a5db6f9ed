"""Streaming load generator for Ember's TGI route: TTFT, inter-token latency, throughput.

    python benchmarks/load.py --url http://127.0.0.1:3000 --concurrency 1 8 32 \
        --requests 64 --max-new-tokens 128 [--json results.json]

Each of `concurrency` workers sends streaming /generate_stream requests back
to back until `requests` have completed; every SSE event's arrival time is
recorded on the client, so the figures include the router and HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def one_request(client: httpx.AsyncClient, body: dict) -> tuple[float, list[float], int]:
    """(time to first token, inter-token gaps, tokens) of one streamed request."""
    started = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", "/generate_stream", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                if "error" in event:
                    raise RuntimeError(event["error"])
                stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return stamps[0] - started, gaps, len(stamps)


async def run_level(url: str, concurrency: int, requests: int, body: dict) -> dict:
    ttfts: list[float] = []
    itls: list[float] = []
    tokens = 0
    remaining = requests

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal remaining, tokens
        while remaining > 0:
            remaining -= 1
            ttft, gaps, n = await one_request(client, body)
            ttfts.append(ttft)
            itls.extend(gaps)
            tokens += n

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
        elapsed = time.perf_counter() - started
    return {
        "concurrency": concurrency, "requests": requests, "output_tokens": tokens,
        "elapsed_s": elapsed, "output_tokens_per_s": tokens / elapsed,
        "ttft_p50_ms": percentile(ttfts, 50) * 1e3, "ttft_p99_ms": percentile(ttfts, 99) * 1e3,
        "itl_p50_ms": percentile(itls, 50) * 1e3, "itl_p99_ms": percentile(itls, 99) * 1e3,
        "itl_mean_ms": (statistics.fmean(itls) * 1e3) if itls else float("nan"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:3000")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompt", default="Write a short story about a lighthouse keeper.")
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args()
    # Greedy, fixed length: every request produces exactly max_new_tokens unless EOS comes first.
    body = {"inputs": args.prompt, "parameters": {"max_new_tokens": args.max_new_tokens, "details": True}}
    results = []
    for level in args.concurrency:
        result = asyncio.run(run_level(args.url, level, max(args.requests, level), body))
        results.append(result)
        print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
