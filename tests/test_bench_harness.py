"""The benchmark harness's own logic: percentiles, SSE parsing, token counting, levels, aggregation, report.

No peer servers: the load generator is driven through an in-process ASGI app.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import load  # noqa: E402
import report  # noqa: E402
import run_all  # noqa: E402
import tiny  # noqa: E402
from prompts import (  # noqa: E402
    CHAT_SYSTEM_TOKENS,
    GROUNDED_PASSAGE_TOKENS,
    LONG_TOKENS,
    RAG_DOCUMENT_TOKENS,
    RAG_QUESTION_TOKENS,
    SHORT_TOKENS,
    ChatScript,
    prompt_set,
)


def test_percentile_interpolates_between_ranks():
    assert load.percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert load.percentile([1.0, 2.0, 3.0, 4.0], 0) == 1.0
    assert load.percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert load.percentile(list(range(101)), 99) == pytest.approx(99.0)
    assert math.isnan(load.percentile([], 50))


def test_sse_lines_parse_to_payloads_done_or_nothing():
    assert load.parse_sse_data('data: {"a": 1}') == {"a": 1}
    assert load.parse_sse_data("data:[DONE]") is load.DONE
    assert load.parse_sse_data(": keep-alive") is None
    assert load.parse_sse_data("") is None


def _openai_chunk(text: str) -> dict:
    return {"choices": [{"index": 0, "text": text, "finish_reason": None}]}


def test_openai_events_count_tokens_and_prefer_reported_usage():
    api, result = load.APIS["openai"], load.RequestResult()
    assert not load.consume_event(result, api, _openai_chunk("Hello"), 0.1)
    assert not load.consume_event(result, api, _openai_chunk(""), 0.15)  # no text: no token
    assert not load.consume_event(result, api, _openai_chunk(" world"), 0.3)
    assert not load.consume_event(result, api, {"choices": [], "usage": {"completion_tokens": 3}}, 0.31)
    assert load.consume_event(result, api, load.DONE, 0.32)
    assert result.tokens == 2 and result.reported_tokens == 3 and result.output_tokens == 3
    assert result.ttft == pytest.approx(0.1)
    assert result.gaps() == pytest.approx([0.2])


def test_tgi_final_event_ends_the_stream_with_its_count():
    api, result = load.APIS["tgi"], load.RequestResult()
    assert not load.consume_event(result, api, {"token": {"id": 5, "text": "a"}, "generated_text": None}, 0.1)
    final = {"token": {"id": 2, "text": "", "special": True}, "generated_text": "a", "details": {"generated_tokens": 2}}
    assert load.consume_event(result, api, final, 0.2)
    assert result.output_tokens == 2 and len(result.stamps) == 2


def test_error_event_raises():
    with pytest.raises(RuntimeError, match="overloaded"):
        load.consume_event(load.RequestResult(), load.APIS["tgi"], {"error": "overloaded"}, 0.0)


def test_summary_counts_cancelled_requests_and_censors_their_ttft():
    done = load.RequestResult(stamps=[0.1, 0.2, 0.3, 0.4], tokens=4, completed=True)
    waiting = load.RequestResult(cancelled_at=5.0)  # never saw a token
    level = load.Level(2, 2, 5.0, 4, lambda i: ("", 0))
    s = load.summarize([done, waiting], level, elapsed=5.0)
    assert s["requests_completed"] == 1 and s["requests_cancelled"] == 1 and s["ttft_censored"] == 1
    assert s["ttft_ms"]["p99"] == pytest.approx(load.percentile([0.1, 5.0], 99) * 1e3)
    assert s["output_tokens_per_s"] == pytest.approx(4 / 5.0)
    assert s["tpot_ms"]["p50"] == pytest.approx(100.0)
    assert s["output_counts"]["forced_share"] == 1.0


def _streaming_app(tokens: int) -> tuple[Starlette, list[dict]]:
    """An OpenAI-style completions endpoint streaming `max_tokens` one-token chunks."""
    bodies: list[dict] = []

    async def completions(request: Request) -> Response:
        body = await request.json()
        bodies.append(body)
        events = [f"data: {json.dumps(_openai_chunk('x'))}\n\n" for _ in range(body["max_tokens"])]
        usage = {"choices": [], "usage": {"completion_tokens": body["max_tokens"]}}
        events += [f"data: {json.dumps(usage)}\n\n", "data: [DONE]\n\n"]
        return Response("".join(events), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])]), bodies


def test_level_sends_exactly_its_requests_with_forced_lengths():
    app, bodies = _streaming_app(tokens=5)
    level = load.Level(
        concurrency=3,
        max_requests=7,
        time_limit_s=60,
        max_new_tokens=5,
        prompt=lambda i: (f"prompt {i}", 2),
        first_index=10,
    )
    s = asyncio.run(
        load.run_level("http://bench", load.APIS["openai"], level, model="m", transport=httpx.ASGITransport(app=app))
    )
    assert s["requests_sent"] == 7 and s["requests_completed"] == 7 and s["errors"] == 0
    assert s["output_tokens"] == 35
    assert sorted(b["prompt"] for b in bodies) == sorted(f"prompt {i}" for i in range(10, 17))
    assert all(b["ignore_eos"] and b["min_tokens"] == 5 and b["stream"] and b["model"] == "m" for b in bodies)


def test_chat_users_resend_the_whole_conversation_each_turn(tmp_path):
    """Each worker is a user: its turns go one after another, each prompt the last one plus the server's
    answer and a new question; the server's usage figures (prompt, cached) are recorded."""
    bodies: list[dict] = []

    async def completions(request: Request) -> Response:
        body = await request.json()
        bodies.append(body)
        answer = f" answer{len(bodies)}"
        usage = {"completion_tokens": 1, "prompt_tokens": 100, "prompt_tokens_details": {"cached_tokens": 60}}
        events = [
            f"data: {json.dumps(_openai_chunk(answer))}\n\n",
            f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n",
        ]
        return Response("".join(events + ["data: [DONE]\n\n"]), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])
    tiny.train_tokenizer(tmp_path)
    chat = ChatScript(prompt_set("chat", tmp_path / "tokenizer.json"))
    level = load.Level(2, 8, 60, 1, lambda i: ("", 0), chat=chat, chat_turns=4)
    s = asyncio.run(load.run_level("http://bench", load.APIS["openai"], level, transport=httpx.ASGITransport(app=app)))
    assert s["requests_completed"] == 8 and s["prompt_cached_share"] == pytest.approx(0.6)
    system = chat.system()
    assert all(b["prompt"].startswith(f"System: {system}") for b in bodies)
    by_user: dict[str, list[str]] = {}
    for b in bodies:  # a user's prompts each extend the one before, with the answer it got
        first_question = b["prompt"].split("User: ")[1].split("\n\n")[0]
        by_user.setdefault(first_question, []).append(b["prompt"])
    assert sorted(len(p) for p in by_user.values()) == [4, 4]
    for prompts in by_user.values():
        for before, after in zip(prompts, prompts[1:]):
            assert after.startswith(before + " answer")


