"""Router pieces on their own: body parsing, validation (real tokenizer), queue, limits, metrics."""

from __future__ import annotations

import asyncio
import sys

import pytest

from ember.router.errors import BodyError, ValidationError
from ember.router.limits import Limits, LimitsError, apply_capacity, resolve_pre_warmup
from ember.router.metrics import Metrics
from ember.router.queue import Entry, Queue
from ember.router.tokenizer import TokenizerPool
from ember.router.types import GenerateParameters, GenerateRequest, request_from_tgi
from ember.router.validation import Validator


def test_router_imports_no_torch():
    import subprocess

    code = "import ember.router.app, ember.router.cli, sys; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.fixture(scope="module")
def validator(tiny_llama_dir):
    limits = Limits(max_input_tokens=20, max_total_tokens=32, max_batch_prefill_tokens=64, max_batch_total_tokens=256)
    pool = TokenizerPool(str(tiny_llama_dir), 2)
    yield Validator(pool, limits)
    pool.close()


def _validate(validator, inputs="Hello world", stream=False, **params):
    req = GenerateRequest(inputs, GenerateParameters(**params))
    return asyncio.run(validator.validate(req, stream))


@pytest.mark.parametrize(
    "params,message",
    [
        ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
        ({"best_of": 2, "do_sample": True, "seed": 3}, "`seed` must not be set when `best_of` > 1"),
        ({"best_of": 3, "do_sample": True}, "`best_of` must be > 0 and <= 2. Given: 3"),
        ({"temperature": 0.0}, "`temperature` must be strictly positive"),
        ({"repetition_penalty": 0.0}, "`repetition_penalty` must be strictly positive"),
        ({"frequency_penalty": 2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"top_p": 0.0}, "`top_p` must be > 0.0 and <= 1.0"),
        ({"top_p": 1.5}, "`top_p` must be > 0.0 and <= 1.0"),
        ({"typical_p": 0.0}, "`typical_p` must be > 0.0 and <= 1.0"),
        ({"top_k": 0}, "`top_k` must be strictly positive"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"stop": ["a"] * 5}, "`stop` supports up to 4 stop sequences. Given: 5"),
        ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
        ({"truncate": 21}, "`truncate` must be strictly positive and less than 20. Given: 21"),
        (
            {"max_new_tokens": 31},
            "`inputs` tokens + `max_new_tokens` must be <= 32. Given: 2 `inputs` tokens and 31 `max_new_tokens`",
        ),
        ({"grammar": None, "decoder_input_details": True}, None),
    ],
)
def test_validation_messages(validator, params, message):
    if message is None:
        assert _validate(validator, **params).decoder_input_details
        return
    with pytest.raises(ValidationError) as info:
        _validate(validator, **params)
    assert info.value.message == f"Input validation error: {message}"
    assert info.value.status == 422


def test_validation_input_rules(validator):
    with pytest.raises(ValidationError, match="`inputs` cannot be empty"):
        _validate(validator, inputs="")
    word = "Hello world "
    reps = next(n for n in range(1, 40) if len(validator.tokenizer.encode_sync(word * n).ids) > 20)
    assert len(validator.tokenizer.encode_sync(word * reps).ids) < 31
    with pytest.raises(ValidationError, match="must have less than 20 tokens"):
        _validate(validator, inputs=word * reps, max_new_tokens=1)
    with pytest.raises(ValidationError, match="not supported when streaming"):
        _validate(validator, stream=True, decoder_input_details=True)
    with pytest.raises(ValidationError, match="`best_of` != 1 is not supported when streaming"):
        _validate(validator, stream=True, best_of=2, do_sample=True)


