"""BatchSampler: each stage against a hand computation, and per-request state across batch changes."""

from __future__ import annotations

import math

import pytest
import torch

from ember.proto import generate_pb2
from ember.shard.sampling import (
    WATERMARK_DELTA,
    BatchSampler,
    SamplingParams,
    _green_list,
    prompt_logprobs,
)

V = 8
CPU = torch.device("cpu")


def probs_logits(probs: list[float]) -> torch.Tensor:
    """Logits whose softmax is `probs` (zeros get a very negative logit)."""
    return torch.tensor([[math.log(p) if p > 0 else -1e9 for p in probs]], dtype=torch.float32)


def run(params: list[SamplingParams], logits: torch.Tensor, token_ids=None, prompt_lens=None, **kw):
    n = logits.shape[0]
    token_ids = token_ids if token_ids is not None else [[0] for _ in range(n)]
    prompt_lens = prompt_lens if prompt_lens is not None else [len(t) for t in token_ids]
    sampler = BatchSampler(params, CPU, logits.shape[1])
    return sampler(logits, token_ids, prompt_lens, **kw)


def support(params: SamplingParams, logits: torch.Tensor, draws: int = 200) -> set[int]:
    """Tokens drawn over many seeds: the support left by the warpers."""
    seen = set()
    for seed in range(draws):
        p = SamplingParams(**{**params.__dict__, "seed": seed, "do_sample": True})
        seen.add(run([p], logits).next_ids[0])
    return seen


def test_greedy_is_argmax_with_log_softmax_logprob():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    res = run([SamplingParams()] * 3, logits, top_n=[0, 2, 3])
    assert res.next_ids == logits.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1).max(-1).values
    assert res.logprobs == pytest.approx(expected.tolist(), abs=1e-6)
    assert res.top_ids[0] == [] and len(res.top_ids[1]) == 2 and len(res.top_ids[2]) == 3
    order = torch.log_softmax(logits[2], -1).argsort(descending=True)[:3].tolist()
    assert res.top_ids[2] == order
    assert res.top_logprobs[2][0] == pytest.approx(res.logprobs[2], abs=1e-6)


def test_logits_are_not_modified():
    logits = torch.randn(2, V)
    before = logits.clone()
    run(
        [SamplingParams(temperature=0.5, top_k=2, do_sample=True), SamplingParams(repetition_penalty=2.0)],
        logits,
        token_ids=[[1, 2], [3]],
    )
    assert torch.equal(logits, before)


def test_repetition_penalty_tgi_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 0.0, 0.0, 0.0]])
    res = run([SamplingParams(repetition_penalty=2.0)], logits, token_ids=[[0, 1]], top_n=[V])
    # token 0: 2.0/2 = 1.0 ; token 1: -2.0*2 = -4.0 ; others unchanged
    processed = torch.tensor([1.0, -4.0, 1.0, -1.0, 0.5, 0.0, 0.0, 0.0])
    expected = torch.log_softmax(processed, -1)
    got = dict(zip(res.top_ids[0], res.top_logprobs[0]))
    assert got[0] == pytest.approx(expected[0].item(), abs=1e-6)
    assert got[1] == pytest.approx(expected[1].item(), abs=1e-6)
    assert res.next_ids == [0]  # tie of 1.0 between tokens 0 and 2: argmax takes the first


def test_frequency_and_presence_count_generated_tokens_only():
    logits = torch.zeros(1, V)
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    # prompt [3, 3], generated [3, 4, 4, 4]
    res = run([params], logits, token_ids=[[3, 3, 3, 4, 4, 4]], prompt_lens=[2], top_n=[V])
    processed = torch.zeros(V)
    processed[3] -= 0.5 * 1 + 0.25
    processed[4] -= 0.5 * 3 + 0.25
    expected = torch.log_softmax(processed, -1)
    got = dict(zip(res.top_ids[0], res.top_logprobs[0]))
    for tok in (0, 3, 4):
        assert got[tok] == pytest.approx(expected[tok].item(), abs=1e-6)