def test_rag_prompts_share_one_of_four_documents(tmp_path):
    tiny.train_tokenizer(tmp_path)
    rag = prompt_set("rag", tmp_path / "tokenizer.json")
    documents = [rag.text(i).split("\n\nQuestion")[0] for i in range(8)]
    assert len(set(documents)) == 4 and documents[0] == documents[4] and rag.text(0) != rag.text(4)
    assert 0 <= rag.tokens(0) - RAG_DOCUMENT_TOKENS - RAG_QUESTION_TOKENS <= 40  # with its framing words
    chat = ChatScript(prompt_set("chat", tmp_path / "tokenizer.json"))
    assert abs(len(rag.encode(chat.system())) - CHAT_SYSTEM_TOKENS) <= 2 and chat.user(0, 1) != chat.user(1, 1)


def test_level_records_http_errors():
    app = Starlette(routes=[Route("/v1/completions", lambda r: Response("busy", status_code=429), methods=["POST"])])
    level = load.Level(1, 2, 60, 4, lambda i: ("p", 1))
    s = asyncio.run(load.run_level("http://bench", load.APIS["openai"], level, transport=httpx.ASGITransport(app=app)))
    assert s["errors"] == 2 and "429" in s["first_error"] and s["output_tokens"] == 0


def _sse_body(tokens: int) -> bytes:
    events = [f"data: {json.dumps(_openai_chunk('x'))}\n\n" for _ in range(tokens)]
    events += [
        ": keep-alive\r\n\r\n",
        f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': tokens}})}\n\n",
        "data: [DONE]\n\n",
    ]
    return "".join(events).encode()


