"""Unit tests of the OpenAI adapters' pure parts: chat template, tools, stop handling, body mapping."""

from __future__ import annotations

import json
import re

import pytest

from ember.router.api.openai.chat import _message, _response_format
from ember.router.api.openai.common import StopHolder, sampling, trim_stop
from ember.router.api.openai.tools import CallStreamer, ToolError, is_call, parse_call, plan
from ember.router.chat_template import ChatTemplate, TemplateError
from ember.router.errors import BodyError, ValidationError
from ember.router.grammar import compile_grammar
from ember.router.types import Grammar

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def test_template_from_dir_renders_like_transformers(tiny_llama_dir):
    from transformers import AutoTokenizer

    messages = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi"},
        {"role": "user", "content": "Bye"},
    ]
    ours = ChatTemplate.from_dir(tiny_llama_dir).render(messages)
    theirs = AutoTokenizer.from_pretrained(tiny_llama_dir).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert ours == theirs


def test_template_continues_a_final_assistant_message(tiny_llama_dir):
    text = ChatTemplate.from_dir(tiny_llama_dir).render(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The answer is"}]
    )
    assert text.endswith("<|im_start|>assistant\nThe answer is")


@pytest.mark.parametrize(
    "source",
    [
        "{{ raise_exception('no system role') }}",
        "{% for m in messages %}{{ m.content.upper( }}{% endfor %}",  # syntax error
        "{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}",  # sandbox
        "{{ messages[5]['content'] + 1 }}",
    ],
)
def test_template_errors_are_422(source):
    with pytest.raises(TemplateError) as info:
        ChatTemplate(source).render([{"role": "user", "content": "x"}])
    assert info.value.status == 422 and info.value.message.startswith("Template error: ")


def test_missing_template_is_422(tmp_path):
    with pytest.raises(ValidationError, match="no chat template"):
        ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "x"}])


def test_template_list_and_special_tokens(tmp_path):
    config = {
        "chat_template": [
            {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}"},
            {"name": "tool_use", "template": "T{{ tools|length }}"},
        ],
        "bos_token": {"content": "<s>"},
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    template = ChatTemplate.from_dir(tmp_path)
    assert template.render([{"role": "user", "content": "é"}]) == "<s>é"
    assert template.render([{"role": "user", "content": "x"}], tools=[WEATHER]) == "T1"


def test_message_parts_and_roles():
    msg = _message(
        {
            "role": "developer",
            "content": [
                {"type": "text", "text": "a"},
                {"type": "text", "text": "b"},
                {"type": "image_url", "image_url": {"url": "http://i"}},
            ],
        },
        0,
    )
    assert msg == {"role": "system", "content": "ab![](http://i)"}
    with pytest.raises(BodyError):
        _message({"role": "robot", "content": "x"}, 0)
    call = {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    assert json.loads(_message({"role": "assistant", "tool_calls": [call]}, 1)["content"]) == {
        "name": "f",
        "arguments": {"a": 1},
    }


def test_sampling_mapping():
    p = sampling(
        {
            "temperature": 0,
            "top_p": 0.5,
            "max_completion_tokens": 7,
            "stop": "x",
            "seed": 3,
            "logit_bias": {"12": -100},
            "ignore_eos": True,
            "min_tokens": 2,
            "top_k": -1,
        },
        None,
    )
    assert not p.do_sample and p.temperature is None and p.top_p is None and p.max_new_tokens == 7
    assert p.stop == ["x"] and p.seed == 3 and p.logit_bias == {12: -100.0} and p.ignore_eos and p.min_new_tokens == 2
    p = sampling({"top_p": 1.0, "presence_penalty": 0.5}, 16)
    assert p.do_sample and p.top_p is None and p.presence_penalty == 0.5 and p.max_new_tokens == 16
    with pytest.raises(ValidationError):
        sampling({"logit_bias": {"1": 500}}, None)
    with pytest.raises(BodyError):
        sampling({"temperature": "hot"}, None)
    with pytest.raises(BodyError):
        sampling({"model": 3}, None)


def test_response_format_shapes():
    assert _response_format({"type": "text"}) is None
    assert _response_format({"type": "json_object"}) == Grammar("json", {"type": "object"})
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert _response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}).value == schema
    assert _response_format({"type": "json", "value": schema}).value == schema
    assert _response_format({"type": "regex", "value": "a+"}) == Grammar("regex", "a+")
    with pytest.raises(BodyError):
        _response_format({"type": "yaml"})


def test_invalid_grammars_are_422():
    for bad in (
        Grammar("json", {"type": "object", "properties": {"a": {"type": "nonsense"}}}),
        Grammar("json", "{not json"),
        Grammar("regex", "(unclosed"),
    ):
        with pytest.raises(ValidationError):
            compile_grammar(bad)