def test_penalty_counts_grow_incrementally():
    params = [SamplingParams(frequency_penalty=1.0), SamplingParams()]
    sampler = BatchSampler(params, CPU, V)
    logits = torch.zeros(2, V)
    logits[:, 5] = 0.1
    tokens = [[1, 2], [1, 2]]
    assert sampler(logits, tokens, [2, 2]).next_ids == [5, 5]
    tokens[0].append(5)
    tokens[1].append(5)
    # token 5 is now penalised by 1.0 for request 0 only; request 1 keeps choosing it
    res = sampler(logits, tokens, [2, 2])
    assert res.next_ids[1] == 5 and res.next_ids[0] != 5
    tokens[0].append(0)
    res = sampler(logits, tokens, [2, 2])  # counted once each, not re-counted
    assert res.next_ids[0] not in (0, 5)


def _windowed_reference(params: SamplingParams, ids: list[int], vocab: int) -> torch.Tensor:
    """llama.cpp's rule by hand: all three penalties over the last `penalty_window` tokens."""
    counts = torch.zeros(vocab)
    for tok in ids[-params.penalty_window :]:
        counts[tok] += 1
    y = torch.linspace(-1.0, 1.0, vocab)
    y = torch.where(counts > 0, torch.where(y < 0, y * params.repetition_penalty, y / params.repetition_penalty), y)
    return torch.log_softmax(y - params.frequency_penalty * counts - params.presence_penalty * (counts > 0), -1)


def test_penalty_window_counts_only_the_last_tokens_across_steps_and_batch_changes():
    vocab = 12
    windowed = SamplingParams(repetition_penalty=1.7, frequency_penalty=0.3, presence_penalty=0.2, penalty_window=4)
    params = [windowed, SamplingParams(repetition_penalty=1.7), windowed]
    sampler = BatchSampler(params, CPU, vocab)
    logits = torch.linspace(-1.0, 1.0, vocab).repeat(3, 1)
    gen = torch.Generator().manual_seed(3)
    tokens = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (7, 5, 2)]
    for step in range(9):
        if step == 4:  # drop the middle request, then bring a fresh windowed one beside the survivors
            sampler = BatchSampler.concatenate([sampler.filter([2, 0]), BatchSampler([windowed], CPU, vocab)])
            tokens = [tokens[2], tokens[0], [5, 5, 5, 1, 5, 9]]
            logits = logits[:1].repeat(3, 1)
        res = sampler(logits, tokens, [2] * len(tokens), top_n=[vocab] * len(tokens))
        for row, ids in enumerate(tokens):
            if sampler.params[row].penalty_window:
                got = dict(zip(res.top_ids[row], res.top_logprobs[row]))
                expected = _windowed_reference(windowed, ids, vocab)
                assert [got[t] for t in range(vocab)] == pytest.approx(expected.tolist(), abs=1e-5), (step, row)
            ids.extend(torch.randint(0, vocab, (1 + step % 3,), generator=gen).tolist())


def test_penalty_window_is_carried_by_the_proto():
    pb = generate_pb2.NextTokenChooserParameters(repetition_penalty=1.1, penalty_window=64)
    assert SamplingParams.from_pb(pb).penalty_window == 64
    assert SamplingParams.from_pb(generate_pb2.NextTokenChooserParameters()).penalty_window == 0


def test_logit_bias_and_banned_and_allowed():
    logits = torch.zeros(3, V)
    params = [SamplingParams(logit_bias={6: 3.0}), SamplingParams(), SamplingParams()]
    res = run(params, logits, allowed=[None, None, torch.tensor([2, 3])], banned=[[], [0, 1, 2], []], top_n=[0, 0, V])
    assert res.next_ids[0] == 6
    assert res.next_ids[1] == 3  # first non-banned of equal logits
    assert res.next_ids[2] == 2
    assert set(res.top_ids[2]) == {2, 3}  # masked tokens are not reported
    assert res.top_logprobs[2] == pytest.approx([math.log(0.5)] * 2, abs=1e-6)


def test_grammar_wins_over_banned_when_nothing_else_is_left():
    logits = torch.zeros(2, V)
    res = run(
        [SamplingParams(), SamplingParams()],
        logits,
        allowed=[torch.tensor([2]), torch.tensor([2, 4])],
        banned=[[2], [2]],
    )
    assert res.next_ids == [2, 4]  # row 0: only EOS(2) was allowed; row 1: the ban holds
    assert res.logprobs[0] == pytest.approx(0.0)