async def _raw_server(respond) -> tuple[asyncio.AbstractServer, str, list[int]]:
    """A plain HTTP/1.1 server whose answers `respond(request_number)` writes as byte pieces, with
    pauses between them; keep-alive. Returns the server, its URL and the connection count."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(
                    next(
                        line.split(b":")[1]
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    )
                )
                body = json.loads(await reader.readexactly(length))
                for piece in respond(body):
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.001)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}", connections


def _chunked(body: bytes, sizes: list[int]) -> list[bytes]:
    """`body` in HTTP chunks of the given sizes, then cut into pieces that straddle every boundary."""
    out, pos, i = b"", 0, 0
    while pos < len(body):
        n = sizes[i % len(sizes)]
        out += f"{n if pos + n <= len(body) else len(body) - pos:x}\r\n".encode() + body[pos : pos + n] + b"\r\n"
        pos, i = pos + n, i + 1
    out += b"0\r\n\r\n"
    return [out[j : j + 7] for j in range(0, len(out), 7)]


def test_raw_client_reads_chunked_sse_split_anywhere_and_reuses_connections():
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"

    async def scenario():
        server, url, connections = await _raw_server(
            lambda body: [head[:10], head[10:], *_chunked(_sse_body(body["max_tokens"]), [5, 64, 1, 300])]
        )
        async with server:
            level = load.Level(
                concurrency=2, max_requests=6, time_limit_s=60, max_new_tokens=5, prompt=lambda i: (f"prompt {i}", 2)
            )
            return await load.run_level(url, load.APIS["openai"], level, model="m"), connections

    s, connections = asyncio.run(scenario())
    assert s["errors"] == 0, s["first_error"]
    assert s["requests_completed"] == 6 and s["output_tokens"] == 30
    assert s["output_counts"]["forced_share"] == 1.0
    assert len(connections) == 2  # one keep-alive connection per worker


def test_raw_client_reads_sized_bodies_and_records_http_errors():
    def respond(body):
        if body["prompt"] == "p 1":
            text = b"busy"
            return [b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 4\r\n\r\n" + text]
        sse = _sse_body(body["max_tokens"])
        return [b"HTTP/1.1 200 OK\r\ncontent-length: " + str(len(sse)).encode() + b"\r\n\r\n", sse[:33], sse[33:]]

    async def scenario():
        server, url, _ = await _raw_server(respond)
        async with server:
            level = load.Level(1, 3, 60, 4, lambda i: (f"p {i}", 1))
            return await load.run_level(url, load.APIS["openai"], level)

    s = asyncio.run(scenario())
    assert s["errors"] == 1 and "HTTP 429: busy" in s["first_error"]
    assert s["requests_completed"] == 2 and s["output_tokens"] == 8


def test_raw_client_counts_a_refused_connection_as_an_error():
    async def scenario():
        server, url, _ = await _raw_server(lambda body: [])
        server.close()
        await server.wait_closed()
        return await load.run_level(url, load.APIS["openai"], load.Level(1, 1, 60, 4, lambda i: ("p", 1)))

    s = asyncio.run(scenario())
    assert s["errors"] == 1 and s["output_tokens"] == 0


def test_prompt_sets_are_fixed_unique_and_sized(tmp_path):
    tiny.train_tokenizer(tmp_path)
    short, long_, mix = (prompt_set(s, tmp_path / "tokenizer.json") for s in ("short", "long", "mix"))
    assert short.text(3) == prompt_set("short", tmp_path / "tokenizer.json").text(3)
    assert short.text(3) != short.text(4)
    assert abs(short.tokens(0) - SHORT_TOKENS) <= 2 and abs(long_.tokens(0) - LONG_TOKENS) <= 2
    assert [mix.target_tokens(i) for i in range(4)] == [SHORT_TOKENS] * 3 + [LONG_TOKENS]


def test_grounded_prompts_hold_their_passage_sized_and_unique(tmp_path):
    """A note to copy at even indices, a function to rename at odd ones: each prompt holds its ~300-token
    passage verbatim, ends where the copy starts, and differs from every other one from its first line."""
    tiny.train_tokenizer(tmp_path)
    grounded = prompt_set("grounded", tmp_path / "tokenizer.json")
    texts = [grounded.text(i) for i in range(8)]
    assert texts[5] == prompt_set("grounded", tmp_path / "tokenizer.json").text(5)
    for i, text in enumerate(texts):
        passage = grounded.passage(i)
        assert passage in text
        # cut between whole sentences or statements: one less at most (~70 of this tiny tokenizer's tokens)
        assert GROUNDED_PASSAGE_TOKENS - 80 <= len(grounded.encode(passage)) <= GROUNDED_PASSAGE_TOKENS
        assert 0 < grounded.tokens(i) - len(grounded.encode(passage)) <= 200  # the instruction around it
        if i % 2 == 0:
            assert passage.startswith(f"Note {i}:\n1. The ") and text.endswith(f"\nNote {i}:\n1.")
        else:
            name = passage.split("(")[0].removeprefix("def ")
            renamed = text.rsplit("def ", 1)[1].removesuffix("(")
            assert name.endswith(f"_{i}") and renamed.endswith(f"_{i}") and renamed != name
            assert f"`{name}` to `{renamed}`" in text.splitlines()[0]
            namespace: dict = {}
            exec(passage, namespace)  # a valid function of integers, its return value assigned in it
            assert isinstance(namespace[name](3, 5), int)
    for i, a in enumerate(texts):  # no shared prefix beyond the instruction's first words
        assert all("\n" not in os.path.commonprefix([a, b]) for b in texts[i + 1 :])


def _start_script_call(tmp_path: Path, peer_name: str, environ: dict[str, str]):
    """Run the peer's start script (a copy beside a stand-in `.venv/bin/ember-launcher` that prints the
    flags and environment it was given) and parse them as the launcher does."""
    from peers import lifecycle

    from ember.launcher.args import parse_args

    root = tmp_path / "repo"
    shutil.copytree(ROOT / "benchmarks" / "peers", root / "benchmarks" / "peers")
    launcher = root / ".venv" / "bin" / "ember-launcher"
    launcher.parent.mkdir(parents=True)
    launcher.write_text(
        f"#!{sys.executable}\nimport json, os, sys\nprint(json.dumps([sys.argv[1:], dict(os.environ)]))\n"
    )
    launcher.chmod(0o755)
    script = root / "benchmarks" / "peers" / lifecycle.PEERS[peer_name].start_script
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "EMBER_BENCH_DIR": str(tmp_path / "bench"), **environ}
    out = subprocess.run([str(script), "4321"], env=env, capture_output=True, text=True, timeout=60, check=True)
    argv, seen = json.loads(out.stdout)
    return parse_args(argv, seen)


def test_speculation_peers_start_ember_default_with_speculate(tmp_path):
    """ember-nospec and ember-speculate are ember-default plus `--speculate 0` and `--speculate 4` (the
    launcher's SPECULATE), as ember-nocache is plus `--prefix-caching false`; ember-default itself drops a
    SPECULATE or PREFIX_CACHING from the caller's environment, as `make run` would run without them."""
    from peers import lifecycle

    from ember.launcher.args import parse_args

    default = parse_args([], {})
    for name, want in [
        ("ember-nospec", {"speculate": 0, "prefix_caching": default.prefix_caching}),
        ("ember-speculate", {"speculate": 4, "prefix_caching": default.prefix_caching}),
        ("ember-nocache", {"speculate": default.speculate, "prefix_caching": False}),
        ("ember-default", {"speculate": default.speculate, "prefix_caching": default.prefix_caching}),
    ]:
        peer = lifecycle.PEERS[name]
        assert peer.name == name and os.access(lifecycle.HERE / peer.start_script, os.X_OK)
        args = _start_script_call(tmp_path / name, name, {"SPECULATE": "2", "PREFIX_CACHING": "false"})
        assert {key: getattr(args, key) for key in want} == want, name
        assert args.port == 4321 and args.hostname == "127.0.0.1"
    assert "--speculate 4" in lifecycle.PEERS["ember-speculate"].note


def test_vllm_peers_differ_only_in_dtype(tmp_path):
    """vllm-cpu-fp32 is start_vllm.sh with --dtype float32; vllm-cpu keeps bf16."""
    from peers import lifecycle

    bench = tmp_path / "bench"
    python = bench / "vllm-cpu" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    python.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "EMBER_BENCH_DIR": str(bench)}
    env["EMBER_BENCH_MODEL_DIR"] = str(tmp_path / "model")
    argvs = {}
    for name in ("vllm-cpu", "vllm-cpu-fp32"):
        script = lifecycle.HERE / lifecycle.PEERS[name].start_script
        out = subprocess.run([str(script), "4321"], env=env, capture_output=True, text=True, timeout=60, check=True)
        argv = json.loads(out.stdout)
        argvs[name] = argv
        assert argv[argv.index("--model") + 1] == env["EMBER_BENCH_MODEL_DIR"] and "4321" in argv
    dtypes = {name: argv[argv.index("--dtype") + 1] for name, argv in argvs.items()}
    assert dtypes == {"vllm-cpu": "bfloat16", "vllm-cpu-fp32": "float32"}
    assert [a for a in argvs["vllm-cpu"] if a != "bfloat16"] == [a for a in argvs["vllm-cpu-fp32"] if a != "float32"]


