"""N-gram speculative decoding (`--speculate`, shard/speculate.py).

The engine is driven in process as the router drives it (a Prefill, then Decodes), once with
speculation and once without: every request must get the same tokens, logprobs, alternatives and
ending, whatever its sampling parameters, while the speculative run takes fewer steps. The prefix
cache must hold only blocks of tokens that were kept. Through the router: /info reports
`speculate`, /metrics the draft and accepted tokens, and streams bring every token once, in order.
"""

from __future__ import annotations

import json

import httpx
import pytest
from servers import router_process, shard_process
from shard_requests import shard_request
from transformers import AutoTokenizer

from ember import prefix
from ember.proto import generate_pb2 as pb
from ember.shard.engine import Engine
from ember.shard.grammar import GrammarCompiler
from ember.shard.runner import load_runner
from ember.shard.speculate import MARGIN, NgramIndex, SpeculationPolicy, StepCosts, update_rate

LOOP = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8] * 3  # a prompt that repeats itself: drafts to find


# ---- the proposer ------------------------------------------------------------------------------------


def test_ngram_index_proposes_what_followed_the_longest_most_recent_match():
    index = NgramIndex(min_n=2, max_n=3)
    ids = [1, 2, 3, 4, 9, 2, 3, 5, 6, 1, 2, 3]
    # The 3-gram (1, 2, 3) occurred at the start: what followed it there, not after the later (2, 3).
    assert index.propose(ids, 3) == [4, 9, 2]
    ids += [7, 2, 3]
    # (7, 2, 3) never occurred and (2, 3) last occurred at the end of the first look-up's suffix.
    assert index.propose(ids, 2) == [7, 2]
    assert index.propose([*ids, 42, 43], 4) == []  # no earlier (42, 43)
    assert NgramIndex().propose([1, 2, 3], 0) == []


def test_ngram_index_follows_the_passage_being_copied():
    """Once a copy is under way it goes on from where it was, even where its last tokens occur again
    later (a phrase the passage repeats); when the output leaves the passage, the look-up starts over."""
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 4, 5, 6, 40, 1, 2]
    index = NgramIndex()
    assert index.propose(ids, 4) == [3, 4, 5, 6]
    ids += [3, 4, 5, 6]
    assert index.propose(ids, 3) == [7, 8, 9]
    assert NgramIndex().propose(ids, 3) == [40, 1, 2]  # the most recent (3, 4, 5, 6), without the copy
    ids += [7, 99]
    assert index.propose(ids, 3) == []


# ---- the policy --------------------------------------------------------------------------------------


def _costs(plain: list[float], drafted: list[float]) -> StepCosts:
    return StepCosts([1, 4, 16], plain, drafted, draft=4)


def test_policy_drafts_where_a_token_row_is_cheap_and_not_where_it_costs_what_it_brings():
    flat = SpeculationPolicy(4, _costs([0.010, 0.011, 0.015], [0.011, 0.013, 0.040]))
    assert flat.plan(1, 0, [(0.8, 4)]) == [4]  # 4 tokens for 10% more time
    assert flat.plan(1, 0, [(0.0, 4)]) == [0]  # never accepted: nothing to gain
    # At 16 rows a draft token costs (0.040 - 0.015) / 64 s, more than a plain row brings at rate 0.3.
    assert flat.plan(16, 0, [(0.3, 4)] * 16) == [0] * 16
    # Likelier drafts first: the rows whose drafts hold more often get the tokens.
    mixed = flat.plan(16, 0, [(0.95, 4), (0.2, 4)])
    assert mixed[0] > 0 and mixed[0] >= mixed[1]


def test_policy_wants_its_margin_and_drafts_whole_without_measurements():
    # One draft token costs 4% of a step: at 4.5% acceptance it gains less than the margin, at 90% more.
    policy = SpeculationPolicy(1, StepCosts([1, 2], [1.0, 1.04], [1.04, 1.12], draft=1))
    assert 1.045 / 1.04 < 1 + MARGIN < 1.9 / 1.04
    assert policy.plan(1, 0, [(0.045, 1)]) == [0]
    assert policy.plan(1, 0, [(0.9, 1)]) == [1]
    # A draft token is charged at least what one more row costs, whatever a noisy measurement said.
    noisy = SpeculationPolicy(4, StepCosts([1, 2], [1.0, 2.0], [1.0, 2.0], draft=4))
    assert noisy.costs.per_draft_token(1) == 1.0 and noisy.plan(1, 0, [(0.9, 4)]) == [0]
    assert SpeculationPolicy(3).plan(2, 0, [(0.1, 3), (0.1, 2)]) == [3, 2]
    assert not SpeculationPolicy(0).enabled


