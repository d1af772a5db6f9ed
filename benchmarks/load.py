"""Streaming load generator for TGI and OpenAI endpoints: TTFT, inter-token latency, throughput.

    python benchmarks/load.py --url http://127.0.0.1:3000 --concurrency 1 8 32 \
        --requests 64 --max-new-tokens 128 [--api tgi|openai] [--scenario short|long|mix] \
        [--time-limit 120] [--json results.json]

Each of `concurrency` workers sends streaming requests back to back
(`/generate_stream` for TGI, `/v1/completions` with `stream: true` for OpenAI)
until `requests` have been sent or the level's time limit passes; requests
still running at the limit are cancelled and counted as such. Every event's
arrival time is taken on the client, so the figures include HTTP and the
server's own router. Output lengths are forced where the API allows it
(OpenAI: `ignore_eos` and `min_tokens`) and the tokens actually received are
recorded either way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx

DONE = object()  # the OpenAI stream's `data: [DONE]` sentinel


# ---------------------------------------------------------------- statistics

def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), interpolated linearly between ranks; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# ---------------------------------------------------------------- wire formats

def parse_sse_data(line: str) -> Any:
    """The JSON payload of one SSE `data:` line; DONE for `[DONE]`; None for other lines."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == "[DONE]":
        return DONE
    if not payload:
        return None
    return json.loads(payload)


@dataclass
class Api:
    """One streaming API: its path, request body and how its events count tokens."""

    name: str
    path: str
    body: Callable[[str, int, str], dict]
    tokens_in: Callable[[dict], int]
    final_count: Callable[[dict], int | None]


def _tgi_body(prompt: str, max_new_tokens: int, model: str) -> dict:
    # TGI's API has no ignore_eos: greedy, and the actual count is recorded.
    return {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "do_sample": False,
                                             "details": True}}


def _tgi_tokens(event: dict) -> int:
    # Every token event counts, the final special one (EOS) too: TGI's generated_tokens does.
    return 1 if event.get("token") else 0


def _tgi_final(event: dict) -> int | None:
    details = event.get("details") or {}
    return details.get("generated_tokens")


def _openai_body(prompt: str, max_new_tokens: int, model: str) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0.0,
            "stream": True, "ignore_eos": True, "min_tokens": max_new_tokens,
            "stream_options": {"include_usage": True}}


def _openai_tokens(event: dict) -> int:
    choices = event.get("choices") or []
    return sum(1 for c in choices if c.get("text"))


def _openai_final(event: dict) -> int | None:
    usage = event.get("usage") or {}
    return usage.get("completion_tokens")


APIS = {
    "tgi": Api("tgi", "/generate_stream", _tgi_body, _tgi_tokens, _tgi_final),
    "openai": Api("openai", "/v1/completions", _openai_body, _openai_tokens, _openai_final),
}


# ---------------------------------------------------------------- one request

@dataclass
class RequestResult:
    """What the client saw of one streamed request; times in seconds from its start."""

    prompt_tokens: int = 0
    stamps: list[float] = field(default_factory=list)  # arrival of each event carrying tokens
    tokens: int = 0                   # counted from events
    reported_tokens: int | None = None  # the server's own count (usage / details), when sent
    completed: bool = False
    cancelled_at: float | None = None
    error: str | None = None

    @property
    def output_tokens(self) -> int:
        return self.reported_tokens if self.reported_tokens is not None else self.tokens

    @property
    def ttft(self) -> float | None:
        return self.stamps[0] if self.stamps else None

    @property
    def e2e(self) -> float | None:
        return self.stamps[-1] if self.completed and self.stamps else None

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]

    def tpot(self) -> float | None:
        """Mean time per output token after the first (robust to servers batching tokens per event)."""
        if not self.completed or self.output_tokens < 2 or len(self.stamps) < 2:
            return None
        return (self.stamps[-1] - self.stamps[0]) / (self.output_tokens - 1)


def consume_event(result: RequestResult, api: Api, event: Any, now: float) -> bool:
    """Fold one parsed event into `result`; True when the stream is finished."""
    if event is DONE:
        return True
    if not isinstance(event, dict):
        return False
    if "error" in event and event["error"]:
        raise RuntimeError(str(event["error"]))
    n = api.tokens_in(event)
    if n:
        result.stamps.append(now)
        result.tokens += n
    final = api.final_count(event)
    if final is not None:
        result.reported_tokens = final
    return api.name == "tgi" and "details" in event and event.get("generated_text") is not None