def _level(scenario: str, repeat: int, tps: float) -> dict:
    ms = {"p50": 10.0, "p99": 20.0, "mean": 12.0}
    return {
        "scenario": scenario,
        "concurrency": 4,
        "repeat": repeat,
        "errors": 0,
        "requests_cancelled": 0,
        "output_tokens_per_s": tps,
        "requests_per_s": 1.0,
        "ttft_ms": ms,
        "itl_ms": ms,
        "tpot_ms": ms,
        "e2e_ms": ms,
        "output_counts": {"mean": 16.0, "forced_share": 1.0},
    }


def test_aggregate_takes_medians_and_spread_over_repeats():
    rows = run_all.aggregate([_level("short", r, tps) for r, tps in enumerate([90.0, 100.0, 120.0])])
    (row,) = rows
    assert row["repeats"] == 3
    assert row["output_tokens_per_s"] == {"median": 100.0, "min": 90.0, "max": 120.0, "spread_pct": 30.0}


def test_report_gives_ratios_vs_ember_and_failures():
    summary = lambda tps: run_all.aggregate([_level("short", 0, tps)])  # noqa: E731
    results = {
        "command": "run_all.py",
        "started": "t0",
        "config": {
            "max_new_tokens": 16,
            "concurrency": [4],
            "repeats": 1,
            "min_requests": 8,
            "rounds": 2,
            "time_limit": 60,
            "scenarios": ["short"],
        },
        "machine": {"cpu_model": "CPU", "flags": ["avx2", "avx512_bf16"], "loadavg_at_start": [1.0]},
        "model": {"params": 100, "dir": "d", "gguf": "g"},
        "servers": {
            "ember": {"status": "ok", "error": None, "summary": summary(300.0)},
            "vllm-cpu": {"status": "ok", "error": None, "summary": summary(100.0)},
            "llama-cpp": {"status": "install_failed", "error": "no compiler", "summary": []},
        },
        "roofline": {"dtypes": {}},
    }
    text = report.render(results, [])
    assert "| 4 | vllm-cpu | 100.0 [100.0–100.0] | 3.00× |" in text
    assert "install_failed" in text and "no compiler" in text
    assert "avx512_bf16" in text


