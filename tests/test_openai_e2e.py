"""The OpenAI routes end to end with the official `openai` client: ember-shard + ember-router, tiny model."""

from __future__ import annotations

import base64
import json
import struct

import httpx
import openai
import pytest
from servers import router_process, shard_process

HELLO = [{"role": "user", "content": "Hello"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]},
    },
}


@pytest.fixture(scope="module")
def url(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openai-e2e")
    with shard_process(tiny_llama_dir, str(tmp / "s")) as socket:
        with router_process(
            socket, tiny_llama_dir, "--max-concurrent-requests", "6", "--payload-limit", "20000"
        ) as base:
            yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat_tokens(url: str, messages: list[dict]) -> int:
    body = httpx.post(url + "/chat_tokenize", json={"messages": messages}, timeout=30).json()
    return len(body["tokenize_response"])


# ---- models and errors --------------------------------------------------------------------------


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].object == "model"
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_error_shape_and_statuses(client, url):
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(model="x", messages=[{"role": "robot", "content": "hi"}])
    err = info.value.body
    assert set(err) >= {"message", "type", "param", "code"} and err["code"] == 422
    r = httpx.post(url + "/v1/chat/completions", content=b"{nope", timeout=30)
    assert r.status_code == 422 and "message" in r.json()["error"]
    r = httpx.post(url + "/v1/completions", json={"prompt": "x" * 30000}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"
    # 4 prompts x n=2 need 8 permits; the router allows 6 concurrent requests.
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="x", prompt=["a", "b", "c", "d"], n=2, max_tokens=1)


def test_any_model_name_is_served(client):
    out = client.chat.completions.create(model="dummy", messages=HELLO, max_tokens=2, temperature=0)
    assert out.model == "tiny" and out.choices[0].finish_reason == "length"


# ---- chat ---------------------------------------------------------------------------------------


def test_chat_greedy_usage_and_determinism(client, url):
    a = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, temperature=0)
    b = client.chat.completions.create(model="tiny", messages=HELLO, max_completion_tokens=5, temperature=0)
    assert a.object == "chat.completion" and a.choices[0].message.role == "assistant"
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == chat_tokens(url, HELLO)
    assert a.usage.completion_tokens == 5 and a.usage.total_tokens == a.usage.prompt_tokens + 5


def test_chat_n_choices_seeded_and_logprobs(client):
    out = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=6, n=3, seed=7, temperature=1.0, logprobs=True, top_logprobs=2
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.message.content for c in out.choices}) > 1  # independent samples
    assert out.usage.completion_tokens == 18
    again = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, n=3, seed=7, temperature=1.0)
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]
    content = out.choices[0].logprobs.content
    assert len(content) == 6 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_chat_stream_chunks_and_usage(client):
    greedy = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert text == greedy.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == greedy.usage.prompt_tokens


def test_chat_stream_ends_with_done(url):
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_stop_sequences_are_removed(client):
    # Random weights emit many undecodable bytes: find a seeded sample with a letter to stop at.
    kwargs = dict(model="tiny", messages=HELLO, max_tokens=12, temperature=1.0)
    for seed in range(30):
        text = client.chat.completions.create(**kwargs, seed=seed).choices[0].message.content
        letters = [c for c in text[2:] if c.isascii() and c.isalnum()]
        if letters:
            break
    stop = letters[0]
    cut = client.chat.completions.create(**kwargs, seed=seed, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.find(stop)]
    stream = client.chat.completions.create(**kwargs, seed=seed, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text[: text.find(stop)]


def test_logit_bias_ignore_eos_and_min_tokens(client, url):
    ids = httpx.post(url + "/extras/tokenize", json={"input": "Paris"}, timeout=30).json()["tokens"]
    out = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=4, temperature=0, logit_bias={str(ids[0]): 100}
    )
    assert (
        out.choices[0].message.content
        == httpx.post(url + "/extras/detokenize", json={"tokens": ids[:1] * 4}, timeout=30).json()["text"]
    )
    eos = 2  # <|im_end|>
    out = client.chat.completions.create(
        model="tiny",
        messages=HELLO,
        max_tokens=6,
        temperature=0,
        logit_bias={str(eos): 100},
        extra_body={"ignore_eos": True},
    )
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 6
    out = client.chat.completions.create(
        model="tiny",
        messages=HELLO,
        max_tokens=6,
        temperature=0,
        logit_bias={str(eos): 100},
        extra_body={"min_tokens": 3},
    )
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == 4


