"""Ollama's generation routes (/api/generate, /api/chat, /api/embed, /api/embeddings) over real
processes: a tiny shard and a router, called with the official `ollama` client and with raw httpx.

Bodies are checked against `specs/ollama-openapi.yaml` where a checkout has it beside. The spec's
defects, worked around here: ChatResponse types `load_duration`, `prompt_eval_duration` and
`eval_duration` as strings (Ollama sends integer nanoseconds, as GenerateResponse says); `format` is
typed as a string though Ollama takes a JSON schema object too; neither response lists `done_reason`;
Message has no `tool_calls`. The checks below use the spec's schemas with those fields corrected.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import ollama
import pytest
import yaml
from servers import router_process, shard_process

SPEC = Path(__file__).resolve().parents[2] / "shared" / "specs" / "ollama-openapi.yaml"
DURATIONS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
FAST = {"num_predict": 6, "temperature": 0}


def _schemas() -> dict | None:
    if not SPEC.exists():
        return None
    schemas = yaml.safe_load(SPEC.read_text())["components"]["schemas"]
    for name in ("GenerateResponse", "ChatResponse"):
        props = schemas[name]["properties"]
        for key in DURATIONS:  # the spec's strings and numbers: Ollama's are integer nanoseconds
            props[key] = {"type": "integer"}
        props["done_reason"] = {"type": "string"}
    return schemas


SCHEMAS = _schemas()


def check(body: dict, name: str) -> None:
    if SCHEMAS is None:
        pytest.skip("specs/ollama-openapi.yaml is not beside this checkout")
    jsonschema.validate(body, {**SCHEMAS[name], "components": {"schemas": SCHEMAS}})


def check_final(body: dict) -> None:
    assert body["done"] is True
    assert body["done_reason"] in ("stop", "length")
    for key in DURATIONS:
        assert isinstance(body[key], int) and body[key] > 0, (key, body[key])
    assert body["total_duration"] >= body["eval_duration"]
    assert isinstance(body["prompt_eval_count"], int) and body["prompt_eval_count"] > 0
    assert isinstance(body["eval_count"], int) and body["eval_count"] > 0
    assert body["created_at"].endswith("Z")


@pytest.fixture(scope="module")
def url(tiny_llama_dir, tmp_path_factory):
    with shard_process(tiny_llama_dir, str(tmp_path_factory.mktemp("ollama") / "s")) as socket:
        with router_process(socket, tiny_llama_dir) as base:
            yield base


@pytest.fixture(scope="module")
def client(url):
    return ollama.Client(host=url)


def lines(response: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def test_generate_streams_ndjson_and_ends_with_measured_durations_and_context(url):
    body = {"model": "tiny", "prompt": "Hello world", "options": FAST}
    r = httpx.post(f"{url}/api/generate", json=body, timeout=60)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/x-ndjson")
    chunks = lines(r)
    assert all(c["done"] is False and c["model"] == "tiny" for c in chunks[:-1])
    final = chunks[-1]
    check_final(final)
    check(final, "GenerateResponse")
    assert final["eval_count"] <= 6
    assert final["response"] == ""
    text = "".join(c["response"] for c in chunks)
    assert len(final["context"]) == final["prompt_eval_count"] + final["eval_count"]
    # The same request unstreamed answers the same text (greedy).
    whole = httpx.post(f"{url}/api/generate", json={**body, "stream": False}, timeout=60).json()
    check(whole, "GenerateResponse")
    check_final(whole)
    assert whole["response"] == text
    assert whole["context"] == final["context"]


def test_context_continues_a_previous_answer(client, tiny_llama_dir):
    from tokenizers import Tokenizer

    first = client.generate(model="tiny", prompt="Once upon", raw=True, options=FAST)
    assert first.done and first.context
    assert len(first.context) == first.prompt_eval_count + first.eval_count
    second = client.generate(model="tiny", prompt=" and", raw=True, context=first.context, options=FAST)
    # The earlier exchange is the start of the new prompt as those very ids (not re-tokenized from its text),
    # then the new prompt's own tokens.
    added = Tokenizer.from_file(str(tiny_llama_dir / "tokenizer.json")).encode(" and", add_special_tokens=False).ids
    assert second.prompt_eval_count == len(first.context) + len(added)
    assert second.context[: second.prompt_eval_count] == [*first.context, *added]
    # Out-of-vocabulary ids are refused, not sent to the shard.
    with pytest.raises(ollama.ResponseError) as bad:
        client.generate(model="tiny", prompt="x", raw=True, context=[10**9], options=FAST)
    assert bad.value.status_code == 400 and "context" in str(bad.value)


def test_generate_with_the_ollama_client_streamed_and_not(client):
    parts = list(client.generate(model="tiny", prompt="Hi", stream=True, options=FAST))
    assert parts[-1].done and parts[-1].done_reason in ("stop", "length")
    assert parts[-1].eval_count >= 1 and parts[-1].eval_duration > 0
    one = client.generate(model="tiny", prompt="Hi", options=FAST)
    assert one.response == "".join(p.response for p in parts)
    assert one.load_duration > 0 and one.prompt_eval_duration > 0


def test_system_prompt_and_template(url):
    base = {"model": "tiny", "prompt": "Hi", "stream": False, "options": FAST}
    plain = httpx.post(f"{url}/api/generate", json=base, timeout=60).json()
    with_system = httpx.post(f"{url}/api/generate", json={**base, "system": "Be brief."}, timeout=60).json()
    assert with_system["prompt_eval_count"] != plain["prompt_eval_count"]
    templ = {**base, "template": "{{ .System }} says: {{ .Prompt }}{{ .Response }}", "system": "S"}
    templated = httpx.post(f"{url}/api/generate", json=templ, timeout=60).json()
    raw = httpx.post(f"{url}/api/generate", json={**base, "prompt": "S says: Hi", "raw": True}, timeout=60).json()
    assert templated["context"][: templated["prompt_eval_count"]] == raw["context"][: raw["prompt_eval_count"]]
    bad = httpx.post(f"{url}/api/generate", json={**base, "template": "{{ if .First }}x{{ end }}"}, timeout=60)
    assert bad.status_code == 400 and "template" in bad.json()["error"]


def test_chat_with_a_system_prompt_streamed(client, url):
    messages = [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Hi"}]
    parts = list(client.chat(model="tiny", messages=messages, stream=True, options=FAST))
    assert all(p.message.role == "assistant" for p in parts)
    assert parts[-1].done and parts[-1].eval_count >= 1
    body = {"model": "tiny", "messages": messages, "stream": False, "options": FAST}
    whole = httpx.post(f"{url}/api/chat", json=body, timeout=60).json()
    check(whole, "ChatResponse")
    check_final(whole)
    assert whole["message"]["content"] == "".join(p.message.content for p in parts)


def test_format_schema_gives_json_valid_against_it(client):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    answer = client.chat(
        model="tiny",
        messages=[{"role": "user", "content": "A person as JSON"}],
        format=schema,
        options={"num_predict": 60, "seed": 3},
    )
    assert answer.done_reason == "stop"
    jsonschema.validate(json.loads(answer.message.content), schema)
    gen = client.generate(model="tiny", prompt="JSON:", format=schema, options={"num_predict": 60, "seed": 4})
    jsonschema.validate(json.loads(gen.response), schema)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}},
            "required": ["city"],
        },
    },
}


def test_a_tool_call_round_trip(client, url):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    # Ollama has no tool_choice; Ember's extension forces the call so a random model makes one.
    body = {"model": "tiny", "messages": messages, "tools": [WEATHER], "tool_choice": "required", "stream": False}
    first = httpx.post(f"{url}/api/chat", json={**body, "options": {"num_predict": 60}}, timeout=60).json()
    calls = first["message"]["tool_calls"]
    assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather"
    arguments = calls[0]["function"]["arguments"]
    assert isinstance(arguments, dict)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    # Streamed, the call comes whole in one line.
    streamed = lines(httpx.post(f"{url}/api/chat", json={**body, "stream": True, "options": {"num_predict": 60}}))
    assert [c for c in streamed if c["message"].get("tool_calls")]
    # The call and its result go back; the client parses whatever the model answers.
    history = [
        *messages,
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "content": "18 degrees", "tool_name": "get_weather"},
    ]
    answer = client.chat(model="tiny", messages=history, tools=[WEATHER], options=FAST)
    assert answer.done and answer.message.role == "assistant"
    assert answer.message.content or answer.message.tool_calls


def test_options_map_to_sampling(client, url):
    short = client.generate(model="tiny", prompt="Numbers", options={"num_predict": 3, "temperature": 0})
    assert short.eval_count <= 3 and short.done_reason in ("length", "stop")
    long = client.generate(model="tiny", prompt="Numbers", options={"num_predict": 12, "temperature": 0})
    if long.eval_count >= 4 and long.response[2:]:
        stop = long.response[2:5].strip() or long.response[2:5]
        cut = client.generate(
            model="tiny", prompt="Numbers", options={"num_predict": 12, "temperature": 0, "stop": [stop]}
        )
        assert stop not in cut.response
        assert long.response.startswith(cut.response)
    seeded = [
        client.generate(model="tiny", prompt="Hi", options={"num_predict": 8, "seed": 7, "temperature": 1.5}).response
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    info = httpx.get(f"{url}/info").json()
    too_big = httpx.post(
        f"{url}/api/generate",
        json={"model": "tiny", "prompt": "Hi", "options": {"num_ctx": info["max_total_tokens"] + 1}},
        timeout=30,
    )
    assert too_big.status_code == 400
    assert str(info["max_total_tokens"] + 1) in too_big.json()["error"]
    assert str(info["max_total_tokens"]) in too_big.json()["error"]
    unknown = client.generate(model="tiny", prompt="Hi", options={**FAST, "mirostat": 2, "num_gpu": 1})
    assert unknown.done


def test_repeat_last_n_reaches_the_engine(client):
    """A prohibitive repeat_penalty over the last N tokens: no token comes back within N of itself."""

    def ids(**options):
        options = {"num_predict": 24, "temperature": 0, **options}
        return client.generate(model="tiny", prompt="Hello world", raw=True, options=options).context

    def nearest_repeat(seq: list[int]) -> int:
        gaps = [j - i for i in range(len(seq)) for j in range(i + 1, len(seq)) if seq[i] == seq[j]]
        return min(gaps, default=len(seq))

    free = ids(repeat_penalty=1.0)
    assert nearest_repeat(free) == 1  # this tiny model loops on one token when nothing stops it
    assert ids(repeat_penalty=1e6, repeat_last_n=0) == free  # 0 turns the penalties off
    assert nearest_repeat(ids(repeat_penalty=1e6, repeat_last_n=1)) >= 2
    assert nearest_repeat(ids(repeat_penalty=1e6, repeat_last_n=8)) >= 9


def test_images_and_thinking_are_refused(client):
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="tiny", prompt="What is this?", images=[b"\x89PNG"])
    assert err.value.status_code == 400 and "vision" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="tiny", messages=[{"role": "user", "content": "Hi"}], think=True)
    assert err.value.status_code == 400 and "thinking" in err.value.error


def test_an_empty_prompt_loads_the_model(url, client):
    body = httpx.post(f"{url}/api/generate", json={"model": "tiny"}, timeout=30).json()
    assert body["done"] is True and body["done_reason"] == "load" and body["response"] == ""
    chat = httpx.post(f"{url}/api/chat", json={"model": "tiny", "messages": []}, timeout=30).json()
    assert chat["done_reason"] == "load" and chat["message"] == {"role": "assistant", "content": ""}
    # Without a launcher the default model cannot be unloaded: a clear error, and it keeps serving.
    unload = httpx.post(f"{url}/api/generate", json={"model": "tiny", "keep_alive": 0}, timeout=30)
    assert unload.status_code == 503 and "unload" in unload.json()["error"]
    assert client.generate(model="tiny", prompt="Hi", options=FAST).done


def test_unknown_model_is_ollamas_404(client, url):
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="nosuchmodel", prompt="Hi")
    assert err.value.status_code == 404
    assert err.value.error == "model 'nosuchmodel' not found"
    r = httpx.post(f"{url}/api/chat", json={"model": "nosuchmodel", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json() == {"error": "model 'nosuchmodel' not found"}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/generate", b"{not json"),
        ("/api/generate", b"[1, 2]"),
        ("/api/generate", {"prompt": "no model"}),
        ("/api/generate", {"model": "tiny", "prompt": 5}),
        ("/api/generate", {"model": "tiny", "prompt": "x", "options": {"temperature": "hot"}}),
        ("/api/generate", {"model": "tiny", "prompt": "x", "format": "yaml"}),
        ("/api/generate", {"model": "tiny", "prompt": "x", "context": ["a"]}),
        ("/api/chat", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}),
        ("/api/chat", {"model": "tiny", "messages": "hi"}),
        ("/api/embed", {"model": "tiny", "input": 5}),
    ],
)
def test_bad_bodies_are_400_and_the_server_keeps_serving(url, client, path, body):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{url}{path}", timeout=30, headers={"content-type": "application/json"}, **kwargs)
    assert r.status_code == 400, r.text
    assert isinstance(r.json()["error"], str)
    assert client.generate(model="tiny", prompt="Hi", options={"num_predict": 1}).done


def test_embed_and_embeddings_shapes(client, url):
    one = client.embed(model="tiny", input="Hello world")
    assert len(one.embeddings) == 1 and len(one.embeddings[0]) > 1
    two = httpx.post(f"{url}/api/embed", json={"model": "tiny", "input": ["a b", "c d e"]}).json()
    assert len(two["embeddings"]) == 2 and two["prompt_eval_count"] >= 2
    assert isinstance(two["total_duration"], int) and two["total_duration"] > 0
    assert isinstance(two["load_duration"], int)
    old = client.embeddings(model="tiny", prompt="Hello world")
    assert old.embedding == pytest.approx(one.embeddings[0], abs=1e-5)
    raw_old = httpx.post(f"{url}/api/embeddings", json={"model": "tiny", "prompt": "Hello"}).json()
    check(raw_old, "EmbeddingResponse")
    info = httpx.get(f"{url}/info").json()
    long = "word " * (info["max_input_tokens"] + 10)
    cut = httpx.post(f"{url}/api/embed", json={"model": "tiny", "input": long}, timeout=60)
    assert cut.status_code == 200 and cut.json()["prompt_eval_count"] <= info["max_input_tokens"]
    refused = httpx.post(f"{url}/api/embed", json={"model": "tiny", "input": long, "truncate": False}, timeout=60)
    assert refused.status_code == 400


def test_overload_is_ollamas_busy_503_with_retry_after(tiny_llama_dir, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with shard_process(tiny_llama_dir, str(tmp_path / "s")) as socket:
        with router_process(socket, tiny_llama_dir, "--max-concurrent-requests", "1") as base:
            body = {"model": "tiny", "prompt": "Hi", "stream": False, "options": {"num_predict": 200, "seed": 1}}
            with ThreadPoolExecutor(6) as pool:
                answers = list(pool.map(lambda _: httpx.post(f"{base}/api/generate", json=body, timeout=60), range(6)))
            busy = [r for r in answers if r.status_code == 503]
            assert busy and any(r.status_code == 200 for r in answers)
            for r in busy:
                assert r.json() == {"error": "server busy, please try again.  maximum pending requests exceeded"}
                assert r.headers["retry-after"]
            # The permits were all given back.
            r = httpx.post(
                f"{base}/api/generate", json={"model": "tiny", "prompt": "Hi", "stream": False, "options": FAST}
            )
            assert r.status_code == 200 and r.json()["done"]


# ---- unit checks of the translation (no processes) ------------------------------------------------


class _Limits:
    max_total_tokens = 512
    max_input_tokens = 400


class _Tokenizer:
    async def run(self, fn, *args):
        return fn(*args)


def _state(parameters=None, system=None):
    from types import SimpleNamespace

    from tiny import CHAT_TEMPLATE

    from ember.router.chat_template import ChatTemplate
    from ember.router.models import Target

    target = Target("derived", "g", "derived", parameters=parameters or {}, system=system)
    return SimpleNamespace(
        target=target, limits=_Limits(), tokenizer=_Tokenizer(), chat_template=ChatTemplate(CHAT_TEMPLATE), model_id="d"
    )


def test_options_layer_ollama_defaults_under_the_models_under_the_request():
    from ember.router.api.ollama.generate import options_of

    state = _state({"temperature": 0.3, "top_k": 5, "stop": ["<x>"]})
    p = options_of({"options": {"top_k": 7, "repeat_penalty": 1.2, "seed": -1, "min_p": 0.1}}, state).params
    assert (p.temperature, p.top_k, p.top_p) == (0.3, 7, 0.9)  # model over Ollama's, request over the model's
    assert p.repetition_penalty == 1.2 and p.min_p == 0.1 and p.seed is None and p.do_sample
    assert p.stop == ["<x>"]
    greedy = options_of({"options": {"temperature": 0}}, _state()).params
    assert greedy.temperature is None and greedy.top_k is None and not greedy.do_sample
    opts = options_of({"options": {"num_predict": -2, "num_ctx": 512}}, state)
    assert opts.num_predict == -2 and opts.num_ctx == 512


def test_repeat_last_n_windows_the_penalties_as_ollama_does():
    from ember.router.api.ollama.generate import options_of
    from ember.router.errors import ValidationError

    p = options_of({}, _state()).params  # Ollama's defaults: repeat_penalty 1.1 over the last 64 tokens
    assert (p.repetition_penalty, p.penalty_window) == (1.1, 64)
    p = options_of({"options": {"repeat_last_n": 8, "frequency_penalty": 0.5}}, _state()).params
    assert (p.penalty_window, p.frequency_penalty) == (8, 0.5)
    p = options_of({"options": {"repeat_last_n": 0, "presence_penalty": 1.0}}, _state()).params
    assert p.repetition_penalty is None and p.presence_penalty is None  # 0: no penalty at all
    assert options_of({"options": {"repeat_last_n": -1}}, _state()).params.penalty_window == _Limits.max_total_tokens
    assert options_of({"options": {"repeat_last_n": -1, "num_ctx": 100}}, _state()).params.penalty_window == 100
    with pytest.raises(ValidationError, match="repeat_last_n"):
        options_of({"options": {"repeat_last_n": -2}}, _state())


def test_a_derived_models_system_prompt_applies_when_the_messages_have_none():
    import asyncio

    from ember.router.api.ollama.generate import chat_prompt

    state = _state(system="You are a pirate.")
    user = [{"role": "user", "content": "Hi"}]
    assert "You are a pirate." in asyncio.run(chat_prompt(state, user, None, None))
    own = [{"role": "system", "content": "Be kind."}, *user]
    text = asyncio.run(chat_prompt(state, own, None, None))
    assert "Be kind." in text and "pirate" not in text


def test_stop_filter_holds_back_what_may_start_a_stop_sequence():
    from ember.router.stops import StopHolder as StopFilter
    from ember.router.stops import trim_stop as cut_at_stop

    f = StopFilter(["END"])
    out = [f.push(p) for p in ["ab", "cE", "N", "Dxyz"]] + [f.push("", final=True)]
    assert "".join(out) == "abc"
    assert cut_at_stop("hello END there", ["END", "there"]) == "hello "
    assert StopFilter([]).push("x") == "x"
