"""Logits processing and token choice for a whole batch, with per-request parameters.

`BatchSampler` runs TGI's pipeline once per step over the batch's logits
``[N, V]``: watermark → repetition penalty → frequency/presence penalties →
logit bias → grammar mask and banned ids → temperature → top-k → top-p →
typical-p → min-p → seeded sampling or argmax. Parameter tensors are built
once per batch composition (constructor, `filter`, `concatenate`), and a stage
runs only when some request of the batch uses it, so a batch of plain greedy
requests costs an argmax and a log_softmax (on CPU, one pass of Ember's C kernel
`argmax_lse` per row when no alternatives are asked).

As in TGI, a request samples when ``do_sample`` is set *or* any warper
(temperature, top-k, top-p, typical-p, min-p) is set; warpers apply only to
sampling requests. A temperature of 0 means greedy. Each sampling request owns
a ``torch.Generator`` seeded with its seed, from which only its own row draws
(one uniform per step, inverse-CDF), so its tokens do not depend on its batch
neighbours; the generator follows the request through `filter` and
`concatenate`.

Penalties need the counts of tokens seen so far. Rebuilding them from token
lists every step would cost O(sequence length) per step, so the sampler keeps
per-request count tensors (only for requests with penalties) and feeds them
only the tokens appended since the previous call.

A request with a ``penalty_window`` of N follows llama.cpp's rule instead
(Ollama's ``repeat_last_n``): all three penalties count the last N tokens of
prompt and output together. Its counts are kept over that window: each step
adds the tokens that entered it and takes away those that left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from ember.proto import generate_pb2
from ember.shard import native

# Kirchenbauer et al.'s defaults, as TGI uses them.
WATERMARK_GAMMA = 0.5
WATERMARK_DELTA = 2.0
WATERMARK_HASH_KEY = 15485863
MIN_TEMPERATURE = 1e-4
_NEG_INF = float("-inf")


@dataclass
class SamplingParams:
    """One request's logits-processing parameters (neutral values = off)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    min_p: float = 0.0
    do_sample: bool = False
    seed: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    watermark: bool = False
    penalty_window: int = 0  # 0: the whole sequence (TGI's and OpenAI's rules)

    @classmethod
    def from_pb(cls, pb: generate_pb2.NextTokenChooserParameters) -> SamplingParams:
        """From the proto; a proto3 zero where zero makes no sense (top_p, penalty) means "off"."""
        return cls(
            temperature=pb.temperature,
            top_k=pb.top_k,
            top_p=pb.top_p if pb.top_p > 0 else 1.0,
            typical_p=pb.typical_p if pb.typical_p > 0 else 1.0,
            min_p=pb.min_p,
            do_sample=pb.do_sample,
            seed=pb.seed,
            repetition_penalty=pb.repetition_penalty if pb.repetition_penalty > 0 else 1.0,
            frequency_penalty=pb.frequency_penalty,
            presence_penalty=pb.presence_penalty,
            logit_bias={b.token_id: b.bias for b in pb.logit_bias},
            watermark=pb.watermark,
            penalty_window=pb.penalty_window,
        )

    @property
    def has_warpers(self) -> bool:
        return self.temperature != 1.0 or self.top_k > 0 or self.top_p < 1.0 or self.typical_p < 1.0 or self.min_p > 0.0

    @property
    def sampling(self) -> bool:
        """TGI's rule: sample when asked to or when any warper is set; temperature 0 is greedy."""
        return self.temperature > 0 and (self.do_sample or self.has_warpers)

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


@dataclass
class SampleResult:
    """One step's choices, as plain Python lists (one host transfer per step)."""

    next_ids: list[int]
    logprobs: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