def test_validation_defaults_and_truncate(validator):
    v = _validate(validator, top_p=1.0)  # accepted as "off"
    assert v.parameters.top_p == 1.0 and not v.parameters.do_sample
    assert v.max_new_tokens == 32 - v.input_length  # TGI: max_total - input when unset
    a, b = _validate(validator), _validate(validator)
    assert a.seed != b.seed  # random per request
    assert _validate(validator, temperature=0.5).parameters.do_sample
    long = "Hello world " * 15
    t = _validate(validator, inputs=long, truncate=5, max_new_tokens=2)
    full = validator.tokenizer.encode_sync(long).ids
    assert t.input_ids == full[-5:]


def test_validation_grammar(validator):
    v = _validate(
        validator,
        grammar=request_from_tgi(
            {
                "inputs": "x",
                "parameters": {"grammar": {"type": "json", "value": {"properties": {"a": {"type": "integer"}}}}},
            }
        ).parameters.grammar,
    )
    assert v.parameters.grammar_type == 2 and '"a"' in v.parameters.grammar
    bad = request_from_tgi({"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "(("}}})
    with pytest.raises(ValidationError, match="grammar is not valid"):
        _validate(validator, grammar=bad.parameters.grammar)


def test_body_parsing():
    assert request_from_tgi({"inputs": "x"}).parameters.do_sample  # no parameters: TGI's defaults
    assert not request_from_tgi({"inputs": "x", "parameters": {}}).parameters.do_sample
    for body in (
        {},
        {"inputs": 3},
        {"inputs": "x", "parameters": {"top_k": "a"}},
        {"inputs": "x", "parameters": {"max_new_tokens": -1}},
        {"inputs": "x", "parameters": {"do_sample": None}},
        [],
    ):
        with pytest.raises(BodyError):
            request_from_tgi(body)


class _Req:
    def __init__(self, n_input: int, n_new: int) -> None:
        self.input_length, self.budget = n_input, n_input + n_new


def _entry(n_input: int, n_new: int) -> Entry:
    e = Entry.__new__(Entry)
    e.request, e.cancelled, e.prefix_names = _Req(n_input, n_new), False, []
    return e


def test_queue_budgets_order_and_min_size():
    q = Queue()
    a, b, c = _entry(10, 10), _entry(10, 10), _entry(30, 10)
    for e in (a, b, c):
        q.append(e)
    assert q.next_batch(None, None, prefill_budget=25, token_budget=1000) == [a, b]
    assert q.next_batch(2, None, 1000, 1000) == []  # only one waits: put back
    assert len(q) == 1
    assert q.next_batch(None, None, 1000, token_budget=39) == []  # budget input + max_new
    assert q.next_batch(None, None, 1000, 40) == [c]
    d, e = _entry(1, 1), _entry(1, 1)
    q.append(d), q.append(e)
    d.cancelled = True
    assert q.next_batch(None, 1, 1000, 1000) == [e] and q.dropped == 1


def test_queue_step_prefill_spreads_a_burst_and_always_takes_one():
    q = Queue()
    burst = [_entry(64, 8) for _ in range(5)]
    big = _entry(300, 8)
    for e in (*burst, big):
        q.append(e)
    assert q.next_batch(None, None, 4096, 10_000, step_prefill=128) == burst[:2]
    assert q.next_batch(None, None, 4096, 10_000, step_prefill=150) == burst[2:4]
    # the soft budget never blocks a lone prompt longer than it, but stops the next one
    assert q.next_batch(None, None, 4096, 10_000, step_prefill=100) == [burst[4]]
    assert q.next_batch(None, None, 4096, 10_000, step_prefill=100) == [big]
    # the hard budgets still apply to the first entry
    late = _entry(200, 8)
    q.append(late)
    assert q.next_batch(None, None, 150, 10_000, step_prefill=100) == [] and len(q) == 1


def test_limits_rules():
    with pytest.raises(LimitsError, match="max_input_tokens"):
        Limits(max_input_tokens=10, max_total_tokens=10).check()
    with pytest.raises(LimitsError, match="max_batch_prefill_tokens"):
        Limits(max_input_tokens=100, max_total_tokens=200, max_batch_prefill_tokens=50).check()
    with pytest.raises(LimitsError, match="max_batch_total_tokens"):
        Limits(max_input_tokens=10, max_total_tokens=200, max_batch_total_tokens=100).check()
    assert resolve_pre_warmup(None, None, None, 512) == (511, 512, 561)
    assert resolve_pre_warmup(None, None, None, 131072)[1] == 4096
    lim = Limits(max_input_tokens=511, max_total_tokens=512)
    with pytest.raises(LimitsError, match="Not enough memory to handle `max_total_tokens=512`"):
        apply_capacity(lim, 256, total_given=True, batch_total=None)
    apply_capacity(lim, 256, total_given=False, batch_total=None)
    assert (lim.max_total_tokens, lim.max_input_tokens, lim.max_batch_total_tokens) == (256, 255, 256)


def test_metrics_text_format():
    from prometheus_client.parser import text_string_to_metric_families

    m = Metrics(100, 200)
    m.request_count.inc()
    m.request_failure.inc("overloaded")
    m.request_duration.observe(0.01)
    m.batch_inference_duration.observe(0.5, "decode")
    text = m.render()
    assert "\ntgi_request_count 1\n" in text and "# TYPE tgi_request_count counter" in text
    assert 'tgi_request_failure{err="overloaded"} 1' in text
    assert 'tgi_batch_inference_duration_count{method="decode"} 1' in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    buckets = [s for s in families["tgi_request_duration"].samples if s.name.endswith("_bucket")]
    assert len(buckets) == 36  # 35 geometric buckets + Inf
    assert families["tgi_request_input_length"].type == "histogram"


def test_ignore_eos_is_accepted_on_tgi_bodies(validator):
    params = request_from_tgi({"inputs": "x", "parameters": {"ignore_eos": True, "max_new_tokens": 5}}).parameters
    assert params.ignore_eos
    assert _validate(validator, ignore_eos=True, max_new_tokens=5).stopping.ignore_eos_token
    assert not _validate(validator, max_new_tokens=5).stopping.ignore_eos_token
    with pytest.raises(BodyError):
        request_from_tgi({"inputs": "x", "parameters": {"ignore_eos": "yes"}})


def test_an_entry_delivers_its_generations_in_order_to_a_waiting_reader():
    from ember.router.queue import Channel

    async def scenario():
        channel = Channel()
        reader = asyncio.ensure_future(channel.get())
        await asyncio.sleep(0)
        channel.put_nowait(1)
        channel.put_nowait(2)
        first = await reader
        channel.put_nowait(3)
        rest = [await channel.get(), await channel.get()]
        waiting = asyncio.ensure_future(channel.get())
        await asyncio.sleep(0)
        waiting.cancel()  # a reader that leaves does not swallow the next item
        await asyncio.gather(waiting, return_exceptions=True)
        channel.put_nowait(4)
        return first, rest, channel.get_nowait(), channel.empty()

    assert asyncio.run(scenario()) == (1, [2, 3], 4, True)


def test_short_texts_are_encoded_on_the_loop_and_long_ones_on_the_pool(tiny_llama_dir):
    from ember.router.tokenizer import INLINE_CHARS

    pool = TokenizerPool(str(tiny_llama_dir), 1)
    short, long = "Hello world, " * 3, "Hello world, " * (INLINE_CHARS // 13 + 1)
    expected = {t: pool.encode_sync(t) for t in (short, long)}
    assert len(short) <= INLINE_CHARS < len(long)
    assert asyncio.run(pool.encode(long)).ids == expected[long].ids
    pool.close()  # no worker left: only the loop can still encode
    enc = asyncio.run(pool.encode(short))
    assert enc.ids == expected[short].ids and enc.offsets == expected[short].offsets
    assert all(short[a:b] for a, b in enc.offsets[1:])  # character spans of the text
    with pytest.raises(RuntimeError):
        asyncio.run(pool.encode(long))
