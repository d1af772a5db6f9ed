"""Bad input never reaches the shards as a 500, and a client that leaves never costs anyone else.

Found by an acceptance review that fuzzed the live routes: values outside the
shards' u32/u64 proto fields, lone surrogates, NaN, deep nesting and odd
`tool_choice` shapes used to be 500s, and a negative `top_logprobs` crashed
the batching step, failing every running request and leaving its KV blocks
cached on the shard.
"""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from servers import router_process, shard_process

from ember.proto import generate_pb2 as pb
from ember.router.api.openai import tools
from ember.router.api.openai.chat import _message
from ember.router.batcher import Batcher
from ember.router.cli import warmup_request
from ember.router.client import ShardedClient
from ember.router.errors import BodyError, GenerationError, ValidationError
from ember.router.grammar import compile_grammar
from ember.router.limits import Limits
from ember.router.metrics import Metrics
from ember.router.queue import Entry
from ember.router.tokenizer import TokenizerPool
from ember.router.types import GenerateParameters, GenerateRequest, Grammar, parse_json
from ember.router.validation import Validator

HI = [{"role": "user", "content": "hi"}]
LIMITS = dict(max_input_tokens=20, max_total_tokens=64, max_batch_prefill_tokens=64, max_batch_total_tokens=512)


@pytest.fixture(scope="module")
def pool(tiny_llama_dir):
    pool = TokenizerPool(str(tiny_llama_dir), 1)
    yield pool
    pool.close()


def _validate(pool, **params):
    validator = Validator(pool, Limits(**LIMITS))
    return asyncio.run(validator.validate(GenerateRequest("Hello world", GenerateParameters(**params))))


@pytest.mark.parametrize(
    "params,fragment",
    [
        ({"seed": 2**64}, "`seed` must be >= 0"),
        ({"seed": -1}, "`seed` must be >= 0"),
        ({"top_k": 2**32}, "`top_k` must be <="),
        ({"max_new_tokens": -5}, "`max_new_tokens` must be strictly positive"),
        ({"max_new_tokens": 4, "min_new_tokens": 5}, "`min_new_tokens` must be >= 0 and <= `max_new_tokens`"),
        ({"min_new_tokens": -1}, "`min_new_tokens` must be >= 0"),
        ({"top_n_tokens": -1}, "`top_n_tokens` must be >= 0 and <= 5"),
        ({"logit_bias": {-5: 1.0}}, "`logit_bias` keys must be token ids >= 0"),
        ({"logit_bias": {2**40: 1.0}}, "`logit_bias` keys must be token ids >= 0"),
        ({"truncate": -3}, "`truncate` must be strictly positive"),
    ],
)
def test_values_outside_the_proto_fields_are_422(pool, params, fragment):
    with pytest.raises(ValidationError) as info:
        _validate(pool, **params)
    assert fragment in info.value.message and info.value.status == 422


def test_values_at_the_proto_limits_are_accepted(pool):
    v = _validate(pool, seed=2**64 - 1, top_k=2**32 - 1, max_new_tokens=4, min_new_tokens=4, logit_bias={0: 1.0})
    assert v.parameters.seed == 2**64 - 1 and v.stopping.min_new_tokens == 4


@pytest.mark.parametrize(
    "raw",
    [
        b'{"inputs": "\\ud800"}',  # a lone surrogate: no tokenizer or encoder takes it
        b'{"inputs": "x", "parameters": {"temperature": NaN}}',
        b'{"inputs": "x", "parameters": {"temperature": Infinity}}',
        b"[" * 100_000,  # nesting beyond Python's recursion limit
    ],
)
def test_bodies_python_accepts_but_json_does_not_are_422(raw):
    with pytest.raises(BodyError):
        parse_json(raw)


def test_paired_surrogates_are_fine():
    assert parse_json(b'{"inputs": "\\ud83d\\ude00"}') == {"inputs": "\U0001f600"}


def test_deeply_nested_schema_is_422():
    schema: dict = {"type": "string"}
    for _ in range(300):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    with pytest.raises(ValidationError, match="nested too deeply"):
        compile_grammar(Grammar("json", schema), validate=False)


@pytest.mark.parametrize("choice", [{"type": "function", "function": "f"}, {"function": 5}])
def test_tool_choice_with_a_non_object_function_is_422(choice):
    fns = [{"type": "function", "function": {"name": "f"}}]
    with pytest.raises(tools.ToolError):
        tools.plan(fns, choice, None)