def test_traffic_targets_compare_each_ember_setting_with_its_peer():
    def summary(tps: float, ttft: float) -> list[dict]:
        levels = []
        for scenario in ("chat", "rag"):
            level = _level(scenario, 0, tps)
            level["concurrency"] = 16 if scenario == "chat" else 4
            level["ttft_ms"] = {"p50": ttft, "p99": ttft, "mean": ttft}
            levels.append(level)
        return run_all.aggregate(levels)

    results = {
        "config": {"scenarios": ["chat", "rag"]},
        "servers": {
            "ember-default": {"status": "ok", "summary": summary(300.0, 200.0)},
            "vllm-cpu": {"status": "ok", "summary": summary(250.0, 500.0)},
        },
    }
    lines = report.traffic_section(results)
    text = "\n".join(lines)
    assert "chat, c=16: ttft_p50_ms ≤ 0.5 × vllm-cpu | 200.0 vs 500.0 (0.40×) | yes" in text
    assert "chat, c=16: output_tokens_per_s ≥ 1.5 × vllm-cpu | 300.0 vs 250.0 (1.20×) | no" in text
    assert "rag, c=4: ttft_p50_ms ≤ 1.0 × vllm-cpu" in text and "mix, c=" not in text  # only what ran
    assert report.traffic_section({**results, "config": {"scenarios": ["long"]}}) == []
    # vLLM in float32 beside its default: the same targets against each
    results["servers"]["vllm-cpu-fp32"] = {"status": "ok", "summary": summary(100.0, 300.0)}
    text = "\n".join(report.traffic_section(results))
    assert "chat, c=16: output_tokens_per_s ≥ 1.5 × vllm-cpu-fp32 | 300.0 vs 100.0 (3.00×) | yes" in text
    assert "chat, c=16: output_tokens_per_s ≥ 1.5 × vllm-cpu | 300.0 vs 250.0 (1.20×) | no" in text