class _PenaltyState:
    """Token counts of the requests that use penalties (rows of the batch in `rows`)."""

    def __init__(
        self, rows: list[int], consumed: list[int], windows: list[int], seen: torch.Tensor, counts: torch.Tensor
    ) -> None:
        self.rows = rows  # batch row of each penalty row
        self.consumed = consumed  # tokens of that request already counted
        self.windows = windows  # 0, or the last N tokens of prompt and output that count
        self.seen = seen  # [P, V] bool: in prompt or generated (repetition penalty), or in the window
        self.counts = counts  # [P, V] float32: times generated (frequency/presence), or times in the window

    @classmethod
    def create(cls, params: list[SamplingParams], device: torch.device, vocab: int) -> _PenaltyState | None:
        rows = [i for i, p in enumerate(params) if p.has_penalties]
        if not rows:
            return None
        n = len(rows)
        return cls(
            rows,
            [0] * n,
            [params[r].penalty_window for r in rows],
            torch.zeros(n, vocab, dtype=torch.bool, device=device),
            torch.zeros(n, vocab, dtype=torch.float32, device=device),
        )

    def update(self, token_ids: Sequence[Sequence[int]], prompt_lens: Sequence[int]) -> None:
        """Count the tokens appended since the last call (one scatter for the whole batch)."""
        vocab = self.seen.shape[1]
        seen_rc: tuple[list[int], list[int]] = ([], [])
        add: tuple[list[int], list[int], list[float]] = ([], [], [])
        windowed: list[int] = []

        def count(p: int, tok: int, delta: float) -> None:
            if 0 <= tok < vocab:
                add[0].append(p)
                add[1].append(tok)
                add[2].append(delta)

        for p, row in enumerate(self.rows):
            ids = token_ids[row]
            start, end = self.consumed[p], len(ids)
            if start >= end:
                continue
            self.consumed[p] = end
            window = self.windows[p]
            if window > 0:
                windowed.append(p)
                # In: positions start..end-1; out: those now more than `window` behind the end.
                for pos in range(max(start, end - window), end):
                    count(p, ids[pos], 1.0)
                for pos in range(max(0, start - window), min(start, max(0, end - window))):
                    count(p, ids[pos], -1.0)
                continue
            gen_start = max(start, prompt_lens[row])
            for pos in range(start, end):
                tok = ids[pos]
                if 0 <= tok < vocab:
                    seen_rc[0].append(p)
                    seen_rc[1].append(tok)
                    if pos >= gen_start:
                        count(p, tok, 1.0)
        device = self.seen.device
        if seen_rc[0]:
            rc = torch.tensor(seen_rc, dtype=torch.int64).to(device, non_blocking=True)
            self.seen[rc[0], rc[1]] = True
        if add[0]:
            rc = torch.tensor(add[:2], dtype=torch.int64).to(device, non_blocking=True)
            delta = torch.tensor(add[2], dtype=torch.float32).to(device, non_blocking=True)
            self.counts.index_put_((rc[0], rc[1]), delta, accumulate=True)
        if windowed:
            idx = torch.tensor(windowed, dtype=torch.int64).to(device, non_blocking=True)
            self.seen.index_copy_(0, idx, self.counts.index_select(0, idx) > 0)

    def select(self, keep: list[tuple[int, int]]) -> _PenaltyState | None:
        """Keep penalty rows given as (new batch row, old penalty row) pairs."""
        if not keep:
            return None
        idx = torch.tensor([p for _, p in keep], dtype=torch.int64, device=self.seen.device)
        return _PenaltyState(
            [r for r, _ in keep],
            [self.consumed[p] for _, p in keep],
            [self.windows[p] for _, p in keep],
            self.seen.index_select(0, idx),
            self.counts.index_select(0, idx),
        )

    @staticmethod
    def concat(parts: list[tuple[int, _PenaltyState | None]]) -> _PenaltyState | None:
        """Concatenate the states of batches placed at the given row offsets."""
        present = [(off, s) for off, s in parts if s is not None]
        if not present:
            return None
        return _PenaltyState(
            [off + r for off, s in present for r in s.rows],
            [c for _, s in present for c in s.consumed],
            [w for _, s in present for w in s.windows],
            torch.cat([s.seen for _, s in present]),
            torch.cat([s.counts for _, s in present]),
        )


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