def test_past_tool_call_with_a_non_object_function_renders():
    msg = _message({"role": "assistant", "content": "", "tool_calls": [{"function": "x"}]}, 0)
    assert msg["content"] == '{"name": "None", "arguments": None}'


# ---- live: router + shard ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def socket(tiny_llama_dir, tmp_path_factory):
    with shard_process(tiny_llama_dir, str(tmp_path_factory.mktemp("robust") / "s")) as path:
        yield path


FUZZ = [
    ("/generate", {"inputs": "hi", "parameters": {"seed": 2**70}}),
    ("/generate", {"inputs": "hi", "parameters": {"top_k": 2**40}}),
    ("/generate", {"inputs": "hi", "parameters": {"grammar": {"type": "json", "value": {"$ref": "#/x"}}}}),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": -5}),
    ("/v1/chat/completions", {"messages": HI, "seed": -1, "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": HI, "min_tokens": 2**40, "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": HI, "logit_bias": {"-5": 1}, "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": HI, "logprobs": True, "top_logprobs": -1, "max_tokens": 2}),
    (
        "/v1/chat/completions",
        {
            "messages": HI,
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": "f"},
        },
    ),
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}),
]


def test_fuzzed_bodies_are_4xx_and_running_requests_survive(socket, tiny_llama_dir):
    async def scenario(url: str):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            body = {"inputs": "Hello", "parameters": {"max_new_tokens": 200, "ignore_eos": True}}
            async with client.stream("POST", "/generate_stream", json=body) as running:
                lines = running.aiter_lines()
                while not (await lines.__anext__()).startswith("data:"):
                    pass  # the long request is decoding
                statuses = [(await client.post(path, json=b)).status_code for path, b in FUZZ]
                rest = [line async for line in lines if line.startswith("data:")]
            ok = await client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
            return statuses, rest, ok

    with router_process(socket, tiny_llama_dir) as url:
        statuses, rest, ok = asyncio.run(scenario(url))
    assert all(s == 422 for s in statuses), list(zip(statuses, FUZZ))
    assert '"generated_tokens": 200' in rest[-1] and ok.status_code == 200


# ---- the batching task, in process, over a real shard ----------------------------------------------


async def _batcher(socket: str, pool: TokenizerPool, with_running: bool = False) -> tuple[Batcher, Validator]:
    client = await ShardedClient.connect(socket)
    limits = Limits(**LIMITS)
    await client.clear_cache()
    await client.warmup(warmup_request(pool, limits))
    batcher = Batcher(
        client, limits, Metrics(limits.max_input_tokens, limits.max_total_tokens), shared_prefill=with_running
    )
    batcher.start()
    return batcher, Validator(pool, limits)


async def _until(predicate) -> None:
    """Poll the batcher's state (it changes only on the event loop) with a deadline."""
    async with asyncio.timeout(30):
        while not predicate():
            await asyncio.sleep(0.005)


def test_cancel_while_a_request_finishes_in_prefill_is_a_drop_not_a_lost_request(socket, pool, caplog):
    async def scenario():
        batcher, validator = await _batcher(socket, pool)
        try:
            valid = await validator.validate(GenerateRequest("Hello", GenerateParameters(max_new_tokens=1)))
            entry = Entry(valid)
            prefill = batcher.client.prefill

            async def prefill_while_the_client_leaves(batch, cached=None, **kw):
                call = asyncio.ensure_future(prefill(batch, cached, **kw))
                batcher.cancel(entry)  # the client leaves while its only token is being computed
                return await call

            batcher.client.prefill = prefill_while_the_client_leaves
            batcher.append(entry)
            prefilled = batcher.metrics.batch_inference_success
            await _until(lambda: not batcher.scheduler.running and prefilled.get("prefill"))
            return batcher.metrics.request_failure.get("dropped")
        finally:
            await batcher.stop()
            await batcher.client.close()

    with caplog.at_level(logging.ERROR, logger="ember.router.batcher"):
        dropped = asyncio.run(scenario())
    assert dropped == 1
    assert not [r for r in caplog.records if "missing from the shard" in r.getMessage()]


