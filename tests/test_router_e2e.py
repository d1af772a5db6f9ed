"""The router end to end: `ember-shard serve` + `ember-router` on the tiny model, over HTTP."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest
from servers import router_process, shard_process

from ember.router.metrics import without_model

LONG = {"inputs": "Hello world", "parameters": {"max_new_tokens": 400}}


@pytest.fixture(scope="module")
def stack(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("router-e2e")
    log = tmp / "router.log"
    with shard_process(tiny_llama_dir, str(tmp / "s")) as socket:
        with router_process(
            socket, tiny_llama_dir, "--max-concurrent-requests", "10", "--payload-limit", "20000", capture=log
        ) as url:
            yield url, log


@pytest.fixture
def url(stack):
    return stack[0]


def post(url: str, path: str, body, **kw) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60, **kw)


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]


async def aiter_events(response: httpx.Response):
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            yield json.loads(line[5:])


def metric(url: str, name: str) -> float:
    text = without_model(httpx.get(url + "/metrics", timeout=10).text)
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_generate_details_and_headers(url):
    body = {
        "inputs": "Hello world",
        "parameters": {"max_new_tokens": 6, "decoder_input_details": True, "top_n_tokens": 2, "return_full_text": True},
    }
    r = post(url, "/generate", body, headers={"x-request-id": "req-42"})
    assert r.status_code == 200, r.text
    out = r.json()
    d = out["details"]
    assert d["finish_reason"] == "length" and d["generated_tokens"] == 6 == len(d["tokens"])
    assert isinstance(d["seed"], int)
    assert out["generated_text"] == "Hello world" + "".join(t["text"] for t in d["tokens"])
    assert [p["text"] for p in d["prefill"]] == ["Hello", " world"] and d["prefill"][0]["logprob"] is None
    assert len(d["top_tokens"]) == 6 and all(len(t) == 2 for t in d["top_tokens"])
    assert r.headers["x-request-id"] == "req-42"
    assert r.headers["x-prompt-tokens"] == "2" and r.headers["x-generated-tokens"] == "6"
    for h in (
        "x-compute-type",
        "x-compute-time",
        "x-total-time",
        "x-validation-time",
        "x-queue-time",
        "x-inference-time",
        "x-time-per-token",
    ):
        assert h in r.headers


def test_greedy_is_deterministic_and_seed_random(url):
    body = {"inputs": "The capital", "parameters": {"max_new_tokens": 5}}
    a, b = post(url, "/generate", body).json(), post(url, "/generate", body).json()
    assert a["generated_text"] == b["generated_text"]
    assert a["details"]["seed"] != b["details"]["seed"]
    # No `parameters` at all: TGI's defaults (sampling, no details).
    assert "details" not in post(url, "/generate", {"inputs": "The capital"}).json()


def test_generate_stream_events(url):
    r = post(url, "/generate_stream", {"inputs": "Hello world", "parameters": {"max_new_tokens": 5}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-accel-buffering"] == "no"
    assert "[DONE]" not in r.text
    events = sse_events(r.text)
    assert [e["index"] for e in events] == [1, 2, 3, 4, 5]
    assert all(e["generated_text"] is None for e in events[:-1])
    last = events[-1]
    assert last["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert last["details"]["generated_tokens"] == 5 and last["details"]["input_length"] == 2
    # The same text as the non-streaming route.
    same = post(url, "/generate", {"inputs": "Hello world", "parameters": {"max_new_tokens": 5}}).json()
    assert same["generated_text"] == last["generated_text"]


def test_compat_route_and_invocations(url):
    body = {"inputs": "Hello world", "parameters": {"max_new_tokens": 3}}
    listed = post(url, "/", body).json()
    assert isinstance(listed, list) and len(listed) == 1 and listed[0]["details"]["generated_tokens"] == 3
    streamed = post(url, "/", {**body, "stream": True})
    assert sse_events(streamed.text)[-1]["generated_text"] == listed[0]["generated_text"]
    sm = post(url, "/invocations", body).json()
    assert sm[0]["generated_text"] == listed[0]["generated_text"]
    chat = post(url, "/invocations", {"messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code in (200, 422) and chat.json()
    assert post(url, "/invocations", {"nothing": 1}).status_code == 422


def test_best_of_returns_other_sequences(url):
    r = post(
        url, "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 4, "best_of": 2, "do_sample": True}}
    )
    assert r.status_code == 200, r.text
    seqs = r.json()["details"]["best_of_sequences"]
    assert len(seqs) == 1 and seqs[0]["generated_tokens"] == 4 and isinstance(seqs[0]["seed"], int)


@pytest.mark.parametrize(
    "params,fragment",
    [
        ({"temperature": 0}, "`temperature` must be strictly positive"),
        ({"top_k": 0}, "`top_k` must be strictly positive"),
        ({"max_new_tokens": 600}, "`inputs` tokens + `max_new_tokens` must be <= 512"),
        ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
        ({"grammar": {"type": "json", "value": "{not json"}}, "grammar is not valid"),
    ],
)
def test_validation_errors_are_422_then_served(url, params, fragment):
    r = post(url, "/generate", {"inputs": "Hello", "parameters": params})
    assert r.status_code == 422
    assert r.json() == {"error": f"Input validation error: {r.json()['error'][24:]}", "error_type": "validation"}
    assert fragment in r.json()["error"]
    ok = post(url, "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
    assert ok.status_code == 200


def test_bad_bodies(url):
    r = httpx.post(url + "/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    assert post(url, "/generate", {"inputs": ""}).json()["error"] == "Input validation error: `inputs` cannot be empty"
    big = post(url, "/generate", {"inputs": "x" * 30000})
    assert big.status_code == 413
    # Errors known before streaming are real statuses, not 200 + an error event.
    s = post(url, "/generate_stream", {"inputs": "Hello", "parameters": {"top_k": 0}})
    assert s.status_code == 422 and s.json()["error_type"] == "validation"
    assert post(url, "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_service_routes(url):
    info = httpx.get(url + "/info").json()
    assert info["model_id"] == "tiny" and info["router"] == "ember-router"
    assert info["max_total_tokens"] == 512 and info["max_input_tokens"] == 511
    assert info["max_concurrent_requests"] == 10 and info["device_type"] == "cpu" and info["dtype"]
    # The tiny model is float32 safetensors: the automatic precision keeps it, and says why.
    assert info["precision"] == "float32" and "float32" in info["precision_reason"]
    assert info["supports_embeddings"] is True
    for path in ("/health", "/ping"):
        assert httpx.get(url + path).status_code == 200
    tokens = post(url, "/tokenize", {"inputs": "Hello café"}).json()
    assert [(t["text"], t["start"], t["stop"]) for t in tokens] == [("Hello", 0, 5), (" café", 5, 10)]
    spec = httpx.get(url + "/openapi.json").json()
    assert {"/generate", "/generate_stream", "/info", "/metrics", "/tokenize"} <= set(spec["paths"])
    # Every route served is in the document: Ollama's and Jan's too, their path parameters declared.
    assert spec["paths"]["/api/chat"]["post"]["tags"] == ["Ollama"]
    assert any(p.startswith("/v1/models/{") for p in spec["paths"])
    for path, ops in spec["paths"].items():
        for op in ops.values():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == set(re.findall(r"\{(\w+)\}", path)), path
    assert httpx.get(url + "/docs").status_code == 200
    raw = httpx.get(url + "/metrics").text
    # Every request, queue and batch series carries the model it is about (TGI's names, one label more).
    assert 'tgi_request_count{model="tiny"}' in raw and 'tgi_queue_size{model="tiny"}' in raw
    assert 'tgi_batch_inference_duration_count{method="decode",model="tiny"}' in raw
    assert "# TYPE ember_models_loaded gauge" in raw and "ember_models_loaded 1" in raw
    text = without_model(raw)
    for name in (
        "tgi_request_count",
        "tgi_request_success",
        "tgi_queue_size",
        "tgi_batch_current_size",
        "tgi_batch_current_max_tokens",
        "tgi_request_duration_bucket",
        "tgi_request_input_length_count",
        'tgi_batch_inference_duration_count{method="decode"}',
        'tgi_request_failure{err="validation"}',
    ):
        assert name in text, name
    assert "# TYPE tgi_request_count counter" in text and "tgi_request_count_total" not in text


def test_request_log_line(stack):
    url, log = stack
    post(url, "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}, headers={"x-request-id": "log-me"})
    line = next(line for line in log.read_text().splitlines() if "id=log-me" in line)
    assert "Success" in line and "input_tokens=1" in line and "generated_tokens=2" in line
    assert "queue_time_ms=" in line and "inference_time_ms=" in line


def test_new_request_joins_running_batch(url):
    concat_before = metric(url, 'tgi_batch_concat{reason="chunking"}')

    async def scenario():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async with client.stream("POST", "/generate_stream", json=LONG) as long:
                events = aiter_events(long)
                await events.__anext__()  # the long request is decoding
                short = await client.post(
                    "/generate", json={"inputs": "The capital", "parameters": {"max_new_tokens": 3}}
                )
                short_done = time.monotonic()
                rest = [e async for e in events]
                return short, short_done, rest

    short, short_done, rest = asyncio.run(scenario())
    assert short.status_code == 200 and short.json()["details"]["generated_tokens"] == 3
    # The long one was still running when the short one finished.
    assert len(rest) > 100 and rest[-1]["details"]["generated_tokens"] == 400
    # Joined in a Prefill that carried the running batch (TGI's "chunking" concat reason).
    assert metric(url, 'tgi_batch_concat{reason="chunking"}') > concat_before
    assert metric(url, "ember_batch_peak_size") >= 2


def test_without_shared_prefill_newcomers_follow_tgi_waiting_rules(tiny_llama_dir, tmp_path):
    """PREFILL_CHUNKING=0: the newcomer is prefilled alone (the running request pauses), then merged."""
    env = {"PREFILL_CHUNKING": "0"}
    with shard_process(tiny_llama_dir, str(tmp_path / "s")) as socket:
        with router_process(
            socket, tiny_llama_dir, "--waiting-served-ratio", "0", env=env, capture=tmp_path / "router.log"
        ) as url:

            async def scenario():
                async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                    async with client.stream("POST", "/generate_stream", json=LONG) as long:
                        events = aiter_events(long)
                        await events.__anext__()
                        short = await client.post(
                            "/generate", json={"inputs": "The capital", "parameters": {"max_new_tokens": 3}}
                        )
                        return short, [e async for e in events]

            short, rest = asyncio.run(scenario())
            assert short.status_code == 200 and rest[-1]["details"]["generated_tokens"] == 400
            assert metric(url, 'tgi_batch_concat{reason="backpressure"}') >= 1
            assert metric(url, 'tgi_batch_concat{reason="chunking"}') == 0
    assert "after their own prefill" in (tmp_path / "router.log").read_text()


def test_overload_429_leaves_admitted_requests_alone(url):
    async def scenario():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            streams, firsts = [], []
            for _ in range(10):
                cm = client.stream("POST", "/generate_stream", json=LONG)
                resp = await cm.__aenter__()
                it = aiter_events(resp)
                firsts.append(await it.__anext__())
                streams.append((cm, it))
            over = await client.post("/generate", json={"inputs": "Hi"})
            over_stream = await client.post("/generate_stream", json={"inputs": "Hi"})
            finals = []
            for cm, it in streams:
                finals.append([e async for e in it][-1])
                await cm.__aexit__(None, None, None)
            return over, over_stream, finals

    over, over_stream, finals = asyncio.run(scenario())
    for r in (over, over_stream):
        assert r.status_code == 429
        assert r.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
        assert "retry-after" in r.headers
    assert all(f["details"]["generated_tokens"] == 400 for f in finals)
    assert post(url, "/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_disconnect_cancels(url):
    dropped_before = metric(url, 'tgi_request_failure{err="dropped"}')

    async def scenario():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:

            async def one():
                body = {"inputs": "Hello world", "parameters": {"max_new_tokens": 500}}
                async with client.stream("POST", "/generate_stream", json=body) as resp:
                    got = 0
                    async for _ in aiter_events(resp):
                        got += 1
                        if got == 3:
                            return got

            return await asyncio.gather(*[one() for _ in range(8)])

    assert asyncio.run(scenario()) == [3] * 8
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        if metric(url, "tgi_queue_size") == 0 and metric(url, "tgi_batch_current_size") == 0:
            break
        time.sleep(0.05)
    assert metric(url, "tgi_queue_size") == 0 and metric(url, "tgi_batch_current_size") == 0
    assert metric(url, 'tgi_request_failure{err="dropped"}') - dropped_before == 8
    assert post(url, "/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}).status_code == 200


def _samples(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics by (name, sorted labels), the model label left out."""
    from prometheus_client.parser import text_string_to_metric_families

    text = without_model(httpx.get(url + "/metrics", timeout=10).text)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_latency_histograms_and_answers_by_status(url):
    before = _samples(url)
    body = {"inputs": "Hello world", "parameters": {"max_new_tokens": 5, "ignore_eos": True}}
    assert post(url, "/generate_stream", body).status_code == 200
    assert post(url, "/generate", {"inputs": ""}).status_code == 422
    assert httpx.get(url + "/no/such/route").status_code == 404
    after = _samples(url)

    def grew(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    # One first token, then four gaps between the five tokens.
    assert grew("ember_time_to_first_token_seconds_count") == 1
    assert grew("ember_inter_token_latency_seconds_count") == 4
    assert grew("ember_inter_token_latency_seconds_sum") > 0
    assert grew("ember_http_requests_total", route="/generate_stream", status="200") == 1
    assert grew("ember_http_requests_total", route="/generate", status="422") == 1
    assert grew("ember_http_requests_total", route="other", status="404") == 1
    assert 0.0 <= after[("ember_kv_cache_usage_ratio", ())] <= 1.0
    assert after[("ember_draining", ())] == 0