def test_a_peer_that_cannot_start_is_an_error_with_its_log(tmp_path):
    from peers import lifecycle

    peer = lifecycle.PEERS["llama-cpp"]
    server = lifecycle.RunningServer(
        peer, tmp_path / "server.log", env={"EMBER_BENCH_DIR": str(tmp_path / "empty"), "EMBER_BENCH_GGUF": "x.gguf"}
    )
    with pytest.raises(lifecycle.PeerError, match="exited with 127") as info:
        with server:
            pass
    assert "No such file or directory" in str(info.value)


def test_decode_roofline_places_each_setting_under_its_own_dtype():
    summary = run_all.aggregate([_level("short", 0, 100.0)])
    results = {
        "command": "run_all.py",
        "started": "t0",
        "config": {
            "max_new_tokens": 16,
            "concurrency": [4],
            "repeats": 1,
            "min_requests": 8,
            "rounds": 2,
            "time_limit": 60,
            "scenarios": ["short"],
        },
        "machine": {"cpu_model": "CPU", "flags": [], "loadavg_at_start": [1.0]},
        "model": {"params": 100_000_000, "dir": "d", "gguf": "g"},
        "servers": {
            "ember-w4a8": {
                "status": "ok",
                "error": None,
                "summary": summary,
                "decode_probe": {"tokens_per_s": 1000.0, "batch": 32, "dtype": "int8"},
            },
            "ember": {
                "status": "ok",
                "error": None,
                "summary": summary,
                "decode_probe": {"error": "RuntimeError: no", "dtype": "bfloat16"},
            },
        },
        "roofline": {
            "dtypes": {
                "int8": {"peak_gflops": 1000.0, "shapes_gflops": {"s": 1000.0}},
                "bfloat16": {"peak_gflops": 500.0, "shapes_gflops": {"s": 500.0}},
            }
        },
    }
    roofs = run_all.decode_roofline(results, 100_000_000)
    assert list(roofs) == ["ember-w4a8"]  # a failed probe places nothing
    roof = roofs["ember-w4a8"]
    assert roof["achieved_gflops"] == pytest.approx(200.0)
    assert roof["percent_of_peak"] == pytest.approx(20.0) and roof["percent_of_bf16_peak"] == pytest.approx(40.0)
    results["decode_roofline"] = roofs
    text = report.render(results, [])
    assert "| ember-w4a8 | batched decode (batch 32) ≥ 50 % of the matmul roofline |" in text
    assert "| no |" in text


def test_router_overhead_pairs_each_repeats_runs():
    import router_overhead

    def side(itl: float) -> dict:
        return {
            "itl_ms": {"p50": itl, "p99": itl * 2},
            "tpot_ms": {"mean": itl},
            "ttft_ms": {"p50": 1.0, "p99": 2.0},
            "output_tokens_per_s": 1.0,
            "errors": 0,
            "decode_step": {"call_mean_ms": itl, "prefill_calls": 1},
        }

    # The machine drifts between repeats (20 -> 30 ms); within each repeat HTTP is 1 ms behind gRPC.
    runs = [
        {"http": side(21.0), "grpc": side(20.0)},
        {"http": side(31.0), "grpc": side(30.0)},
        {"http": side(26.0), "grpc": side(25.5)},
    ]
    out = router_overhead.overhead(runs)
    paired = out["paired_itl_p50"]
    assert paired["median_ms"] == 1.0 and paired["min_ms"] == 0.5 and paired["max_ms"] == 1.0
    assert paired["share_of_step"] == pytest.approx(1.0 / 25.5)
    text = router_overhead.markdown(
        {
            "model_id": "m",
            "max_new_tokens": 8,
            "scenario": "short",
            "prompt_tokens": 64,
            "repeats": 3,
            "machine": {"cpus": 2, "loadavg_start": 0.0, "loadavg_end": 0.0},
            "levels": {"32": {"summary": out}},
            "command": "x",
        }
    )
    assert "| +1.00 [+0.5 – +1.0] | 3.9 % |" in text


