"""Batches of requests on the shard: the one place protobuf meets model state.

A `GenerationBatch` holds the live requests of one cached batch. `step` runs
one forward for all of them (the prompt on prefill, one token on decode),
samples, advances grammar / detokeniser / stopping per request, and returns a
`Generation` per request that produced a token. Requests that finish leave the
batch at once and give their KV blocks back, so the returned `CachedBatch`
lists only live ids (the router needs FilterBatch only for cancellations).

Chunked prefill: a step runs at most `Context.prefill_chunk` prompt tokens
(the running requests' next tokens besides), or fewer when the router's
`prompt_budget` says so (it paces steps by time, router/pacer.py). Prompts beyond it go on in the
next steps, in order, from where their cached prefix ends; a request yields
its first token in the step that finishes its prompt, and none before. So a
long prompt arriving never stalls the running streams for longer than one
chunk's forward (on 2 cores: ~0.15 s for the default 256 prompt tokens, where
a whole 1,000-token prompt took ~0.6-0.9 s). Requests asking for prompt
logprobs run their prompt whole. Only the rows with a token sample, so a
seeded request draws the same numbers however its prompt was cut.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from itertools import accumulate

import torch

from ember.proto import generate_pb2 as pb
from ember.shard.detok import IncrementalDetokenizer
from ember.shard.grammar import GrammarState
from ember.shard.runner import ModelRunner, Sequence
from ember.shard.sampling import BatchSampler, SamplingParams
from ember.shard.speculate import PRIOR_ACCEPTANCE, NgramIndex, SpeculationPolicy, update_rate
from ember.shard.stopping import StopCriteria


class BadRequest(ValueError):
    """A request the shard refuses (maps to gRPC INVALID_ARGUMENT)."""


@dataclass
class RequestState:
    id: int
    seq: Sequence
    prompt_len: int
    max_new_tokens: int
    params: SamplingParams
    stop: StopCriteria
    detok: IncrementalDetokenizer
    top_n: int
    prefill_logprobs: bool
    grammar: GrammarState | None
    generated: list[int] = field(default_factory=list)
    # Speculative decoding: where the sequence's n-grams last occurred, and how often its drafts held.
    ngrams: NgramIndex | None = None
    draft_rate: float = PRIOR_ACCEPTANCE

    @property
    def max_tokens(self) -> int:
        return self.prompt_len + self.max_new_tokens


@dataclass
class StepTimings:
    forward_ns: int = 0
    decode_ns: int = 0
    decode_rows: int = 0  # running requests' next tokens in the forward
    prompt_tokens: int = 0  # prompt tokens in the forward
    draft_tokens: int = 0  # speculative draft tokens in the forward
    accepted_tokens: int = 0  # of those, the ones the model accepted


class Context:
    """What building a batch needs from the shard: runner, tokenizer, grammar compiler."""

    def __init__(
        self, runner: ModelRunner, tokenizer, grammar_compiler, prefill_chunk: int = 0, speculate: int = 0
    ) -> None:
        self.runner = runner
        # Prompt tokens per step (0: whole prompts); only runners that attend over a cached prefix.
        self.prefill_chunk = prefill_chunk if runner.info.shared_prefill else 0
        # Draft tokens a decoding request may verify per step (`speculate.py`); the same runners only.
        self.speculation = SpeculationPolicy(speculate if runner.info.shared_prefill else 0)
        self.tokenizer = tokenizer
        self.grammar_compiler = grammar_compiler
        self.eos_ids = set(runner.info.eos_token_ids)
        self.special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.device = getattr(runner, "device", torch.device("cpu"))

    def token_texts(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([i], skip_special_tokens=False) for i in ids]


class GenerationBatch:
    def __init__(self, batch_id: int, requests: list[RequestState], sampler: BatchSampler, ctx: Context) -> None:
        self.id = batch_id
        self.requests = requests
        self.sampler = sampler
        self.ctx = ctx

    # ---- building -------------------------------------------------------------------------

    @classmethod
    def from_pb(cls, batch: pb.Batch, ctx: Context) -> GenerationBatch:
        if not batch.requests:
            raise BadRequest(f"batch {batch.id} has no requests")
        states = [_request_state(r, ctx) for r in batch.requests]
        sampler = BatchSampler([s.params for s in states], ctx.device, ctx.runner.info.vocab_size)
        return cls(batch.id, states, sampler, ctx)

    @classmethod
    def concatenate(cls, batches: list[GenerationBatch]) -> GenerationBatch:
        if len(batches) == 1:
            return batches[0]
        requests = [r for b in batches for r in b.requests]
        sampler = BatchSampler.concatenate([b.sampler for b in batches])
        return cls(batches[0].id, requests, sampler, batches[0].ctx)

    def filter(self, keep_ids: list[int]) -> None:
        """Keep only `keep_ids` (in the batch's order); free everyone else's blocks."""
        keep = set(keep_ids)
        indices = [i for i, r in enumerate(self.requests) if r.id in keep]
        self._keep(indices)

    def _keep(self, indices: list[int]) -> None:
        if len(indices) == len(self.requests):
            return
        kept = set(indices)
        for i, r in enumerate(self.requests):
            if i not in kept:
                self.ctx.runner.free(r.seq)
        self.requests = [self.requests[i] for i in indices]
        if self.requests:
            self.sampler = self.sampler.filter(indices)

    def release(self) -> None:
        """Free every request's blocks (ClearCache)."""
        for r in self.requests:
            self.ctx.runner.free(r.seq)
        self.requests = []

    def to_pb(self) -> pb.CachedBatch | None:
        if not self.requests:
            return None
        return pb.CachedBatch(
            id=self.id,
            request_ids=[r.id for r in self.requests],
            size=len(self.requests),
            max_tokens=sum(r.max_tokens for r in self.requests),
            current_tokens=sum(len(r.seq.token_ids) for r in self.requests),
        )

    # ---- one step -------------------------------------------------------------------------

    def step(self, prompt_budget: int = 0) -> tuple[list[pb.Generation], StepTimings]:
        """One forward over every request: prompts of new ones (in chunks of at most `prompt_budget`
        tokens, or the shard's own chunk; see the module's doc), the next token of running ones.
        Generations of the requests that produced a token, in order."""
        timings = StepTimings()
        start = time.perf_counter_ns()
        runner = self.ctx.runner
        if runner.prefix_caching:
            runner.reuse_prefix([r.seq for r in self.requests if len(r.seq.token_ids) - r.seq.num_cached > 1])
        pending = [len(r.seq.token_ids) - r.seq.num_cached for r in self.requests]
        plan = self._chunk_plan(pending, prompt_budget)
        if plan is None:
            rows, sizes = list(range(len(self.requests))), list(pending)
            prompt_details = [r.prefill_logprobs and not r.generated for r in self.requests]
        else:
            rows, sizes = plan
            prompt_details = [False] * len(rows)
        timings.decode_rows = sum(1 for i, n in zip(rows, sizes) if n == 1 and self.requests[i].generated)
        timings.prompt_tokens = sum(sizes) - timings.decode_rows
        drafts = {} if any(prompt_details) else self._drafts(rows, sizes, timings)
        seqs = [self.requests[i].seq for i in rows]
        num_logits = [1 + len(drafts.get(k, ())) for k in range(len(rows))]
        if drafts:
            for k, draft in drafts.items():
                seqs[k].token_ids.extend(draft)
                sizes[k] += len(draft)
            out = runner.step(seqs, num_new=sizes, num_logits=num_logits)
            for k, draft in drafts.items():  # verification appends the tokens that hold
                del seqs[k].token_ids[-len(draft) :]
        elif plan is None:
            out = runner.step(seqs, want_prompt_logits=any(prompt_details))
        else:
            out = runner.step(seqs, num_new=sizes)
        timings.forward_ns = time.perf_counter_ns() - start

        start = time.perf_counter_ns()
        # The rows whose prompt is done have a next token; a prompt still in chunks has none yet.
        ready = [
            k
            for k, i in enumerate(rows)
            if self.requests[i].seq.num_cached == len(self.requests[i].seq.token_ids) + len(drafts.get(k, ()))
        ]
        generations = []
        finished = set()
        if ready:
            idx = [rows[k] for k in ready]
            requests = [self.requests[i] for i in idx]
            first = list(accumulate(num_logits, initial=0))  # where each row's logits start
            ready_logits = [first[k] for k in ready]
            sampler = self.sampler if len(idx) == len(self.requests) else self.sampler.filter(idx)
            logits = out.logits if len(ready) == len(rows) and not drafts else self._rows(out.logits, ready_logits)
            result = self._sample(sampler, logits, requests)
            for j, (k, r) in enumerate(zip(ready, requests)):
                gen, done = self._advance(r, j, result)
                if prompt_details[k]:
                    gen.prefill_tokens.CopyFrom(self._prefill_tokens(r, out.prompt_logits[k]))
                generations.append(gen)
                if done:
                    finished.add(idx[j])
            if drafts:
                self._verify(drafts, ready, idx, ready_logits, out.logits, generations, finished, timings)
        if finished:
            self._keep([i for i in range(len(self.requests)) if i not in finished])
        timings.decode_ns = time.perf_counter_ns() - start
        return generations, timings

    @staticmethod
    def _rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        return logits[torch.tensor(rows).to(logits.device)]

    def _sample(self, sampler: BatchSampler, logits: torch.Tensor, requests: list[RequestState]):
        return sampler(
            logits,
            [r.seq.token_ids for r in requests],
            [r.prompt_len for r in requests],
            [r.top_n for r in requests],
            [r.grammar.allowed_ids(self.ctx.device) if r.grammar is not None else None for r in requests],
            [r.stop.banned_ids() for r in requests],
        )

    # ---- speculative decoding (speculate.py) ----------------------------------------------

    def _drafts(self, rows: list[int], sizes: list[int], timings: StepTimings) -> dict[int, list[int]]:
        """Draft tokens of the decoding requests of this step, by position in `rows`: as many as pay."""
        policy = self.ctx.speculation
        if not policy.enabled:
            return {}
        found: list[tuple[int, list[int]]] = []
        for k, (i, n) in enumerate(zip(rows, sizes)):
            r = self.requests[i]
            if n != 1 or not r.generated or len(r.seq.token_ids) - r.seq.num_cached != 1:
                continue
            if r.ngrams is None:
                r.ngrams = NgramIndex()
            # Room for the token after the drafts: a request never holds more than its max_tokens.
            room = min(policy.max_draft, r.max_new_tokens - len(r.generated) - 1)
            draft = r.ngrams.propose(r.seq.token_ids, room)
            if draft:
                found.append((k, draft))
        if not found:
            return {}
        counts = policy.plan(
            timings.decode_rows, timings.prompt_tokens, [(self.requests[rows[k]].draft_rate, len(d)) for k, d in found]
        )
        drafts = {k: draft[:c] for (k, draft), c in zip(found, counts) if c}
        timings.draft_tokens = sum(len(d) for d in drafts.values())
        return drafts

    def _verify(
        self,
        drafts: dict[int, list[int]],
        ready: list[int],
        idx: list[int],
        ready_logits: list[int],
        logits: torch.Tensor,
        generations: list[pb.Generation],
        finished: set[int],
        timings: StepTimings,
    ) -> None:
        """After the first token of every ready row: each drafting row's next positions, in rounds, while
        its drafts hold; then the runner keeps only the accepted drafts' keys and values."""
        runner = self.ctx.runner
        # Per drafting row: its index in `ready`, its draft, and the draft tokens accepted so far.
        live = {j: drafts[k] for j, k in enumerate(ready) if k in drafts}
        accepted = dict.fromkeys(live, 0)
        held = {
            j for j, draft in live.items() if idx[j] not in finished and self.requests[idx[j]].generated[-1] == draft[0]
        }
        depth = 1
        while held:
            order = sorted(held)
            for j in order:
                accepted[j] += 1
            active = [j for j in order if depth <= len(live[j])]  # rows with a position left to sample
            if not active:
                break
            requests = [self.requests[idx[j]] for j in active]
            result = self._sample(
                self.sampler.filter([idx[j] for j in active]),
                self._rows(logits, [ready_logits[j] + depth for j in active]),
                requests,
            )
            held = set()
            for n, (j, r) in enumerate(zip(active, requests)):
                self._advance(r, n, result, generations[j])
                if generations[j].HasField("generated_text"):
                    finished.add(idx[j])
                elif depth < len(live[j]) and r.generated[-1] == live[j][depth]:
                    held.add(j)
            depth += 1
        for j, draft in live.items():
            r = self.requests[idx[j]]
            verified = accepted[j] if idx[j] in finished else len(draft)  # a stop is no rejection
            r.draft_rate = update_rate(r.draft_rate, accepted[j], verified)
            timings.accepted_tokens += accepted[j]
            if idx[j] not in finished:
                runner.accept(r.seq, len(r.seq.token_ids) - 1)

    def _chunk_plan(self, pending: list[int], prompt_budget: int = 0) -> tuple[list[int], list[int]] | None:
        """The requests this step runs and how many tokens each, from each one's `pending` uncached tokens;
        None: every request runs all of them.

        Prompts share `prefill_chunk` tokens in order, the first always getting some. With prefix
        caching, a prompt whose next block another prompt starts computing in this step waits: next
        step it takes that block from the cache instead of computing it twice."""
        chunk = self.ctx.prefill_chunk
        if chunk and prompt_budget:
            chunk = min(chunk, prompt_budget)
        runner = self.ctx.runner
        prompts = [p for p in pending if p > 1]
        fits = not chunk or sum(prompts) <= chunk
        may_share = runner.prefix_caching and len(prompts) > 1
        if not prompts or (fits and not may_share):
            return None
        if any(p > 1 and r.prefill_logprobs for p, r in zip(pending, self.requests)):
            return None  # prompt logprobs need the whole prompt's logits in one step
        rows, sizes = [], []
        left = chunk or sum(prompts)
        computing: set[bytes] = set()
        for i, (p, r) in enumerate(zip(pending, self.requests)):
            if p == 1:  # a running request's next token (or a prompt's last one)
                rows.append(i)
                sizes.append(1)
                continue
            if left <= 0:
                continue
            if computing and any(name in computing for name in runner.shared_names(r.seq, 1)):
                continue
            n = min(p, left)
            computing.update(runner.shared_names(r.seq, n))
            left -= n
            rows.append(i)
            sizes.append(n)
        if len(rows) == len(pending) and sizes == pending:
            return None
        return rows, sizes

    def _advance(self, r: RequestState, i: int, result, gen: pb.Generation | None = None) -> tuple[pb.Generation, bool]:
        """Append row `i`'s chosen token to `r` (and to `gen`, a Generation of this step's earlier tokens)."""
        token = result.next_ids[i]
        r.seq.token_ids.append(token)
        r.generated.append(token)
        if r.grammar is not None:
            r.grammar.advance(token)
        piece = r.detok.push(token)
        reason = r.stop.step(token, piece)
        if reason is None and r.grammar is not None and r.grammar.is_finished():
            reason = pb.FINISH_REASON_EOS_TOKEN
        is_special = token in self.ctx.special_ids
        text = self.ctx.tokenizer.decode([token], skip_special_tokens=False) if is_special else piece
        if gen is None:
            gen = pb.Generation(
                request_id=r.id,
                cached_tokens=r.seq.cached_tokens if len(r.generated) == 1 else 0,
                tokens=pb.Tokens(ids=[token], logprobs=[result.logprobs[i]], texts=[text], is_special=[is_special]),
            )
        else:
            tokens = gen.tokens
            tokens.ids.append(token)
            tokens.logprobs.append(result.logprobs[i])
            tokens.texts.append(text)
            tokens.is_special.append(is_special)
        if r.top_n:
            top_ids = result.top_ids[i]
            gen.top_tokens.append(
                pb.Tokens(
                    ids=top_ids,
                    logprobs=result.top_logprobs[i],
                    texts=self.ctx.token_texts(top_ids),
                    is_special=[t in self.ctx.special_ids for t in top_ids],
                )
            )
        if reason is not None:
            text = self.ctx.tokenizer.decode(r.generated, skip_special_tokens=True)
            gen.generated_text.CopyFrom(
                pb.GeneratedText(
                    text=text,
                    generated_tokens=len(r.generated),
                    finish_reason=reason,
                    seed=r.params.seed if r.params.do_sample else None,
                )
            )
        return gen, reason is not None

    def _prefill_tokens(self, r: RequestState, logits: torch.Tensor) -> pb.Tokens:
        """Logprob of each prompt token given the ones before it (the first has none: NaN)."""
        ids = r.seq.token_ids[: r.prompt_len]
        logprobs = [math.nan]
        if len(ids) > 1:
            lp = torch.log_softmax(logits[:-1].float(), dim=-1)
            target = torch.tensor(ids[1:], device=lp.device).unsqueeze(1)
            logprobs += lp.gather(1, target).squeeze(1).tolist()
        return pb.Tokens(
            ids=ids,
            logprobs=logprobs,
            texts=self.ctx.token_texts(ids),
            is_special=[t in self.ctx.special_ids for t in ids],
        )


def _request_state(req: pb.Request, ctx: Context) -> RequestState:
    ids = list(req.input_ids)
    if not ids:
        raise BadRequest(f"request {req.id} has no input tokens")
    vocab = ctx.runner.info.vocab_size
    if max(ids) >= vocab:
        raise BadRequest(f"request {req.id} has a token id >= the vocabulary size {vocab}")
    stopping = req.stopping_parameters
    max_new = stopping.max_new_tokens or 1
    grammar = None
    if req.parameters.grammar_type != pb.GRAMMAR_TYPE_NONE:
        try:
            grammar = ctx.grammar_compiler.new_state(req.parameters.grammar_type, req.parameters.grammar)
        except Exception as exc:  # a grammar the router should have refused
            raise BadRequest(f"request {req.id}: grammar is not valid: {exc}") from exc
    return RequestState(
        id=req.id,
        seq=Sequence(seq_id=req.id, token_ids=ids, reuse=not req.prefill_logprobs),
        prompt_len=len(ids),
        max_new_tokens=max_new,
        params=SamplingParams.from_pb(req.parameters),
        stop=StopCriteria(
            eos_token_ids=ctx.eos_ids,
            max_new_tokens=max_new,
            stop_sequences=list(stopping.stop_sequences),
            ignore_eos=stopping.ignore_eos_token,
            min_new_tokens=stopping.min_new_tokens,
        ),
        detok=IncrementalDetokenizer(ctx.tokenizer, ids),
        top_n=req.top_n_tokens,
        prefill_logprobs=req.prefill_logprobs,
        grammar=grammar,
    )