def test_acceptance_rate_counts_accepted_tokens_and_the_first_rejection():
    assert update_rate(0.5, 4, 4) > update_rate(0.5, 2, 4) > update_rate(0.5, 0, 4)
    assert update_rate(0.5, 2, 2) > update_rate(0.5, 2, 3)  # stopped at 2 vs rejected the third
    assert update_rate(0.5, 2, 3) == update_rate(0.5, 2, 4)  # tokens after the first rejection are unseen
    assert update_rate(0.5, 0, 1) < 0.5 < update_rate(0.5, 1, 1)


# ---- the engine: the same outputs, fewer steps ---------------------------------------------------------


@pytest.fixture(scope="module")
def parts(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    return tokenizer, GrammarCompiler(tokenizer)


def _engine(model_dir, parts, speculate: int) -> Engine:
    tokenizer, grammar = parts
    runner = load_runner(model_dir, dtype="float32", device="cpu")
    return Engine(runner, tokenizer, grammar, prefill_chunk=16, speculate=speculate)


def _run(engine: Engine, requests: list[pb.Request], cancel: tuple[int, int] | None = None):
    """Prefill then Decodes to the end; `cancel` = (step, request id) drops that request there.
    Returns each request's generations merged, the steps taken and the draft / accepted totals."""
    out: dict[int, dict] = {}
    reply = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=requests)))
    steps, drafted, accepted = 1, 0, 0
    while True:
        drafted += reply.draft_tokens
        accepted += reply.accepted_tokens
        for g in reply.generations:
            o = out.setdefault(g.request_id, {"ids": [], "logprobs": [], "texts": [], "top": [], "end": None})
            o["ids"] += g.tokens.ids
            o["logprobs"] += g.tokens.logprobs
            o["texts"] += g.tokens.texts
            o["top"] += [list(t.ids) for t in g.top_tokens]
            if g.HasField("generated_text"):
                o["end"] = (g.generated_text.text, g.generated_text.finish_reason, g.generated_text.generated_tokens)
        if not reply.HasField("batch"):
            return out, steps, drafted, accepted
        batch = reply.batch
        if cancel is not None and steps == cancel[0]:
            batch = engine.filter(batch.id, [i for i in batch.request_ids if i != cancel[1]])
            if batch is None:
                return out, steps, drafted, accepted
        reply = engine.decode(pb.DecodeRequest(batches=[batch]))
        steps += 1


def _requests() -> list[pb.Request]:
    stop = pb.Request(
        id=7,
        input_ids=LOOP,
        parameters=pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=40, stop_sequences=["zzz-never", "kkkkk"]),
    )
    return [
        shard_request(1, LOOP, 40),
        shard_request(2, LOOP, 30, do_sample=True, seed=7, temperature=0.3),
        shard_request(8, LOOP[:17], 30, do_sample=True, seed=7, temperature=0.9),
        shard_request(3, LOOP, 25, repetition_penalty=1.02, frequency_penalty=0.01),
        pb.Request(
            id=4,
            input_ids=LOOP,
            top_n_tokens=3,
            parameters=pb.NextTokenChooserParameters(temperature=0.3, top_p=1.0, typical_p=1.0, top_k=5, seed=11),
            stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=20, ignore_eos_token=True),
        ),
        shard_request(
            5, LOOP, 30, do_sample=True, seed=3, top_k=4, temperature=0.5, penalty_window=8, presence_penalty=0.1
        ),
        shard_request(6, [*LOOP, 11, 12], 12, grammar_type=pb.GRAMMAR_TYPE_REGEX, grammar="[a-e ]{4,40}"),
        stop,
    ]


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for rid in a:
        assert a[rid]["ids"] == b[rid]["ids"], rid
        assert a[rid]["texts"] == b[rid]["texts"], rid
        assert a[rid]["top"] == b[rid]["top"], rid
        assert a[rid]["end"] == b[rid]["end"], rid
        assert a[rid]["logprobs"] == pytest.approx(b[rid]["logprobs"], abs=1e-4), rid


def test_speculation_changes_no_output_and_saves_steps(tiny_llama_dir, parts):
    plain, plain_steps, drafted0, _ = _run(_engine(tiny_llama_dir, parts, 0), _requests())
    fast, fast_steps, drafted, accepted = _run(_engine(tiny_llama_dir, parts, 4), _requests())
    _same(plain, fast)
    assert drafted0 == 0
    assert 0 < accepted <= drafted
    assert fast_steps < plain_steps
    assert all(o["end"] is not None for o in fast.values())
    # Seeded sampling and a stop sequence met inside an accepted draft, each alone: drafts held, outputs equal.
    for request in _requests():
        if request.id in (5, 7):
            alone, _, _, accepted = _run(_engine(tiny_llama_dir, parts, 4), [request])
            assert accepted > 0
            _same({request.id: alone[request.id]}, {request.id: plain[request.id]})
    assert plain[7]["end"][1] == pb.FINISH_REASON_STOP_SEQUENCE