def test_template_error_is_422_not_500(client):
    # The tiny template concatenates content strings; a tool message without content renders "",
    # but an assistant turn as the only message still renders. A bad tool_choice is a 422.
    with pytest.raises(openai.UnprocessableEntityError, match="not found"):
        client.chat.completions.create(
            model="tiny",
            messages=HELLO,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    with pytest.raises(openai.UnprocessableEntityError, match="mutually exclusive"):
        client.chat.completions.create(
            model="tiny", messages=HELLO, tools=[WEATHER], response_format={"type": "json_object"}
        )


# ---- response_format and tools ------------------------------------------------------------------


def test_json_schema_response_format(client):
    import jsonschema

    schema = WEATHER["function"]["parameters"]
    for kwargs in ({"temperature": 0}, {"temperature": 1.0, "seed": 11}):
        out = client.chat.completions.create(
            model="tiny",
            messages=HELLO,
            max_tokens=120,
            **kwargs,
            response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}},
        )
        assert out.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.choices[0].message.content), schema)
    out = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=200, temperature=0, response_format={"type": "json_object"}
    )
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    else:
        assert out.choices[0].message.content.startswith("{")


def test_tool_call_required_and_named(client):
    import jsonschema

    out = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=100, temperature=0, tools=[WEATHER, CLOCK], tool_choice="required"
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id and call.function.name in ("get_weather", "get_time")
    schema = (WEATHER if call.function.name == "get_weather" else CLOCK)["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    named = client.chat.completions.create(
        model="tiny",
        messages=HELLO,
        max_tokens=100,
        temperature=1.0,
        seed=5,
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    call = named.choices[0].message.tool_calls[0]
    assert call.function.name == "get_time" and json.loads(call.function.arguments)["zone"] in ("UTC", "CET")


def test_tool_call_streamed_as_deltas(client):
    kwargs = dict(model="tiny", messages=HELLO, max_tokens=100, temperature=0, tools=[WEATHER], tool_choice="required")
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    chunks = [c for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    args = "".join(d.function.arguments or "" for d in deltas)
    assert json.loads(args) == json.loads(whole.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_auto_and_none(client):
    for seed in range(3):
        out = client.chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=60, temperature=1.0, seed=seed, tools=[CLOCK]
        )
        msg = out.choices[0].message
        if msg.tool_calls:  # a call is always complete and valid
            assert out.choices[0].finish_reason == "tool_calls"
            assert json.loads(msg.tool_calls[0].function.arguments)["zone"] in ("UTC", "CET")
        else:
            assert not msg.content.startswith("{")
    out = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=3, temperature=0, tools=[CLOCK], tool_choice="none"
    )
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason == "length"


def test_tool_history_messages_render(client, url):
    messages = [
        *HELLO,
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
    ]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0)
    assert out.usage.prompt_tokens == chat_tokens(url, messages)
    text = httpx.post(url + "/chat_tokenize", json={"messages": messages}, timeout=30).json()["templated_text"]
    assert '"get_time"' in text and "<|im_start|>tool\n12:00" in text


# ---- completions --------------------------------------------------------------------------------


def test_completions_prompts_echo_logprobs(client):
    out = client.completions.create(
        model="tiny", prompt=["Hello", "The capital"], max_tokens=4, temperature=0, echo=True, logprobs=2
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].text.startswith("Hello") and out.choices[1].text.startswith("The capital")
    lp = out.choices[1].logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == out.usage.prompt_tokens - 1 + 4
    default = client.completions.create(model="tiny", prompt="Hello", temperature=0)
    assert default.usage.completion_tokens == 16 and default.choices[0].finish_reason == "length"


def test_completions_n_best_of_and_stream(client):
    out = client.completions.create(model="tiny", prompt=["a", "b"], n=2, max_tokens=3, seed=1)
    assert [c.index for c in out.choices] == [0, 1, 2, 3] and out.usage.completion_tokens == 12
    best = client.completions.create(model="tiny", prompt="Hello", best_of=2, max_tokens=3)
    assert len(best.choices) == 1
    greedy = client.completions.create(model="tiny", prompt=["Hello", "Once"], max_tokens=5, temperature=0)
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=["Hello", "Once"],
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    for i in range(2):
        text = "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i)
        assert text == greedy.choices[i].text
    assert chunks[-1].usage.completion_tokens == 10


def test_completions_suffix_without_fim_tokens_is_422(client):
    with pytest.raises(openai.UnprocessableEntityError, match="suffix"):
        client.completions.create(model="tiny", prompt="def f(", suffix="return x", max_tokens=3)