def test_router_overhead_counts_each_process_cpu_per_shard_call():
    import os

    import router_overhead

    # /proc's reading of a process (router, shard) agrees with getrusage's of this one (the client).
    assert abs(router_overhead.cpu_seconds(os.getpid()) - router_overhead.cpu_seconds()) < 0.1

    def side(router_s: float, calls: int, prefills: int) -> dict:
        return {
            "itl_ms": {"p50": 30.0, "p99": 60.0},
            "tpot_ms": {"mean": 30.0},
            "ttft_ms": {"p50": 1.0, "p99": 2.0},
            "output_tokens_per_s": 1.0,
            "errors": 0,
            "decode_step": {"call_mean_ms": 30.0, "calls": calls, "prefill_calls": prefills},
            "cpu_s": {"router": router_s, "shard": 6.0, "client": 0.2},
        }

    # 90 Decode + 10 Prefill calls: 0.2 s of router CPU is 2 ms per call, a 15th of a 30 ms step.
    runs = [{"http": side(0.2, 90, 10), "grpc": side(0.0, 98, 2)} for _ in range(3)]
    cpu = router_overhead.overhead(runs)["cpu_ms_per_call"]
    assert cpu["http"]["router"] == pytest.approx(2.0) and cpu["grpc"]["shard"] == pytest.approx(60.0)
    assert cpu["router_share_of_step"] == pytest.approx(2.0 / 30.0)
    text = router_overhead.markdown(
        {
            "model_id": "m",
            "max_new_tokens": 8,
            "scenario": "short",
            "prompt_tokens": 64,
            "repeats": 3,
            "machine": {"cpus": 2, "loadavg_start": 0.0, "loadavg_end": 0.0},
            "levels": {"32": {"summary": router_overhead.overhead(runs)}},
            "command": "x",
        }
    )
    assert "| 32 | 2.00 | 6.7 % | 60.0 / 60.0 | 2.00 / 2.00 |" in text


def test_step_profile_splits_a_step_into_parts_inside_it(tiny_llama_dir, tmp_path):
    import argparse

    import step_profile

    args = argparse.Namespace(quantize=None, matmul_dtype=None, batch=2, steps=3, repeats=2)
    runs = step_profile.run(args, tiny_llama_dir, None)
    assert len(runs) == 2
    for r in runs:
        assert r["step_ms"] > 0 and r["layers_ms"] > 0 and r["head_ms"] > 0 and r["sampler_ms"] > 0
        # the clocked parts lie inside the step: what is left for the runner's own work is not negative
        assert r["layers_ms"] + r["head_ms"] + r["sampler_ms"] < r["step_ms"] and r["runner_other_ms"] > 0
    summary = step_profile.summarize(runs)
    assert summary["spread_step_ms"][0] <= summary["step_ms"] <= summary["spread_step_ms"][1]
    fake = {**summary, "phases_ms": {name: 1.0 for name in step_profile.PHASES}}
    text = step_profile.markdown(
        {
            "summary": fake,
            "batch": 2,
            "model_id": "tiny",
            "quantize": None,
            "matmul_dtype": None,
            "prompt_tokens": 64,
            "steps": 3,
            "repeats": 2,
            "machine": {"cpu_model": "cpu", "logical_cpus": 2, "loadavg_at_start": [0.0]},
            "command": "x",
        }
    )
    assert "| down projection | 1.00 | 12 % |" in text and "decoder layers" in text


def test_report_divides_by_the_ember_setting_that_ran_and_names_the_gpu():
    """A GPU run serves ember-bf16 alone (the quantized settings have CPU kernels only): the ratios divide
    by it, and the machine section names the GPU and the model's note."""
    summary = lambda tps: run_all.aggregate([_level("short", 0, tps)])  # noqa: E731
    results = {
        "command": "run_all.py",
        "started": "t0",
        "config": {
            "max_new_tokens": 16,
            "concurrency": [4],
            "repeats": 1,
            "min_requests": 8,
            "rounds": 2,
            "time_limit": 60,
            "scenarios": ["short"],
        },
        "machine": {"cpu_model": "CPU", "flags": [], "loadavg_at_start": [1.0], "gpu": "Some GPU", "gpu_count": 1},
        "model": {"params": 100, "dir": "d", "gguf": None, "note": "random weights"},
        "servers": {
            "ember-bf16": {"status": "ok", "error": None, "summary": summary(400.0)},
            "naive": {"status": "ok", "error": None, "summary": summary(50.0)},
        },
        "roofline": {"dtypes": {}},
    }
    text = report.render(results, [])
    assert "| ember-bf16 ÷ server |" in text
    assert "| 4 | naive | 50.0 [50.0–50.0] | 8.00× |" in text
    assert "GPU: Some GPU × 1" in text and "GGUF `none`. random weights." in text


