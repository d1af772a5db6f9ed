"""Grammar-constrained decoding end to end: ember-shard + ember-router on the tiny model.

Random weights make the model's own preferences meaningless, so every
output below satisfies its grammar only because the shard masks the logits.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import jsonschema
import pytest
from servers import router_process, shard_process

SCHEMAS = {
    "required": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 10}, "ok": {"type": "boolean"}},
        "required": ["name", "ok"],
    },
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    "integer_bounds": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "delta": {"type": "integer", "minimum": -50, "maximum": -3},
        },
        "required": ["age", "delta"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 0, "maximum": 1000},
                    "role": {"enum": ["admin", "guest"]},
                },
                "required": ["id", "role"],
            }
        },
        "required": ["user"],
    },
    "array": {
        "type": "object",
        "properties": {
            "scores": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 9},
                "minItems": 1,
                "maxItems": 4,
            }
        },
        "required": ["scores"],
    },
}
REGEXES = [r"[0-9]{3}-[a-z]{2,4}", r"(yes|no|maybe)", r"[A-Z][a-z]{1,6}( [A-Z][a-z]{1,6}){0,2}\."]
SLOW_REGEX = "[a-z]{2000,4000}"  # about a second to index even on the tiny vocabulary
SAMPLING = [{"do_sample": False}, {"do_sample": True, "temperature": 1.0, "seed": 3}]


@pytest.fixture(scope="module")
def url(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grammar-e2e")
    with shard_process(tiny_llama_dir, str(tmp / "s")) as socket:
        with router_process(socket, tiny_llama_dir) as base:
            yield base


def generate(url: str, grammar: dict, **params) -> httpx.Response:
    body = {"inputs": "Answer:", "parameters": {"max_new_tokens": 150, "grammar": grammar, "details": True, **params}}
    return httpx.post(url + "/generate", json=body, timeout=120)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("params", SAMPLING, ids=["greedy", "sampled"])
def test_json_schema_output_validates(url, name, params):
    r = generate(url, {"type": "json", "value": SCHEMAS[name]}, **params)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["details"]["finish_reason"] == "eos_token"
    jsonschema.validate(json.loads(out["generated_text"]), SCHEMAS[name])


@pytest.mark.parametrize("regex", REGEXES)
@pytest.mark.parametrize("params", SAMPLING, ids=["greedy", "sampled"])
def test_regex_output_fullmatches(url, regex, params):
    r = generate(url, {"type": "regex", "value": regex}, **params)
    assert r.status_code == 200, r.text
    assert re.fullmatch(regex, r.json()["generated_text"]), r.json()["generated_text"]


def test_schema_given_as_a_string(url):
    r = generate(url, {"type": "json", "value": json.dumps(SCHEMAS["enum"])})
    assert json.loads(r.json()["generated_text"])["color"] in ("red", "green", "blue")


def test_constrained_and_unconstrained_in_one_batch(url):
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as http:
            calls = []
            for i, name in enumerate(["nested", "array", "integer_bounds"]):
                grammar = {"type": "json", "value": SCHEMAS[name]}
                calls.append(
                    http.post(
                        url + "/generate",
                        json={
                            "inputs": "Go",
                            "parameters": {"max_new_tokens": 150, "grammar": grammar, "do_sample": True, "seed": i},
                        },
                    )
                )
                calls.append(
                    http.post(
                        url + "/generate",
                        json={"inputs": "Go", "parameters": {"max_new_tokens": 40, "do_sample": True, "seed": i}},
                    )
                )
            calls.append(
                http.post(
                    url + "/generate",
                    json={
                        "inputs": "Go",
                        "parameters": {"max_new_tokens": 150, "grammar": {"type": "regex", "value": REGEXES[0]}},
                    },
                )
            )
            return await asyncio.gather(*calls)

    responses = asyncio.run(run())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    for name, r in zip(["nested", "array", "integer_bounds"], responses[0:6:2]):
        jsonschema.validate(json.loads(r.json()["generated_text"]), SCHEMAS[name])
    assert re.fullmatch(REGEXES[0], responses[-1].json()["generated_text"])
    assert all(r.json()["generated_text"] for r in responses[1:6:2])


def test_openai_response_format_in_a_stream(url):
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=150,
        temperature=0.8,
        seed=2,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"schema": SCHEMAS["nested"]}},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMAS["nested"])


@pytest.mark.parametrize(
    "grammar",
    [
        {"type": "json", "value": {"type": "object", "properties": {"a": {"type": "nonsense"}}}},
        {"type": "json", "value": "{not json"},
        {"type": "regex", "value": "(unclosed"},
    ],
)
def test_invalid_grammar_is_422(url, grammar):
    r = generate(url, grammar)
    assert r.status_code == 422 and r.json()["error_type"] == "validation", r.text
    assert "grammar" in r.json()["error"]


def test_compiling_a_grammar_does_not_stall_decoding(url):
    """Streams keep their pace while a slow grammar's index is built (off the model thread)."""

    async def run() -> tuple[float, list[list[float]]]:
        async with httpx.AsyncClient(timeout=120) as http:

            async def stream(stamps: list[float]) -> None:
                body = {"inputs": "Hello", "parameters": {"max_new_tokens": 60}}
                async with http.stream("POST", url + "/generate_stream", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data:"):
                            stamps.append(time.monotonic())

            runs: list[list[float]] = []
            started = time.monotonic()
            slow = asyncio.ensure_future(
                http.post(
                    url + "/generate",
                    json={
                        "inputs": "x",
                        "parameters": {"max_new_tokens": 2, "grammar": {"type": "regex", "value": SLOW_REGEX + "q"}},
                    },
                )
            )
            while not slow.done():  # back-to-back streams for as long as the compile lasts
                runs.append([])
                await stream(runs[-1])
            assert (await slow).status_code == 200
            return time.monotonic() - started, runs

    compile_time, runs = asyncio.run(run())
    gaps = [b - a for stamps in runs for a, b in zip(stamps, stamps[1:])]
    # Tokens kept coming while the index was built (how many depends on the machine's speed).
    assert compile_time > 0.5 and sum(len(s) for s in runs) > 10
    assert max(gaps) < compile_time / 2, (max(gaps), compile_time)


@pytest.fixture(scope="module")
def strict_url(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grammar-limit")
    with shard_process(tiny_llama_dir, str(tmp / "s")) as socket:
        with router_process(socket, tiny_llama_dir, "--grammar-compile-timeout", "0.2") as base:
            yield base


def test_compile_over_the_limit_is_422(strict_url):
    r = generate(strict_url, {"type": "regex", "value": SLOW_REGEX + "w"})
    assert r.status_code == 422, r.text
    assert "too complex" in r.json()["error"] and "0.2s" in r.json()["error"]
    ok = generate(strict_url, {"type": "regex", "value": REGEXES[1]})
    assert ok.status_code == 200 and re.fullmatch(REGEXES[1], ok.json()["generated_text"])
