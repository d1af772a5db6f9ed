"""Grammar: vocabulary from a local tokenizer, compile cache, masked decoding that obeys the grammar."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import jsonschema
import pytest
import torch

from ember.proto import generate_pb2
from ember.schema_regex import GrammarError, integer_range_regex, regex_for
from ember.shard.grammar import GrammarCompiler, GrammarState, build_vocabulary
from ember.shard.sampling import BatchSampler, SamplingParams

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "zip": {"type": "integer", "minimum": -50, "exclusiveMaximum": 1000},
            },
            "required": ["city", "zip"],
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "color", "address", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def compiler(tiny_tokenizer):
    return GrammarCompiler(tiny_tokenizer)


def masked_greedy(tokenizer, state: GrammarState, seed: int, max_steps: int = 400) -> str:
    """Greedy decoding over random logits, masked by the grammar through the batch sampler."""
    vocab = len(tokenizer)
    sampler = BatchSampler([SamplingParams()], "cpu", vocab)
    gen = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for _ in range(max_steps):
        logits = torch.randn(1, vocab, generator=gen) * 5
        tok = sampler(logits, [ids or [0]], [0], allowed=[state.allowed_ids()]).next_ids[0]
        if tok == state.eos_token_id:
            assert state.is_accepting()
            state.advance(tok)
            assert state.is_finished()
            return tokenizer.decode(ids)
        state.advance(tok)
        ids.append(tok)
    raise AssertionError(f"grammar did not finish in {max_steps} steps: {tokenizer.decode(ids)!r}")


def test_vocabulary_maps_byte_level_tokens_to_bytes(tiny_tokenizer):
    vocab = build_vocabulary(tiny_tokenizer)
    assert vocab.get_eos_token_id() == tiny_tokenizer.eos_token_id
    the = tiny_tokenizer.convert_tokens_to_ids("Ġthe")
    assert the != tiny_tokenizer.unk_token_id
    assert the in vocab.get(b" the")
    newline = tiny_tokenizer.convert_tokens_to_ids("Ċ")
    assert newline in vocab.get(b"\n")
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert vocab.get(special) is None


def test_eos_only_in_accepting_states(compiler):
    state = compiler.new_state("regex", "ab?")
    eos = compiler.eos_token_id
    assert eos not in state.allowed_ids().tolist()
    state.advance(compiler.tokenizer.convert_tokens_to_ids("a"))
    allowed = state.allowed_ids().tolist()
    assert eos in allowed and state.is_accepting() and not state.is_finished()
    state.advance(compiler.tokenizer.convert_tokens_to_ids("b"))
    assert state.allowed_ids().tolist() == [eos] and state.is_finished()


@pytest.mark.parametrize(
    "pattern",
    [
        r"\d{3}-[a-z]{2,5}( [A-Z][a-z]{1,6})?",
        r"(yes|no|maybe)!{0,3}",
        r"(🎉|✨|你好){2}[0-9]",
        r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}",
    ],
)
def test_masked_greedy_matches_regex(tiny_tokenizer, compiler, pattern):
    for seed in range(3):
        text = masked_greedy(tiny_tokenizer, compiler.new_state(generate_pb2.GRAMMAR_TYPE_REGEX, pattern), seed)
        assert re.fullmatch(pattern, text), text


def test_masked_greedy_json_validates(tiny_tokenizer, compiler):
    schema_text = json.dumps(PERSON)
    outputs = set()
    for seed in range(4):
        text = masked_greedy(tiny_tokenizer, compiler.new_state(generate_pb2.GRAMMAR_TYPE_JSON, schema_text), seed)
        value = json.loads(text)
        jsonschema.validate(value, PERSON)
        assert re.fullmatch(regex_for("json", schema_text), text)
        outputs.add(text)
    assert len(outputs) > 1  # random logits really explored the grammar


def test_integer_range_regex_is_exact():
    for lo, hi in [(18, 99), (-50, 999), (0, 0), (None, 7), (-3, None), (None, None)]:
        pattern = integer_range_regex(lo, hi)
        for n in range(-1200, 1200):
            inside = (lo is None or n >= lo) and (hi is None or n <= hi)
            assert bool(re.fullmatch(pattern, str(n))) == inside, (lo, hi, n)
        assert not re.fullmatch(pattern, "-0") and not re.fullmatch(pattern, "01")
    with pytest.raises(GrammarError):
        integer_range_regex(5, 4)


def test_compile_cache_is_lru(tiny_tokenizer):
    compiler = GrammarCompiler(tiny_tokenizer, cache_size=2)
    first = compiler.compile("regex", "a+")
    assert compiler.compile(generate_pb2.GRAMMAR_TYPE_REGEX, "a+") is first
    compiler.compile("regex", "b+")
    compiler.compile("regex", "a+")  # touch: "b+" becomes the oldest
    compiler.compile("regex", "c+")
    assert compiler.compile("regex", "a+") is first
    assert len(compiler._cache) == 2 and ("regex", "b+") not in compiler._cache


@pytest.mark.parametrize(
    "grammar_type,value",
    [
        ("regex", "a(?=b)"),
        ("regex", "(unclosed"),
        ("regex", ""),
        ("json", "{not json"),
        ("json", '{"type": "nonsense"}'),
        ("json", '{"type": "integer", "minimum": 5, "maximum": 1}'),
        ("yaml", "a: b"),
    ],
)
def test_invalid_grammars_raise(grammar_type, value):
    with pytest.raises(GrammarError):
        regex_for(grammar_type, value)


def test_regex_for_imports_no_torch():
    code = (
        "import sys; from ember.schema_regex import regex_for; "
        "regex_for('json', '{\"type\": \"integer\"}'); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.slow
def test_compile_times_on_smollm2_vocabulary(smol_tokenizer):
    compiler = GrammarCompiler(smol_tokenizer)
    start = time.perf_counter()
    vocab_size = len(smol_tokenizer)
    compiler.vocabulary  # noqa: B018 - build it once, outside the timings
    print(f"\nvocabulary of {vocab_size} tokens: {time.perf_counter() - start:.2f}s")
    small = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    medium = {k: v for k, v in PERSON.items() if k != "properties"} | {
        "properties": {k: PERSON["properties"][k] for k in ("name", "age", "color")},
        "required": ["name", "age", "color"],
    }
    for name, schema in (("small", small), ("medium", medium), ("large", PERSON)):
        start = time.perf_counter()
        state = compiler.new_state("json", json.dumps(schema))
        print(f"{name} schema compiled in {time.perf_counter() - start:.2f}s")
        text = masked_greedy(smol_tokenizer, state, seed=0)
        jsonschema.validate(json.loads(text), schema)