def test_temperature_changes_the_sampling_logprob():
    logits = torch.tensor([[1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    res = run([SamplingParams(temperature=0.5, seed=3)], logits)
    expected = torch.log_softmax(logits[0] / 0.5, -1)[res.next_ids[0]].item()
    assert res.logprobs[0] == pytest.approx(expected, abs=1e-6)


def test_top_k_keeps_k_best():
    logits = probs_logits([0.3, 0.25, 0.2, 0.1, 0.05, 0.05, 0.03, 0.02])
    assert support(SamplingParams(top_k=2), logits) == {0, 1}
    res = run([SamplingParams(top_k=2, seed=0)], logits)
    # renormalised over the two kept tokens
    expected = math.log([0.3, 0.25][res.next_ids[0]] / 0.55)
    assert res.logprobs[0] == pytest.approx(expected, abs=1e-5)


def test_top_p_keeps_smallest_set_reaching_p():
    logits = probs_logits([0.5, 0.3, 0.15, 0.05, 0, 0, 0, 0])
    assert support(SamplingParams(top_p=0.7), logits) == {0, 1}  # 0.5 < 0.7, 0.5+0.3 >= 0.7
    assert support(SamplingParams(top_p=0.85), logits) == {0, 1, 2}
    assert support(SamplingParams(top_p=0.3), logits) == {0}


def test_typical_p_hand_computed():
    probs = [0.4, 0.3, 0.2, 0.1]
    logits = probs_logits(probs + [0, 0, 0, 0])
    entropy = -sum(p * math.log(p) for p in probs)
    # order tokens by |-log p - H|, keep until the mass reaches typical_p
    order = sorted(range(4), key=lambda i: abs(-math.log(probs[i]) - entropy))
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += probs[i]
        if mass >= 0.5:
            break
    assert support(SamplingParams(typical_p=0.5), logits) == set(kept)
    assert set(kept) == {1, 2}  # sanity of the hand computation: the middle tokens are typical


def test_min_p_scales_with_top_probability():
    logits = probs_logits([0.5, 0.2, 0.1, 0.09, 0.06, 0.05, 0, 0])
    # threshold 0.19 * 0.5 = 0.095: keeps 0.5, 0.2, 0.1
    assert support(SamplingParams(min_p=0.19), logits) == {0, 1, 2}
    assert support(SamplingParams(min_p=0.39), logits) == {0, 1}
    res = run([SamplingParams(min_p=0.19, seed=1)], logits)
    assert res.logprobs[0] == pytest.approx(math.log([0.5, 0.2, 0.1][res.next_ids[0]] / 0.8), abs=1e-5)


def test_mixed_batch_applies_each_row_own_warpers():
    logits = probs_logits([0.3, 0.25, 0.2, 0.1, 0.05, 0.05, 0.03, 0.02]).repeat(3, 1)
    params = [SamplingParams(), SamplingParams(top_k=1, seed=5), SamplingParams(top_p=0.5, seed=6)]
    for _ in range(20):
        res = run(params, logits)
        assert res.next_ids[0] == 0 and res.next_ids[1] == 0 and res.next_ids[2] in (0, 1)
    assert res.logprobs[1] == pytest.approx(0.0, abs=1e-6)  # only one token left


def test_watermark_adds_delta_to_green_list():
    logits = torch.zeros(1, V)
    res = run([SamplingParams(watermark=True)], logits, token_ids=[[7]], top_n=[V])
    green = set(_green_list(7, V).tolist())
    assert len(green) == V // 2
    got = dict(zip(res.top_ids[0], res.top_logprobs[0]))
    green_lp = math.log(math.exp(WATERMARK_DELTA) / (len(green) * math.exp(WATERMARK_DELTA) + V - len(green)))
    for tok in range(V):
        if tok in green:
            assert got[tok] == pytest.approx(green_lp, abs=1e-5)
    assert res.next_ids[0] in green


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_request_is_independent_of_batch_neighbours(device):
    mine = SamplingParams(do_sample=True, temperature=0.9, top_p=0.95, seed=1234)
    alone_logits = torch.Generator().manual_seed(0)
    alone = []
    sampler = BatchSampler([mine], device, 64)
    for _ in range(10):
        logits = torch.randn(1, 64, generator=alone_logits).to(device)
        alone.append(sampler(logits, [[1]], [1]).next_ids[0])

    neighbours = [SamplingParams(do_sample=True, seed=9), SamplingParams(), SamplingParams(top_k=3, seed=77)]
    batch = BatchSampler([neighbours[0], mine, neighbours[1], neighbours[2]], device, 64)
    row_logits = torch.Generator().manual_seed(0)
    noise = torch.Generator().manual_seed(42)
    together = []
    for _ in range(10):
        logits = torch.randn(4, 64, generator=noise)
        logits[1] = torch.randn(64, generator=row_logits)
        together.append(batch(logits.to(device), [[1]] * 4, [1] * 4).next_ids[1])
    assert together == alone
    assert len(set(alone)) > 1  # it really sampled


def test_filter_and_concatenate_keep_generators_and_counts():
    a = SamplingParams(do_sample=True, seed=11)
    b = SamplingParams(do_sample=True, seed=22, frequency_penalty=2.0)

    def reference(params: SamplingParams, steps: int) -> list[int]:
        s = BatchSampler([params], CPU, V)
        tokens, out = [0], []
        for _ in range(steps):
            nxt = s(torch.zeros(1, V), [tokens], [1]).next_ids[0]
            tokens.append(nxt)
            out.append(nxt)
        return out

    ref_a, ref_b = reference(a, 6), reference(b, 6)
    # a and b start in separate batches, are merged with a greedy request, then filtered.
    sa, sb = BatchSampler([a], CPU, V), BatchSampler([SamplingParams(), b], CPU, V)
    ta, tb, tg = [0], [0], [0]
    got_a, got_b = [], []
    for step in range(6):
        if step == 2:
            merged = BatchSampler.concatenate([sa, sb])  # rows: a, greedy, b
        if step == 4:
            merged = merged.filter([2, 0])  # rows: b, a
        if step < 2:
            ra = sa(torch.zeros(1, V), [ta], [1]).next_ids[0]
            rb = sb(torch.zeros(2, V), [tg, tb], [1, 1]).next_ids[1]
        elif step < 4:
            ids = merged(torch.zeros(3, V), [ta, tg, tb], [1, 1, 1]).next_ids
            ra, rb = ids[0], ids[2]
        else:
            rb, ra = merged(torch.zeros(2, V), [tb, ta], [1, 1]).next_ids
        ta.append(ra)
        tb.append(rb)
        got_a.append(ra)
        got_b.append(rb)
    assert got_a == ref_a
    assert got_b == ref_b
    assert len(set(ref_b)) == 6  # the frequency penalty (2.0 per use) forces new tokens on flat logits


def test_from_pb_maps_fields_and_unset_values():
    pb = generate_pb2.NextTokenChooserParameters(
        temperature=0.7,
        top_k=5,
        do_sample=True,
        seed=99,
        frequency_penalty=0.1,
        presence_penalty=0.2,
        min_p=0.05,
        logit_bias=[generate_pb2.LogitBias(token_id=3, bias=-1.5)],
    )
    p = SamplingParams.from_pb(pb)
    assert (p.temperature, p.top_k, p.seed, p.min_p) == (pytest.approx(0.7), 5, 99, pytest.approx(0.05))
    assert p.top_p == 1.0 and p.typical_p == 1.0 and p.repetition_penalty == 1.0  # proto zero = off
    assert p.logit_bias == {3: pytest.approx(-1.5)} and p.sampling
    assert not SamplingParams.from_pb(generate_pb2.NextTokenChooserParameters(temperature=0.0)).sampling


def test_prompt_logprobs():
    logits = torch.randn(3, V)
    got = prompt_logprobs(logits, [1, 2, 3])
    expected = torch.log_softmax(logits, -1)[torch.arange(3), torch.tensor([1, 2, 3])]
    assert got == pytest.approx(expected.tolist(), abs=1e-6)


def test_sampling_frequencies_follow_the_distribution():
    probs = [0.5, 0.3, 0.2, 0, 0, 0, 0, 0]
    logits = probs_logits(probs)
    sampler = BatchSampler([SamplingParams(do_sample=True, seed=123)], CPU, V)
    counts = [0] * V
    for _ in range(3000):
        counts[sampler(logits, [[0]], [1]).next_ids[0]] += 1
    for tok, p in enumerate(probs):
        assert abs(counts[tok] / 3000 - p) < 0.04, counts


def test_a_vanishing_temperature_samples_the_top_token_instead_of_failing():
    logits = probs_logits([0.1, 0.6, 0.3, 0, 0, 0, 0, 0]) * 30
    params = [SamplingParams(do_sample=True, temperature=1e-45, seed=s) for s in range(5)]
    out = run(params, logits.repeat(5, 1))
    assert out.next_ids == [1] * 5
    assert all(math.isfinite(lp) for lp in out.logprobs)