def test_a_running_request_cancelled_during_a_shared_prefill_is_dropped_and_the_newcomer_finishes(socket, pool, caplog):
    async def scenario():
        batcher, validator = await _batcher(socket, pool, with_running=True)
        try:
            long = GenerateParameters(max_new_tokens=40, ignore_eos=True)
            running = Entry(await validator.validate(GenerateRequest("Hello", long)))
            batcher.append(running)
            await running.events.get()  # it is decoding
            short = GenerateParameters(max_new_tokens=3, ignore_eos=True)
            newcomer = Entry(await validator.validate(GenerateRequest("Hi there", short)))
            prefill, carried = batcher.client.prefill, []

            async def the_running_client_leaves(batch, cached=None, **kw):
                carried.append(None if cached is None else list(cached.request_ids))
                call = asyncio.ensure_future(prefill(batch, cached, **kw))
                batcher.cancel(running)  # while its token is computed beside the newcomer's prompt
                return await call

            batcher.client.prefill = the_running_client_leaves
            batcher.append(newcomer)
            events = [await newcomer.events.get()]
            while not isinstance(events[-1], Exception) and not events[-1].HasField("generated_text"):
                events.append(await newcomer.events.get())
            await _until(lambda: not batcher.scheduler.running)
            return carried, running.id, events, batcher.metrics.request_failure.get("dropped")
        finally:
            await batcher.stop()
            await batcher.client.close()

    with caplog.at_level(logging.ERROR, logger="ember.router.batcher"):
        carried, running_id, events, dropped = asyncio.run(scenario())
    assert carried == [[running_id]]  # one Prefill carried the running batch
    assert not any(isinstance(e, Exception) for e in events)
    assert events[-1].generated_text.generated_tokens == 3 and len(events) == 3
    assert dropped == 1
    assert not [r for r in caplog.records if "missing from the shard" in r.getMessage()]


def test_a_crash_in_the_batching_step_frees_the_running_batch_on_the_shard(socket, pool):
    async def scenario():
        batcher, validator = await _batcher(socket, pool)
        try:
            params = GenerateParameters(max_new_tokens=40, ignore_eos=True)
            running = Entry(await validator.validate(GenerateRequest("Hello", params)))
            batcher.append(running)
            first = await running.events.get()
            # A request the validator would refuse: building its proto raises inside the batching task.
            bad = Entry(await validator.validate(GenerateRequest("Hi", GenerateParameters(max_new_tokens=2))))
            bad.request.top_n_tokens = -1
            batcher.append(bad)
            failed = await running.events.get()
            while not isinstance(failed, Exception):
                failed = await running.events.get()
            cached = pb.CachedBatch(id=0, request_ids=[running.id], size=1, max_tokens=running.budget)
            with pytest.raises(Exception) as gone:
                await batcher.client.decode([cached])
            return first, failed, gone.value
        finally:
            await batcher.stop()
            await batcher.client.close()

    first, failed, gone = asyncio.run(scenario())
    assert list(first.tokens.ids)  # it was decoding
    assert isinstance(failed, GenerationError)
    assert "batch 0" in str(gone) or "NOT_FOUND" in str(gone)


def test_a_steps_tokens_reach_their_requests_after_the_next_call_is_sent(socket, pool):
    """Every SSE write waits behind the hand-over that wakes it: tokens go out once the shard
    has its next step, and the last one still arrives when no call follows it."""

    async def scenario():
        batcher, validator = await _batcher(socket, pool)
        try:
            params = GenerateParameters(max_new_tokens=5, ignore_eos=True)
            entry = Entry(await validator.validate(GenerateRequest("Hello", params)))
            log: list[str] = []
            send, stub = entry.send, batcher.client.shards[0].stub
            decode = stub.Decode
            entry.send = lambda item: (log.append("token"), send(item))
            stub.Decode = lambda request, **kw: (log.append("decode"), decode(request, **kw))[1]
            batcher.append(entry)
            events = [await entry.events.get()]
            while not isinstance(events[-1], Exception) and not events[-1].HasField("generated_text"):
                events.append(await entry.events.get())
            return log, events
        finally:
            await batcher.stop()
            await batcher.client.close()

    log, events = asyncio.run(scenario())
    assert not any(isinstance(e, Exception) for e in events) and len(events) == 5
    # Prefill gave the first token, four Decodes the rest; each token is handed over after the next call.
    assert log == ["decode", "token"] * 4 + ["token"]