class _Plan:
    """Parameter tensors for one batch composition; None where no request uses a stage."""

    def __init__(self, params: list[SamplingParams], penalty_rows: list[int], device: torch.device, vocab: int):
        self.watermark_rows = [i for i, p in enumerate(params) if p.watermark]
        self._penalties(params, penalty_rows, device)
        self._bias(params, device, vocab)
        self.sample_rows = [i for i, p in enumerate(params) if p.sampling]
        self.all_sample = len(self.sample_rows) == len(params)
        self.sample_idx = torch.tensor(self.sample_rows, dtype=torch.int64, device=device)
        self._warpers([params[i] for i in self.sample_rows], device, vocab)
        self.modifies = bool(self.watermark_rows or penalty_rows or self.bias is not None or self.sample_rows)

    def _penalties(self, params: list[SamplingParams], rows: list[int], device: torch.device) -> None:
        self.penalty_idx = torch.tensor(rows, dtype=torch.int64, device=device)
        self.penalty_all = len(rows) == len(params)
        chosen = [params[r] for r in rows]
        rep = [p.repetition_penalty for p in chosen]
        freq = [p.frequency_penalty for p in chosen]
        pres = [p.presence_penalty for p in chosen]
        self.repetition = _column(rep, device) if any(v != 1.0 for v in rep) else None
        self.frequency = _column(freq, device) if any(freq) else None
        self.presence = _column(pres, device) if any(pres) else None

    def _bias(self, params: list[SamplingParams], device: torch.device, vocab: int) -> None:
        entries = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias.items() if 0 <= t < vocab]
        self.bias = None
        if entries:
            rows, cols, vals = zip(*entries)
            self.bias = (
                torch.tensor(rows, dtype=torch.int64, device=device),
                torch.tensor(cols, dtype=torch.int64, device=device),
                torch.tensor(vals, dtype=torch.float32, device=device),
            )

    def _warpers(self, sp: list[SamplingParams], device: torch.device, vocab: int) -> None:
        # A tiny positive temperature would overflow the scaled logits to inf (NaN probabilities);
        # below MIN_TEMPERATURE the distribution is one-hot anyway.
        temps = [max(p.temperature, MIN_TEMPERATURE) if p.temperature > 0 else p.temperature for p in sp]
        self.temperature = _column(temps, device) if any(t != 1.0 for t in temps) else None
        ks = [min(p.top_k, vocab) for p in sp]
        self.top_k = torch.tensor(ks, dtype=torch.int64, device=device) if any(ks) else None
        self.top_k_max = max(ks, default=0)
        top_p = [p.top_p if p.top_p < 1.0 else 2.0 for p in sp]  # 2.0: never reached
        self.top_p = _column(top_p, device) if any(p < 1.0 for p in top_p) else None
        typical = [p.typical_p if p.typical_p < 1.0 else 2.0 for p in sp]
        self.typical_p = _column(typical, device) if any(t < 1.0 for t in typical) else None
        min_p = [p.min_p for p in sp]
        self.min_p = _column(min_p, device) if any(m > 0 for m in min_p) else None


@lru_cache(maxsize=64)
def _green_list(previous_token: int, vocab: int) -> torch.Tensor:
    """Kirchenbauer et al.'s green list for a context token (CPU, so detection is device-free)."""
    gen = torch.Generator(device="cpu").manual_seed(WATERMARK_HASH_KEY * previous_token)
    return torch.randperm(vocab, generator=gen)[: int(vocab * WATERMARK_GAMMA)]


