"""Streaming load generator for TGI and OpenAI endpoints: TTFT, inter-token latency, throughput.

    python benchmarks/load.py --url http://127.0.0.1:3000 --concurrency 1 8 32 \
        --requests 64 --max-new-tokens 128 [--api tgi|openai] [--scenario short|long|mix|rag|chat|grounded] \
        [--time-limit 120] [--client raw|httpx] [--json results.json]

Each of `concurrency` workers sends streaming requests back to back
(`/generate_stream` for TGI, `/v1/completions` with `stream: true` for OpenAI)
until `requests` have been sent or the level's time limit passes; requests
still running at the limit are cancelled and counted as such. Every event's
arrival time is taken on the client, so the figures include HTTP and the
server's own router. Output lengths are forced where the API allows it
(OpenAI: `ignore_eos` and `min_tokens`) and the tokens actually received are
recorded either way.

The HTTP client is lean by default (`RawClient`: an asyncio protocol on plain
HTTP/1.1 that parses chunked SSE as bytes arrive), since the load generator
shares the cores with the server it measures; `--client httpx` uses httpx
(https URLs and tests' in-process transports always do). Levels run on uvloop
when it is installed (`run_async`), as the router's loop does, so neither side
of a comparison pays asyncio's pure-Python loop; `EMBER_BENCH_LOOP=asyncio`
keeps asyncio's own loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

DONE = object()  # the OpenAI stream's `data: [DONE]` sentinel


def run_async(coro):
    """Run a level's coroutine on uvloop when installed (the router's loop too), else asyncio's."""
    if os.environ.get("EMBER_BENCH_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)


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
    text_in: Callable[[dict], str] = lambda event: ""


def _tgi_body(prompt: str, max_new_tokens: int, model: str) -> dict:
    # TGI's API has no ignore_eos: greedy, and the actual count is recorded.
    return {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "do_sample": False, "details": True}}


def _tgi_tokens(event: dict) -> int:
    # Every token event counts, the final special one (EOS) too: TGI's generated_tokens does.
    return 1 if event.get("token") else 0


def _tgi_final(event: dict) -> int | None:
    details = event.get("details") or {}
    return details.get("generated_tokens")


def _openai_body(prompt: str, max_new_tokens: int, model: str) -> dict:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_new_tokens,
        "temperature": 0.0,
        "stream": True,
        "ignore_eos": True,
        "min_tokens": max_new_tokens,
        "stream_options": {"include_usage": True},
    }


def _openai_tokens(event: dict) -> int:
    choices = event.get("choices") or []
    return sum(1 for c in choices if c.get("text"))


def _openai_final(event: dict) -> int | None:
    usage = event.get("usage") or {}
    return usage.get("completion_tokens")


def _tgi_text(event: dict) -> str:
    token = event.get("token") or {}
    return "" if token.get("special") else token.get("text", "")


def _openai_text(event: dict) -> str:
    return "".join(c.get("text") or "" for c in event.get("choices") or [])


APIS = {
    "tgi": Api("tgi", "/generate_stream", _tgi_body, _tgi_tokens, _tgi_final, _tgi_text),
    "openai": Api("openai", "/v1/completions", _openai_body, _openai_tokens, _openai_final, _openai_text),
}


# ---------------------------------------------------------------- one request