async def stream_request(client: httpx.AsyncClient, api: Api, body: dict, result: RequestResult) -> None:
    """Send one streaming request, filling `result` as events arrive (partial on cancellation)."""
    started = time.perf_counter()
    try:
        async with client.stream("POST", api.path, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")[:300]
                raise RuntimeError(f"HTTP {resp.status_code}: {text}")
            async for line in resp.aiter_lines():
                if consume_event(result, api, parse_sse_data(line), time.perf_counter() - started):
                    break
        result.completed = True
    except asyncio.CancelledError:
        result.cancelled_at = time.perf_counter() - started
        raise


# ---------------------------------------------------------------- one level

@dataclass
class Level:
    """One measurement: a concurrency against a prompt supply, bounded in count and time."""

    concurrency: int
    max_requests: int
    time_limit_s: float
    max_new_tokens: int
    prompt: Callable[[int], tuple[str, int]]  # index -> (text, prompt tokens)
    first_index: int = 0


async def run_level(url: str, api: Api, level: Level, model: str = "", request_timeout: float = 600,
                    transport: httpx.AsyncBaseTransport | None = None) -> dict:
    """Run one level and summarise it; never exceeds `max_requests` nor (much) `time_limit_s`.

    `transport` replaces the network (tests drive an in-process app through it)."""
    results: list[RequestResult] = []
    next_index = 0

    async def worker(client: httpx.AsyncClient, deadline: float) -> None:
        nonlocal next_index
        while next_index < level.max_requests and time.perf_counter() < deadline:
            text, n_prompt = level.prompt(level.first_index + next_index)
            next_index += 1
            result = RequestResult(prompt_tokens=n_prompt)
            results.append(result)
            try:
                await stream_request(client, api, api.body(text, level.max_new_tokens, model), result)
            except (httpx.HTTPError, RuntimeError, ValueError) as exc:
                result.error = f"{type(exc).__name__}: {exc}"

    limits = httpx.Limits(max_connections=level.concurrency + 4)
    timeout = httpx.Timeout(request_timeout, connect=10)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, transport=transport) as client:
        started = time.perf_counter()
        deadline = started + level.time_limit_s
        tasks = [asyncio.create_task(worker(client, deadline)) for _ in range(level.concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=level.time_limit_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        elapsed = time.perf_counter() - started
    return summarize(results, level, elapsed)


def _ms(values: list[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50) * 1e3, "p99": percentile(values, 99) * 1e3,
            "mean": (statistics.fmean(values) * 1e3) if values else float("nan")}


def summarize(results: list[RequestResult], level: Level, elapsed: float) -> dict:
    """The level's figures. TTFT of a request cancelled before its first token counts as
    its cancellation time (a lower bound; `ttft_censored` says how many)."""
    done = [r for r in results if r.completed]
    errors = [r.error for r in results if r.error]
    ttfts = [r.ttft for r in results if r.ttft is not None]
    censored = [r.cancelled_at for r in results if r.ttft is None and r.cancelled_at is not None]
    tokens = sum(r.output_tokens for r in results if not r.error)
    counts = [r.output_tokens for r in done]
    return {
        "concurrency": level.concurrency,
        "max_new_tokens": level.max_new_tokens,
        "requests_sent": len(results),
        "requests_completed": len(done),
        "requests_cancelled": sum(1 for r in results if r.cancelled_at is not None),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "elapsed_s": elapsed,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / elapsed if elapsed > 0 else float("nan"),
        "requests_per_s": len(done) / elapsed if elapsed > 0 else float("nan"),
        "output_counts": {"min": min(counts, default=0), "max": max(counts, default=0),
                          "mean": statistics.fmean(counts) if counts else 0.0,
                          "forced_share": (sum(c == level.max_new_tokens for c in counts) / len(counts))
                          if counts else 0.0},
        "prompt_tokens_mean": statistics.fmean([r.prompt_tokens for r in results]) if results else 0.0,
        "ttft_ms": _ms(ttfts + censored),
        "ttft_censored": len(censored),
        "itl_ms": _ms([g for r in results for g in r.gaps()]),
        "tpot_ms": _ms([t for r in done if (t := r.tpot()) is not None]),
        "e2e_ms": _ms([r.e2e for r in done if r.e2e is not None]),
    }


def format_summary(s: dict) -> str:
    return (f"c={s['concurrency']:>3} sent={s['requests_sent']:>3} done={s['requests_completed']:>3} "
            f"err={s['errors']} tok/s={s['output_tokens_per_s']:8.1f} req/s={s['requests_per_s']:6.2f} "
            f"ttft p50/p99={s['ttft_ms']['p50']:7.0f}/{s['ttft_ms']['p99']:7.0f}ms "
            f"itl p50/p99={s['itl_ms']['p50']:6.1f}/{s['itl_ms']['p99']:6.1f}ms "
            f"out={s['output_counts']['mean']:.0f}")


# ---------------------------------------------------------------- CLI

def _prompt_source(args: argparse.Namespace) -> Callable[[int], tuple[str, int]]:
    if args.prompt:
        return lambda _i: (args.prompt, 0)
    from prompts import prompt_set  # benchmarks/ is on sys.path when run as a script

    tokenizer = Path(args.tokenizer) if args.tokenizer else _default_tokenizer()
    prompts = prompt_set(args.scenario, tokenizer)
    return lambda i: (prompts.text(i), prompts.tokens(i))


def _default_tokenizer() -> Path:
    from ember.launcher.store import resolve_model

    return resolve_model("smollm2").path / "tokenizer.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:3000")
    p.add_argument("--api", choices=sorted(APIS), default="tgi")
    p.add_argument("--model", default="", help="the `model` field of OpenAI requests")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level (at least the concurrency)")
    p.add_argument("--time-limit", type=float, default=300, help="seconds per level before cancelling")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--scenario", choices=["short", "long", "mix"], default="short")
    p.add_argument("--tokenizer", help="tokenizer.json measuring the prompts (default: smollm2's)")
    p.add_argument("--prompt", help="send this one prompt every time instead of a prompt set")
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args()
    source = _prompt_source(args)
    results, first = [], 0
    for concurrency in args.concurrency:
        level = Level(concurrency, max(args.requests, concurrency), args.time_limit, args.max_new_tokens,
                      source, first)
        first += level.max_requests
        summary = asyncio.run(run_level(args.url, APIS[args.api], level, args.model))
        results.append(summary)
        print(format_summary(summary), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