def test_the_prefix_cache_holds_only_kept_tokens(tiny_llama_dir, parts):
    """Blocks named during a speculative run are those of the final sequences' tokens, and a prompt that
    resends a whole conversation takes them from the cache and goes on as without speculation."""
    engine = _engine(tiny_llama_dir, parts, 4)
    first, _, _, accepted = _run(engine, [shard_request(1, LOOP, 45)])
    assert accepted > 0
    alloc = engine.runner.cache.allocator
    full = LOOP + first[1]["ids"]
    bs = engine.runner.block_size
    kept = set(prefix.extend([], full, bs, len(full) // bs))
    assert alloc.num_cached > 0 and set(alloc._by_name) <= kept
    again = [*full, *first[1]["ids"][:5]]
    cached, _, _, _ = _run(engine, [shard_request(2, again, 20)])
    fresh, _, _, _ = _run(_engine(tiny_llama_dir, parts, 0), [shard_request(2, again, 20)])
    _same(cached, fresh)


def test_cancelling_mid_run_leaves_the_others_as_they_were(tiny_llama_dir, parts):
    plain, _, _, _ = _run(_engine(tiny_llama_dir, parts, 0), _requests(), cancel=(3, 1))
    fast, _, _, _ = _run(_engine(tiny_llama_dir, parts, 4), _requests(), cancel=(3, 1))
    assert plain[1]["end"] is None and fast[1]["end"] is None
    del plain[1], fast[1]
    _same(plain, fast)


def test_drafts_never_take_a_request_past_its_tokens(tiny_llama_dir, parts):
    engine = _engine(tiny_llama_dir, parts, 8)
    for max_new in (1, 2, 3, 5):
        out, _, _, _ = _run(engine, [shard_request(1, LOOP, max_new)])
        assert len(out[1]["ids"]) == max_new
    assert engine.runner.cache.allocator.num_free == engine.runner.cache.num_blocks


def test_warmup_measures_step_costs_and_info_reports_speculate(tiny_llama_dir, parts):
    warmup = pb.WarmupRequest(batch=pb.Batch(id=9, requests=[shard_request(1, [1] * 8, 2)]))
    tokenizer, grammar = parts
    runner = load_runner(tiny_llama_dir, dtype="float32")
    always = Engine(runner, tokenizer, grammar, speculate=3, measure_speculation=False)
    always.warmup(warmup)
    assert always.ctx.speculation.costs is None  # `--speculate-policy always`: every draft, nothing measured
    engine = _engine(tiny_llama_dir, parts, 3)
    engine.warmup(warmup)
    costs = engine.ctx.speculation.costs
    assert costs is not None and costs.batch[0] == 1 and len(costs.plain) == len(costs.batch)
    assert all(t > 0 for t in costs.plain + costs.drafted)
    assert engine.info().speculate == 3
    assert engine.runner.cache.allocator.num_free == engine.runner.cache.num_blocks  # the timing blocks went back
    assert _engine(tiny_llama_dir, parts, 0).info().speculate == 0


# ---- through the router ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def url(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("speculate-e2e")
    # `always`: every draft verified, whatever the warmup measured on a loaded machine.
    with shard_process(tiny_llama_dir, str(tmp / "s"), "--speculate", "4", "--speculate-policy", "always") as socket:
        with router_process(socket, tiny_llama_dir) as url:
            yield url


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_router_reports_speculation_and_streams_every_token_in_order(url):
    assert httpx.get(url + "/info", timeout=10).json()["speculate"] == 4
    prompt = "a b c d e a b c d e a b c d e a b c d e"
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 40, "details": True, "decoder_input_details": False}}
    drafted = _metric(url, "ember_speculative_draft_tokens")
    whole = httpx.post(url + "/generate", json=body, timeout=60).json()
    assert _metric(url, "ember_speculative_draft_tokens") > drafted
    assert _metric(url, "ember_speculative_accepted_tokens") > 0
    with httpx.stream("POST", url + "/generate_stream", json=body, timeout=60) as response:
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    assert [e["token"]["id"] for e in events] == [t["id"] for t in whole["details"]["tokens"]]
    assert events[-1]["generated_text"] == whole["generated_text"]
    assert whole["details"]["generated_tokens"] == 40