def _remove_after_mass(order_probs: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """In a sorted order: drop tokens once the mass before them reaches `mass` (keep the first)."""
    before = order_probs.cumsum(-1) - order_probs
    remove = before >= mass
    remove[:, 0] = False
    return remove


class BatchSampler:
    """Chooses the next token of every request of a batch; see the module docstring."""

    def __init__(self, params: list[SamplingParams], device: torch.device | str, vocab_size: int) -> None:
        device = torch.device(device)
        generators = [self._generator(p, device) for p in params]
        self._setup(list(params), device, vocab_size, generators, _PenaltyState.create(params, device, vocab_size))

    def _setup(
        self,
        params: list[SamplingParams],
        device: torch.device,
        vocab_size: int,
        generators: list[torch.Generator | None],
        penalty: _PenaltyState | None,
    ) -> None:
        self.params = params
        self.device = device
        self.vocab_size = vocab_size
        self.generators = generators
        self._penalty = penalty
        rows = penalty.rows if penalty is not None else []
        self._plan = _Plan(params, rows, device, vocab_size)

    @classmethod
    def _from_parts(
        cls,
        params: list[SamplingParams],
        device: torch.device,
        vocab_size: int,
        generators: list[torch.Generator | None],
        penalty: _PenaltyState | None,
    ) -> BatchSampler:
        """A sampler over existing per-request state (generators, counts), for filter/concatenate."""
        sampler = cls.__new__(cls)
        sampler._setup(params, device, vocab_size, generators, penalty)
        return sampler

    @staticmethod
    def _generator(p: SamplingParams, device: torch.device) -> torch.Generator | None:
        if not p.sampling:
            return None
        return torch.Generator(device=device).manual_seed(p.seed)

    def __len__(self) -> int:
        return len(self.params)

    # ----- batch composition -------------------------------------------------

    def filter(self, indices: list[int]) -> BatchSampler:
        """A sampler for the requests at `indices` (in that order), keeping their state."""
        old = self._penalty
        keep = []
        if old is not None:
            where = {row: p for p, row in enumerate(old.rows)}
            keep = [(new, where[i]) for new, i in enumerate(indices) if i in where]
        return BatchSampler._from_parts(
            [self.params[i] for i in indices],
            self.device,
            self.vocab_size,
            [self.generators[i] for i in indices],
            old.select(keep) if old is not None else None,
        )

    @staticmethod
    def concatenate(samplers: list[BatchSampler]) -> BatchSampler:
        """One sampler for the requests of all `samplers`, in order, keeping their state."""
        first = samplers[0]
        offsets, total = [], 0
        for s in samplers:
            offsets.append(total)
            total += len(s)
        return BatchSampler._from_parts(
            [p for s in samplers for p in s.params],
            first.device,
            first.vocab_size,
            [g for s in samplers for g in s.generators],
            _PenaltyState.concat([(off, s._penalty) for off, s in zip(offsets, samplers)]),
        )

    # ----- one step ----------------------------------------------------------

    def __call__(
        self,
        logits: torch.Tensor,
        token_ids: Sequence[Sequence[int]],
        prompt_lens: Sequence[int],
        top_n: Sequence[int] | None = None,
        allowed: Sequence[torch.Tensor | None] | None = None,
        banned: Sequence[Sequence[int]] | None = None,
    ) -> SampleResult:
        """Process `logits` [N, V] (not modified) and choose one token per request."""
        plan = self._plan
        constrained = any(a is not None for a in allowed or ()) or any(banned or ())
        x = logits.to(torch.float32, copy=plan.modifies or constrained)
        if plan.watermark_rows:
            self._watermark(x, token_ids)
        if self._penalty is not None:
            self._penalty.update(token_ids, prompt_lens)
            self._apply_penalties(x)
        if plan.bias is not None:
            x.index_put_(plan.bias[:2], plan.bias[2], accumulate=True)
        if constrained:
            self._constrain(x, allowed or [None] * len(self), banned or [[]] * len(self))
        top_n = top_n or [0] * len(self)
        if not plan.sample_rows and not any(top_n) and x.device.type == "cpu" and x.is_contiguous():
            kernels = native.kernels()
            if kernels is not None:  # all greedy, no alternatives asked: argmax and logsumexp in one C pass
                next_ids, lse = kernels.argmax_lse(x)
                chosen = x.gather(1, next_ids.unsqueeze(1)).squeeze(1) - lse
                return SampleResult(next_ids.tolist(), chosen.tolist(), [[] for _ in top_n], [[] for _ in top_n])
        next_ids = x.argmax(-1)
        if plan.sample_rows:
            x, next_ids = self._sample(x, next_ids)
        logprobs = torch.log_softmax(x, -1)
        return self._result(logprobs, next_ids, top_n)

    def _watermark(self, x: torch.Tensor, token_ids: Sequence[Sequence[int]]) -> None:
        vocab = x.shape[1]
        for row in self._plan.watermark_rows:
            if token_ids[row]:
                green = _green_list(int(token_ids[row][-1]), vocab).to(x.device, non_blocking=True)
                x[row].index_add_(0, green, torch.full(green.shape, WATERMARK_DELTA, device=x.device))

    def _apply_penalties(self, x: torch.Tensor) -> None:
        plan, state = self._plan, self._penalty
        y = x if plan.penalty_all else x.index_select(0, plan.penalty_idx)
        if plan.repetition is not None:
            penalised = torch.where(y < 0, y * plan.repetition, y / plan.repetition)
            y = torch.where(state.seen, penalised, y)
        if plan.frequency is not None:
            y = y - plan.frequency * state.counts
        if plan.presence is not None:
            y = y - plan.presence * (state.counts > 0)
        if plan.penalty_all:
            x.copy_(y)
        else:
            x.index_copy_(0, plan.penalty_idx, y)

    def _constrain(self, x: torch.Tensor, allowed: Sequence, banned: Sequence[Sequence[int]]) -> None:
        vocab = x.shape[1]
        for row, ids in enumerate(allowed):
            if ids is not None:
                # One spare slot takes ids beyond the logits (no data-dependent indexing, no sync).
                blocked = torch.ones(vocab + 1, dtype=torch.bool, device=x.device)
                ids = torch.as_tensor(ids, dtype=torch.int64).to(x.device, non_blocking=True)
                blocked[ids.clamp(max=vocab)] = False
                x[row].masked_fill_(blocked[:vocab], _NEG_INF)
        pairs = [(r, t) for r, ids in enumerate(banned) for t in ids if 0 <= t < vocab]
        if pairs:
            # A grammar whose only way on is EOS beats min_new_tokens: a row left with
            # no token at all keeps its grammar-masked scores (checked on device, no sync).
            before = x.clone() if any(a is not None for a in allowed) else None
            rc = torch.tensor(pairs, dtype=torch.int64).to(x.device, non_blocking=True)
            x[rc[:, 0], rc[:, 1]] = _NEG_INF
            if before is not None:
                x.copy_(torch.where(torch.isneginf(x).all(-1, keepdim=True), before, x))

    def _sample(self, x: torch.Tensor, next_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Warp the sampling rows, draw each with its own generator; greedy rows keep argmax."""
        plan = self._plan
        s = x if plan.all_sample else x.index_select(0, plan.sample_idx)
        s = self._warp(s)
        drawn = self._draw(torch.softmax(s, -1), [self.generators[row] for row in plan.sample_rows])
        if plan.all_sample:
            return s, drawn
        x.index_copy_(0, plan.sample_idx, s)
        next_ids.index_copy_(0, plan.sample_idx, drawn)
        return x, next_ids

    @staticmethod
    def _draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Inverse-CDF sampling: one uniform per row from that row's own generator.

        torch.multinomial (and the exponential trick) draw a random number per
        vocabulary entry, row by row; here the per-row loop draws one scalar
        and the search over the cumulative distribution runs batched.
        """
        cdf = probs.cumsum(-1)
        total = cdf[:, -1:]
        u = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in generators]).unsqueeze(1)
        # Strictly below the total, so rounding can never land past the last likely token.
        target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cdf, target, right=True).squeeze(1)

    def _warp(self, s: torch.Tensor) -> torch.Tensor:
        plan = self._plan
        if plan.temperature is not None:
            s = s / plan.temperature
        if plan.top_k is not None:
            kth = torch.topk(s, plan.top_k_max, dim=-1).values
            kth = kth.gather(1, (plan.top_k.clamp(min=1) - 1).unsqueeze(1))
            kth = torch.where(plan.top_k.unsqueeze(1) > 0, kth, torch.full_like(kth, _NEG_INF))
            s = s.masked_fill(s < kth, _NEG_INF)
        if plan.top_p is not None:
            s = self._top_p(s, plan.top_p)
        if plan.typical_p is not None:
            s = self._typical_p(s, plan.typical_p)
        if plan.min_p is not None:
            probs = torch.softmax(s, -1)
            floor = plan.min_p * probs.max(-1, keepdim=True).values
            s = s.masked_fill(probs < floor, _NEG_INF)
        return s

    @staticmethod
    def _top_p(s: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        """Keep the most likely tokens until their mass reaches top_p (nucleus sampling)."""
        sorted_logits, order = s.sort(-1, descending=True)
        remove_sorted = _remove_after_mass(sorted_logits.softmax(-1), top_p)
        remove = remove_sorted.scatter(1, order, remove_sorted)
        return s.masked_fill(remove, _NEG_INF)

    @staticmethod
    def _typical_p(s: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        """Keep tokens whose surprise is closest to the entropy until their mass reaches typical_p."""
        logp = torch.log_softmax(s, -1)
        p = logp.exp()
        entropy = -torch.nan_to_num(logp * p).sum(-1, keepdim=True)
        distance = (-logp - entropy).abs()
        order = distance.argsort(-1)
        remove_sorted = _remove_after_mass(p.gather(1, order), mass)
        remove = remove_sorted.scatter(1, order, remove_sorted)
        return s.masked_fill(remove, _NEG_INF)

    def _result(self, logprobs: torch.Tensor, next_ids: torch.Tensor, top_n: Sequence[int]) -> SampleResult:
        chosen = logprobs.gather(1, next_ids.unsqueeze(1)).squeeze(1)
        n_max = min(max(top_n, default=0), logprobs.shape[1])
        top_ids: list[list[int]] = [[] for _ in top_n]
        top_lps: list[list[float]] = [[] for _ in top_n]
        if n_max > 0:
            values, indices = logprobs.topk(n_max, dim=-1)
            values, indices = values.tolist(), indices.tolist()
            for row, n in enumerate(top_n):
                # Tokens filtered out (-inf) are not alternatives worth reporting.
                kept = [(i, v) for i, v in zip(indices[row][:n], values[row][:n]) if v != _NEG_INF]
                top_ids[row] = [i for i, _ in kept]
                top_lps[row] = [v for _, v in kept]
        return SampleResult(next_ids.tolist(), chosen.tolist(), top_ids, top_lps)


def prompt_logprobs(logits: torch.Tensor, next_ids: Sequence[int]) -> list[float]:
    """Log-probabilities of `next_ids` under raw `logits` [n, V] (prefill logprobs, as TGI)."""
    ids = torch.as_tensor(list(next_ids), dtype=torch.int64, device=logits.device).unsqueeze(1)
    return torch.log_softmax(logits.float(), -1).gather(1, ids).squeeze(1).tolist()