def test_random_model_keeps_the_shapes_and_tokenizer_and_loads(tiny_llama_dir, tmp_path):
    import random_model
    from safetensors import safe_open

    from ember.shard.runner import Sequence, load_runner

    out = random_model.build(tiny_llama_dir, tmp_path / "random", seed=1)
    assert (out / "tokenizer.json").read_bytes() == (tiny_llama_dir / "tokenizer.json").read_bytes()

    def tensors(d: Path) -> dict:
        with safe_open(str(next(d.glob("*.safetensors"))), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    real, fake = tensors(tiny_llama_dir), tensors(out)
    assert {k: v.shape for k, v in real.items()} == {k: v.shape for k, v in fake.items()}
    name = next(k for k in real if k.endswith("q_proj.weight"))
    assert not real[name].float().equal(fake[name].float())
    runner = load_runner(out, dtype="float32", device="cpu")
    assert runner.step([Sequence(0, [3, 4, 5])]).logits.isfinite().all()


def test_naive_server_streams_and_a_failed_generate_still_ends_its_stream(tiny_llama_dir):
    sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))
    import torch
    from naive_server import NaiveEngine

    engine = NaiveEngine(str(tiny_llama_dir), torch.float32, "tiny", "cpu")

    async def collect(body: dict) -> list[bytes]:
        return [chunk async for chunk in engine.stream(body)]

    body = {
        "prompt": "hello world",
        "max_tokens": 5,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = asyncio.run(asyncio.wait_for(collect(body), 120))
    assert chunks[-1] == b"data: [DONE]\n\n"
    usage = json.loads(chunks[-2][len(b"data: ") :])["usage"]
    assert usage["completion_tokens"] == 5

    def broken(**kwargs):
        raise RuntimeError("generate failed")

    engine.model.generate = broken
    chunks = asyncio.run(asyncio.wait_for(collect(body), 60))  # before the fix: waited forever
    event = json.loads(chunks[-1][len(b"data: ") :])
    with pytest.raises(RuntimeError, match="generate failed"):  # the load generator counts it an error
        load.consume_event(load.RequestResult(), load.APIS["openai"], event, 0.0)


@pytest.mark.parametrize("chunking", ["1", "0"])
def test_grpc_load_batches_with_the_routers_rule_for_the_shard(tiny_llama_dir, tmp_path, monkeypatch, chunking):
    """The gRPC side of router_overhead.py schedules as the router would: newcomers join the running
    batch at every step in a Prefill carrying it (PREFILL_CHUNKING=0: TGI's separate prefills)."""
    import grpc_load
    from servers import shard_process

    monkeypatch.setenv("PREFILL_CHUNKING", chunking)

    async def scenario(uds: str):
        shards = await grpc_load.Shards.connect(uds)
        calls: list[bool] = []
        call = shards.call

        async def recorded(method, request):
            if method == "Prefill":
                calls.append(request.HasField("cached_batch"))
            return await call(method, request)

        shards.call = recorded
        batcher = grpc_load.MiniBatcher(shards, await grpc_load.Policy.of_shard(shards))
        batcher.start()
        results = [load.RequestResult() for _ in range(4)]
        first = [
            asyncio.ensure_future(
                grpc_load.stream_request(
                    batcher, grpc_load.make_request(900 + i, [1, 5 + i, 9, 13], "", 12), results[i]
                )
            )
            for i in range(2)
        ]
        async with asyncio.timeout(30):
            while not batcher.decode_calls:  # the first two are decoding
                await asyncio.sleep(0.005)
        late = [
            asyncio.ensure_future(
                grpc_load.stream_request(batcher, grpc_load.make_request(900 + i, [1, 7, 11, 5 + i], "", 4), results[i])
            )
            for i in (2, 3)
        ]
        async with asyncio.timeout(60):
            await asyncio.gather(*first, *late)
        await batcher.stop()
        await shards.close()
        return calls, results

    with shard_process(tiny_llama_dir, str(tmp_path / "s")) as uds:
        calls, results = load.run_async(scenario(uds))
    assert [r.reported_tokens for r in results] == [12, 12, 4, 4] and all(r.completed for r in results)
    assert calls[0] is False and len(calls) >= 2
    assert any(calls) == (chunking == "1")  # the late ones joined the running batch's forward