def test_tool_plan_modes():
    required = plan([WEATHER, TIME], "required", None)
    assert required.required and required.grammar.type == "json"
    assert {c["properties"]["name"]["const"] for c in required.grammar.value["anyOf"]} == {"get_weather", "get_time"}
    named = plan([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}, None)
    assert named.grammar.value["properties"]["name"] == {"const": "get_time"}
    assert plan([WEATHER], "none", None).grammar is None
    auto = plan([WEATHER], "auto", "Use tools:")
    assert not auto.required and auto.grammar.type == "regex" and auto.prompt == "Use tools:"
    regex = auto.grammar.value
    assert re.fullmatch(regex, '{"name": "get_weather", "arguments": {"city": "Paris"}}')
    assert re.fullmatch(regex, "It is sunny.") and not re.fullmatch(regex, '{"name": "nope"}')
    with pytest.raises(ToolError, match="not found"):
        plan([WEATHER], {"type": "function", "function": {"name": "missing"}}, None)
    with pytest.raises(ToolError):
        plan([{"type": "function"}], "auto", None)


def test_parse_call_and_is_call():
    call = parse_call('{"name": "get_weather", "arguments": {"city": "Paris"}}')
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert is_call(' {"name"', False) and not is_call("Hello", False) and is_call("x", True)
    with pytest.raises(ToolError):
        parse_call('{"name": "f"')


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "f", "arguments": {"a": {"b": [1, 2]}, "c": "x}y"}}',
        '{ "name" : "f" , "arguments" : {"a": 1} }',
        '{"name": "g", "arguments": {}}',
    ],
)
def test_call_streamer_pieces_concatenate_to_the_arguments(text):
    for size in (1, 2, 5):
        streamer = CallStreamer()
        deltas = [d for i in range(0, len(text), size) for d in streamer.push(text[i : i + size])]
        assert deltas[0]["function"]["name"] == json.loads(text)["name"]
        args = "".join(d["function"]["arguments"] for d in deltas)
        assert json.loads(args) == json.loads(text)["arguments"]


def test_stop_sequences_are_left_out_when_streaming():
    assert trim_stop("abc END def", ["END", "de"]) == "abc "
    holder = StopHolder(["END"])
    pieces = [holder.push(p) for p in ["ab", "cE", "N", "Dxyz"]]
    assert "".join(pieces) + holder.push("", final=True) == "abc"
    assert holder.stopped
    plain = StopHolder([])
    assert plain.push("abc") == "abc" and plain.push("", final=True) == ""


def test_streamed_text_with_stops_is_the_text_cut_at_the_first_stop():
    """StopHolder searches only where a new stop can be; its output must be trim_stop's, piece by piece."""
    import random

    rng = random.Random(0)
    for _ in range(3000):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(0, 4))) for _ in range(rng.randint(0, 3))]
        pieces = ["".join(rng.choice("abc") for _ in range(rng.randint(0, 3))) for _ in range(rng.randint(0, 8))]
        holder, sent, text = StopHolder(stops), "", ""
        for piece in pieces:
            out = holder.push(piece)
            text += piece
            sent += out
            cut = trim_stop(text, stops)
            assert cut.startswith(sent)  # never sends what a stop removes
            assert len(cut) - len(sent) <= holder.hold or holder.stopped  # holds back no more than a stop's length
        assert sent + holder.push("", final=True) == trim_stop(text, stops)


@pytest.mark.parametrize("text", ["", "a", " hé", '\n\t"\\', "\u2028", "\x00\x1f\x7f", "日本", "😀", "</s>"])
def test_per_token_frames_are_the_bytes_of_the_json_they_stand_for(text):
    import math

    from ember.router.api.openai.common import content_frame, sse, sse_head, text_frame
    from ember.router.api.tgi.routes import _frame, _token_frame
    from ember.router.infer import TokenInfo

    head = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 5,
        "model": "org/mödel",
        "system_fingerprint": "0.1.0-native",
    }
    for i in (0, 3, 17):
        assert text_frame(sse_head(head), i, text) == sse(
            {**head, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": None}]}
        )
        assert content_frame(sse_head(head), i, text) == sse(
            {
                **head,
                "choices": [{"index": i, "delta": {"content": text}, "logprobs": None, "finish_reason": None}],
                "usage": None,
            }
        )
        for logprob in (None, -0.0, -1.5, 1e-300, -123456.789):
            for special in (True, False):
                token = TokenInfo(12345, text, logprob, special)
                assert _token_frame(i, token) == _frame(
                    {"index": i, "token": token.to_dict(), "generated_text": None, "details": None}
                )
    assert _token_frame(0, TokenInfo(1, text, -math.inf, False)) is None  # left to json.dumps