@dataclass
class RequestResult:
    """What the client saw of one streamed request; times in seconds from its start."""

    prompt_tokens: int = 0
    stamps: list[float] = field(default_factory=list)  # arrival of each event carrying tokens
    tokens: int = 0  # counted from events
    reported_tokens: int | None = None  # the server's own count (usage / details), when sent
    completed: bool = False
    cancelled_at: float | None = None
    error: str | None = None
    # Prompt tokens the server says it took from its prefix cache (OpenAI usage), when it says so.
    cached_tokens: int | None = None
    # The answer's text, kept only when asked (`keep_text`: a chat's next turn resends it).
    keep_text: bool = False
    pieces: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

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
        if result.keep_text:
            result.pieces.append(api.text_in(event))
    final = api.final_count(event)
    if final is not None:
        result.reported_tokens = final
        usage = event.get("usage") or {}
        if usage.get("prompt_tokens"):
            result.prompt_tokens = usage["prompt_tokens"]
        details = usage.get("prompt_tokens_details") or {}
        if details.get("cached_tokens") is not None:
            result.cached_tokens = details["cached_tokens"]
    return api.name == "tgi" and "details" in event and event.get("generated_text") is not None


class _Response(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection reading streamed responses as they arrive.

    The lean client (`RawClient`): the load generator shares the machine's cores
    with the server it measures, so each event should cost it little. httpx
    spends about 0.2 ms of CPU per event (anyio, h11, line iterators); this reads
    the socket's bytes in `data_received`, undoes chunked transfer encoding and
    folds each `data:` line into the request's result right there, stamped with
    the arrival of the bytes that carried it.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.lost: Exception | None = None
        self._begin(None)

    def _begin(self, request: _Request | None) -> None:
        self.request = request
        self.head = b""  # status line and headers, until the blank line
        self.status = 0
        self.keep_alive = True
        self.chunked = False
        self.remaining = -1  # bytes left: of the body (content-length) or of the current chunk
        self.chunk_line = b""  # a chunk-size line split across reads
        self.chunk_crlf = 0  # bytes of a chunk's trailing CRLF still to skip
        self.trailers = False  # past the last chunk: trailer lines until an empty one
        self.lines = b""  # the body's last, unfinished line
        self.error_body = b""
        self.in_body = False

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        req = self.request
        if req is not None and not req.done.done():
            if self.in_body and not self.chunked and self.remaining < 0:
                self._finish()  # a body delimited by the connection's end
            else:
                req.done.set_exception(exc or ConnectionError("connection closed before the response ended"))

    def data_received(self, data: bytes) -> None:
        req = self.request
        if req is None or req.done.done():
            return
        try:
            self._feed(data, time.perf_counter() - req.started)
        except Exception as exc:  # bad event, error event, bad framing: the request fails
            self.keep_alive = False
            if not req.done.done():
                req.done.set_exception(
                    exc
                    if isinstance(exc, (RuntimeError, ValueError, OSError))
                    else RuntimeError(f"bad response: {exc!r}")
                )
            self.transport.close()

    # -- parsing
    def _feed(self, data: bytes, now: float) -> None:
        if not self.in_body:
            self.head = (self.head + data).lstrip(b"\r\n")  # empty lines before a status line are allowed
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            data = self.head[end + 4 :]
            self._headers(self.head[:end].decode("latin-1"))
            self.in_body = True
        if not self.chunked:
            if self.remaining >= 0:
                data = data[: self.remaining]
                self.remaining -= len(data)
            self._body(data, now)
            if self.remaining == 0:
                self._finish()
            return
        if self.chunk_line:  # a chunk-size line began in the last read
            data, self.chunk_line = self.chunk_line + data, b""
        pos, n = 0, len(data)
        while pos < n:
            if self.chunk_crlf:
                skip = min(self.chunk_crlf, n - pos)
                pos += skip
                self.chunk_crlf -= skip
                continue
            if self.remaining > 0:
                take = min(self.remaining, n - pos)
                self._body(data[pos : pos + take], now)
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self.chunk_crlf = 2
                continue
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                self.chunk_line += data[pos:]
                return
            line, pos = data[pos:eol], eol + 2
            if self.trailers:
                if not line:  # the response's end
                    self._finish()
                    return
                continue
            size = int(line.split(b";", 1)[0], 16)
            if size == 0:  # the last chunk; trailer lines (if any) and an empty line follow
                self.trailers = True
            self.remaining = size

    def _headers(self, head: str) -> None:
        lines = head.split("\r\n")
        parts = lines[0].split(" ", 2)
        self.status = int(parts[1])
        version_11 = parts[0] == "HTTP/1.1"
        connection = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "transfer-encoding":
                self.chunked = "chunked" in value
            elif name == "content-length":
                self.remaining = int(value)
            elif name == "connection":
                connection = value
        self.keep_alive = ("keep-alive" in connection) if not version_11 else ("close" not in connection)
        if not self.chunked and self.remaining < 0:
            self.keep_alive = False  # the body ends with the connection

    def _body(self, data: bytes, now: float) -> None:
        req = self.request
        if self.status != 200:
            self.error_body += data
            return
        if req.finished:
            return
        lines = self.lines + data if self.lines else data
        start = 0
        while True:
            eol = lines.find(b"\n", start)
            if eol < 0:
                break
            line = lines[start:eol]
            start = eol + 1
            if line.startswith(b"data:"):
                payload = line[5:].strip()
                if not payload:
                    continue
                event = DONE if payload == b"[DONE]" else json.loads(payload)
                if consume_event(req.result, req.api, event, now):
                    req.finished = True
                    self.lines = b""
                    return
        self.lines = lines[start:]

    def _finish(self) -> None:
        req = self.request
        if not self.keep_alive:
            self.transport.close()
        if req.done.done():
            return
        if self.status != 200:
            text = self.error_body.decode(errors="replace")[:300]
            req.done.set_exception(RuntimeError(f"HTTP {self.status}: {text}"))
        else:
            req.done.set_result(None)


@dataclass
class _Request:
    api: Api
    result: RequestResult
    started: float
    done: asyncio.Future
    finished: bool = False


class RawClient:
    """Streaming POSTs over plain HTTP/1.1 keep-alive connections, one per concurrent request."""

    def __init__(self, url: str, connect_timeout: float = 10, request_timeout: float = 600) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise ValueError(f"RawClient speaks plain http, not {parts.scheme}")
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.host_header = parts.netloc.encode("latin-1")
        self.connect_timeout, self.request_timeout = connect_timeout, request_timeout
        self.idle: list[_Response] = []
        self.open: set[_Response] = set()

    async def _connection(self) -> _Response:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(loop.create_connection(_Response, self.host, self.port), self.connect_timeout)
        return conn

    async def stream(self, api: Api, body: dict, result: RequestResult, started: float) -> None:
        """POST `body` to the API's path and fold its events into `result`; raises on failure."""
        payload = json.dumps(body).encode()
        head = (
            b"POST "
            + (self.prefix + api.path).encode()
            + b" HTTP/1.1\r\nHost: "
            + self.host_header
            + b"\r\nAccept: */*\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(payload)).encode()
            + b"\r\n\r\n"
        )
        conn = await self._connection()
        self.open.add(conn)
        req = _Request(api, result, started, asyncio.get_running_loop().create_future())
        conn._begin(req)
        reusable = False
        try:
            conn.transport.write(head + payload)
            await asyncio.wait_for(req.done, self.request_timeout)
            reusable = conn.keep_alive and not conn.closed
        finally:
            conn._begin(None)
            self.open.discard(conn)
            if reusable:
                self.idle.append(conn)
            elif not conn.closed:
                conn.transport.close()

    async def aclose(self) -> None:
        for conn in [*self.idle, *self.open]:
            if not conn.closed:
                conn.transport.close()
        self.idle.clear()
        self.open.clear()


async def stream_request(client: httpx.AsyncClient | RawClient, api: Api, body: dict, result: RequestResult) -> None:
    """Send one streaming request, filling `result` as events arrive (partial on cancellation)."""
    started = time.perf_counter()
    try:
        if isinstance(client, RawClient):
            await client.stream(api, body, result, started)
            result.completed = True
            return
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
    # The `chat` scenario: each worker is a user holding a conversation of `chat_turns` turns (then the
    # next user), every turn resending the whole history; `prompt` is not used.
    chat: Any = None
    chat_turns: int = 4

    def prompts(self) -> list[tuple[str, int]]:
        """Every prompt the level may send, in order: built before its clock starts, so
        making prompts (tokenizing them) takes no CPU from the server being measured."""
        if self.chat is not None:
            return []
        return [self.prompt(self.first_index + i) for i in range(self.max_requests)]

    def conversations(self) -> list[tuple[str, list[str]]]:
        """`chat`: the system prompt and each user's turns, built before the clock starts too."""
        users = -(-self.max_requests // self.chat_turns)
        system = self.chat.system()
        first = self.first_index // self.chat_turns
        return [(system, [self.chat.user(first + u, t) for t in range(self.chat_turns)]) for u in range(users)]


async def run_level(
    url: str,
    api: Api,
    level: Level,
    model: str = "",
    request_timeout: float = 600,
    transport: httpx.AsyncBaseTransport | None = None,
    client: str = "raw",
) -> dict:
    """Run one level and summarise it; never exceeds `max_requests` nor (much) `time_limit_s`.

    `client`: "raw" (RawClient, the default: little CPU per event) or "httpx".
    `transport` replaces the network (tests drive an in-process app through it; httpx then)."""
    results: list[RequestResult] = []
    next_index = 0
    prompts = level.prompts()

    async def worker(http: httpx.AsyncClient | RawClient, deadline: float) -> None:
        nonlocal next_index
        while next_index < level.max_requests and time.perf_counter() < deadline:
            text, n_prompt = prompts[next_index]
            next_index += 1
            result = RequestResult(prompt_tokens=n_prompt)
            results.append(result)
            try:
                await stream_request(http, api, api.body(text, level.max_new_tokens, model), result)
            except (httpx.HTTPError, RuntimeError, ValueError, OSError) as exc:
                result.error = f"{type(exc).__name__}: {exc}"

    conversations = level.conversations() if level.chat is not None else []
    next_user = 0

    async def user(http: httpx.AsyncClient | RawClient, deadline: float) -> None:
        """A chat user: a conversation's turns one after another, each resending the history."""
        nonlocal next_index, next_user
        while next_user < len(conversations) and time.perf_counter() < deadline:
            system, turns = conversations[next_user]
            next_user += 1
            exchanges: list[tuple[str, str]] = []
            for question in turns:
                if next_index >= level.max_requests or time.perf_counter() >= deadline:
                    return
                next_index += 1
                result = RequestResult(keep_text=True)
                results.append(result)
                text = level.chat.prompt(system, exchanges, question)
                try:
                    await stream_request(http, api, api.body(text, level.max_new_tokens, model), result)
                except (httpx.HTTPError, RuntimeError, ValueError, OSError) as exc:
                    result.error = f"{type(exc).__name__}: {exc}"
                    break
                exchanges.append((question, result.text))

    async def run(http: httpx.AsyncClient | RawClient) -> tuple[float, float]:
        started = time.perf_counter()
        deadline = started + level.time_limit_s
        task = user if level.chat is not None else worker
        tasks = [asyncio.create_task(task(http, deadline)) for _ in range(level.concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=level.time_limit_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return started, time.perf_counter()

    if client == "raw" and transport is None and urlsplit(url).scheme == "http":
        raw = RawClient(url, request_timeout=request_timeout)
        try:
            started, ended = await run(raw)
        finally:
            await raw.aclose()
    else:
        limits = httpx.Limits(max_connections=level.concurrency + 4)
        timeout = httpx.Timeout(request_timeout, connect=10)
        async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, transport=transport) as http:
            started, ended = await run(http)
    return summarize(results, level, ended - started)


def _ms(values: list[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 50) * 1e3,
        "p99": percentile(values, 99) * 1e3,
        "mean": (statistics.fmean(values) * 1e3) if values else float("nan"),
    }


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
        "output_counts": {
            "min": min(counts, default=0),
            "max": max(counts, default=0),
            "mean": statistics.fmean(counts) if counts else 0.0,
            "forced_share": (sum(c == level.max_new_tokens for c in counts) / len(counts)) if counts else 0.0,
        },
        "prompt_tokens_mean": statistics.fmean([r.prompt_tokens for r in results]) if results else 0.0,
        "prompt_cached_share": _cached_share(results),
        "ttft_ms": _ms(ttfts + censored),
        "ttft_censored": len(censored),
        "itl_ms": _ms([g for r in results for g in r.gaps()]),
        "tpot_ms": _ms([t for r in done if (t := r.tpot()) is not None]),
        "e2e_ms": _ms([r.e2e for r in done if r.e2e is not None]),
    }


def _cached_share(results: list[RequestResult]) -> float | None:
    """Share of prompt tokens the server reported taken from its prefix cache (None: it reports none)."""
    told = [r for r in results if r.cached_tokens is not None and r.prompt_tokens]
    if not told:
        return None
    return sum(r.cached_tokens for r in told) / sum(r.prompt_tokens for r in told)


def format_summary(s: dict) -> str:
    return (
        f"c={s['concurrency']:>3} sent={s['requests_sent']:>3} done={s['requests_completed']:>3} "
        f"err={s['errors']} tok/s={s['output_tokens_per_s']:8.1f} req/s={s['requests_per_s']:6.2f} "
        f"ttft p50/p99={s['ttft_ms']['p50']:7.0f}/{s['ttft_ms']['p99']:7.0f}ms "
        f"itl p50/p99={s['itl_ms']['p50']:6.1f}/{s['itl_ms']['p99']:6.1f}ms "
        f"out={s['output_counts']['mean']:.0f}"
    )


# ---------------------------------------------------------------- CLI


def _prompt_source(args: argparse.Namespace) -> Callable[[int], tuple[str, int]]:
    if args.prompt:
        return lambda _i: (args.prompt, 0)
    from prompts import prompt_set  # benchmarks/ is on sys.path when run as a script

    tokenizer = Path(args.tokenizer) if args.tokenizer else _default_tokenizer()
    prompts = prompt_set(args.scenario, tokenizer)
    return lambda i: (prompts.text(i), prompts.tokens(i))


def _default_tokenizer() -> Path:
    from ember.store import resolve_model

    return resolve_model("smollm2").path / "tokenizer.json"


def main() -> None:
    from prompts import SCENARIOS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:3000")
    p.add_argument("--api", choices=sorted(APIS), default="tgi")
    p.add_argument("--model", default="", help="the `model` field of OpenAI requests")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level (at least the concurrency)")
    p.add_argument("--time-limit", type=float, default=300, help="seconds per level before cancelling")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--scenario", choices=SCENARIOS, default="short")
    p.add_argument("--tokenizer", help="tokenizer.json measuring the prompts (default: smollm2's)")
    p.add_argument("--prompt", help="send this one prompt every time instead of a prompt set")
    p.add_argument(
        "--client",
        choices=["raw", "httpx"],
        default="raw",
        help="HTTP client: raw (lean, asyncio protocol; the default) or httpx",
    )
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args()
    chat = None
    if args.scenario == "chat":
        from prompts import chat_script

        chat = chat_script(Path(args.tokenizer) if args.tokenizer else _default_tokenizer())
    source = _prompt_source(args) if chat is None else None
    results, first = [], 0
    for concurrency in args.concurrency:
        size = max(args.requests, concurrency)
        level = Level(concurrency, size, args.time_limit, args.max_new_tokens, source, first, chat=chat)
        first += level.max_requests
        summary = run_async(run_level(args.url, APIS[args.api], level, args.model, client=args.client))
        results.append(summary)
        print(format_summary(summary), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
