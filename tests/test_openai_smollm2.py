"""The OpenAI routes on SmolLM2 (a real instruct model) with the official `openai` client."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from servers import router_process, shard_process

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "languages": {
            "type": "array",
            "items": {"enum": ["French", "English", "German"]},
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["name", "age", "languages"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}


@pytest.fixture(scope="module")
def client(smollm2_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smollm2-openai")
    with shard_process(smollm2_dir, str(tmp / "s"), timeout=300) as socket:
        with router_process(socket, smollm2_dir, "--max-total-tokens", "2048", model_id="smollm2", timeout=300) as url:
            yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_chat_answers_paris(client):
    out = client.chat.completions.create(
        model="smollm2",
        temperature=0,
        max_tokens=20,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
    )
    assert "Paris" in out.choices[0].message.content
    assert out.choices[0].finish_reason in ("stop", "length")


def test_json_mode_validates(client):
    out = client.chat.completions.create(
        model="smollm2",
        temperature=0,
        max_tokens=80,
        messages=[{"role": "user", "content": "Describe a French person as JSON with name, age and languages."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
    )
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), PERSON)


def test_tool_call_validates(client):
    out = client.chat.completions.create(
        model="smollm2",
        temperature=0,
        max_tokens=80,
        tools=[WEATHER],
        tool_choice="required",
        messages=[{"role": "user", "content": "What is the weather like in Paris today, in celsius?"}],
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    assert "paris" in args["city"].lower()