def test_invocations_by_shape(url):
    r = httpx.post(url + "/invocations", json={"messages": HELLO, "max_tokens": 2}, timeout=30)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    r = httpx.post(url + "/invocations", json={"prompt": "Hello", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200 and r.json()["object"] == "text_completion"


# ---- embeddings and tokenizer routes ------------------------------------------------------------


def test_embeddings(client):
    out = client.embeddings.create(model="tiny", input=["hello world", "bye"], encoding_format="float")
    vectors = [d.embedding for d in out.data]
    assert len(vectors) == 2 and len(vectors[0]) == 64
    assert abs(sum(v * v for v in vectors[0]) - 1.0) < 1e-4 and vectors[0] != vectors[1]
    assert out.usage.prompt_tokens == out.usage.total_tokens > 0
    # The client's default is base64; it decodes it to the same floats.
    again = client.embeddings.create(model="tiny", input="hello world")
    assert again.data[0].embedding == pytest.approx(vectors[0], abs=1e-6)
    tokens = client.embeddings.create(model="tiny", input=[[5, 6, 7]], encoding_format="float")
    assert len(tokens.data) == 1 and tokens.usage.prompt_tokens == 3
    with pytest.raises(openai.UnprocessableEntityError, match="dimensions"):
        client.embeddings.create(model="tiny", input="x", dimensions=8)


def test_embeddings_base64_bytes(url):
    r = httpx.post(url + "/v1/embeddings", json={"input": "hello", "encoding_format": "base64"}, timeout=30)
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    values = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(values) == 64 and abs(sum(v * v for v in values) - 1.0) < 1e-4


def test_extras_routes(url):
    tokens = httpx.post(url + "/extras/tokenize", json={"input": "Hello world"}, timeout=30).json()["tokens"]
    count = httpx.post(url + "/extras/tokenize/count", json={"input": "Hello world"}, timeout=30).json()["count"]
    assert count == len(tokens) > 0
    text = httpx.post(url + "/extras/detokenize", json={"tokens": tokens}, timeout=30).json()["text"]
    assert text == "Hello world"
    bad = httpx.post(url + "/extras/detokenize", json={"tokens": [10**9]}, timeout=30)
    assert bad.status_code == 422 and bad.json()["detail"][0]["msg"]
    assert httpx.post(url + "/extras/tokenize", json={}, timeout=30).status_code == 422


def test_chat_tokenize_and_openapi(url):
    body = httpx.post(url + "/chat_tokenize", json={"model": "tiny", "messages": HELLO}, timeout=30).json()
    assert body["templated_text"].endswith("<|im_start|>assistant\n")
    text = body["templated_text"]
    assert "".join(t["text"] for t in body["tokenize_response"]) == text
    paths = httpx.get(url + "/openapi.json", timeout=30).json()["paths"]
    for path in (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/v1/embeddings",
        "/chat_tokenize",
        "/extras/tokenize",
        "/extras/tokenize/count",
        "/extras/detokenize",
    ):
        assert path in paths


def test_chat_stream_with_n_choices(client):
    whole = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, n=2, seed=9, temperature=0.9)
    chunks = [
        c
        for c in client.chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=4, n=2, seed=9, temperature=0.9, stream=True
        )
        if c.choices
    ]
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert "".join(c.delta.content or "" for c in mine) == whole.choices[i].message.content
        assert mine[-1].finish_reason == "length"


def test_a_shared_prompt_beginning_is_served_from_the_prefix_cache(client, url):
    """The second chat behind the same long system prompt reuses its blocks: usage says how many prompt
    tokens came from the cache, /metrics counts them, /info says caching is on."""
    info = httpx.get(f"{url}/info").json()
    assert info["prefix_caching"] is True and info["block_size"] == 16

    def scraped() -> dict[str, float]:
        lines = httpx.get(f"{url}/metrics").text.splitlines()
        rows = [line.split() for line in lines if line.startswith("ember_prompt_tokens_total{")]
        return {row[0].split('"')[1]: float(row[1]) for row in rows}

    before = scraped()
    system = {"role": "system", "content": " ".join(f"rule {i}: be brief." for i in range(30))}
    answers = [
        client.chat.completions.create(
            model="tiny", messages=[system, {"role": "user", "content": text}], max_tokens=3, temperature=0
        )
        for text in ("Hello there", "What now?")
    ]
    prompt = answers[1].usage.prompt_tokens
    cached = answers[1].usage.prompt_tokens_details.cached_tokens
    assert prompt > 100 and cached % 16 == 0 and prompt - 16 - 8 < cached < prompt
    after = scraped()
    assert after["cached"] - before.get("cached", 0) >= cached
    computed = after["computed"] - before.get("computed", 0)
    assert computed == answers[0].usage.prompt_tokens + prompt - (after["cached"] - before.get("cached", 0))
