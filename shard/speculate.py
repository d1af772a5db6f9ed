"""N-gram speculative decoding (`--speculate N`): drafts from a sequence's own tokens, and which to verify.

Answers that quote or edit their input (code edits, extraction, summaries with quotes, RAG) repeat
long runs of their prompt. A decoding request looks up its last few tokens earlier in its own
prompt and output (`NgramIndex`: the longest n-gram, most recent occurrence) and proposes the
tokens that followed there. The step runs them after the request's next token in the same ragged
forward, as a short prompt chunk over its cached context, and the batch verifies them in order
(`batch.GenerationBatch`): each position's logits go through the request's whole sampling
pipeline, and a draft token is accepted when the chosen token equals it. The first mismatch is
itself the next token; when every draft is accepted, the logits after the last one give one more.
The KV of rejected positions is dropped (the runner's `accept`), and never named in the prefix
cache.

Choosing each token exactly as without speculation keeps outputs unchanged: greedy decoding token
for token, and seeded sampling too, since a request's generator draws one number per emitted
token either way. For a draft that puts all its mass on one token this "sample, then compare" is
the standard accept/reject rule (accept with probability min(1, p/q) = p(draft); on rejection draw
from the residual, which is p without the draft token), so the distribution is the model's.

A draft token costs forward time whether or not it is accepted. `SpeculationPolicy` decides per
step how many to run: the step times of decode steps with and without drafts, measured on the
shard at warmup for a range of batch sizes (`runner.speculation_costs`), and each request's
acceptance rate seen so far give the tokens per second a step would yield with each draft
token added; it keeps the count that yields most, and none unless that beats plain decoding by
`MARGIN`. Large batches, where a token row costs what it brings, run without drafts.
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass

MIN_NGRAM = 2  # a single repeated token says too little about what follows
MAX_NGRAM = 4
PRIOR_ACCEPTANCE = 0.5  # a new request's acceptance rate before any of its drafts was verified
RATE_ALPHA = 0.3  # weight of the newest verified token in a request's acceptance rate
MARGIN = 0.10  # drafts run only when the step's expected tokens/s beats plain decoding by this much


class NgramIndex:
    """Where each n-gram (MIN_NGRAM..MAX_NGRAM tokens) of a growing sequence last occurred.

    Built as the sequence grows, a token at a time, so a step costs the tokens appended since the
    last proposal, not the sequence's length."""

    def __init__(self, min_n: int = MIN_NGRAM, max_n: int = MAX_NGRAM) -> None:
        self.sizes = range(max_n, min_n - 1, -1)  # longest first
        self.ends: dict[tuple[int, ...], int] = {}  # n-gram -> where it last ended (exclusive)
        self.indexed = 0  # every n-gram ending at or before this position is in `ends`
        # The copy being followed: at sequence length `at`, the tokens before `source` matched the last ones.
        self.source: int | None = None
        self.at = 0

    def propose(self, ids: list[int], k: int) -> list[int]:
        """Up to `k` tokens that followed the earlier occurrence of `ids`' last tokens: the passage the
        sequence has been copying while it goes on copying it, else the longest, most recent n-gram match.

        Following the copy matters where a passage repeats short phrases: "the large" may occur ten
        times, but the text being copied goes on from one place."""
        end = len(ids)
        ends = self.ends
        # Index the n-grams ending before the last position: the one ending there is what we look up.
        for e in range(self.indexed + 1, end):
            for n in self.sizes:
                if e >= n:
                    ends[tuple(ids[e - n : e])] = e
        self.indexed = max(self.indexed, end - 1)
        if k <= 0:
            return []
        if self.source is not None:
            grown = end - self.at
            source = self.source + grown
            if source < end and ids[self.source : source] == ids[self.at : end]:
                self.source, self.at = source, end
                return ids[source : source + k]
            self.source = None
        for n in self.sizes:
            if end > n:
                found = ends.get(tuple(ids[end - n :]))
                if found is not None:
                    self.source, self.at = found, end
                    return ids[found : found + k]
        return []


@dataclass
class StepCosts:
    """Forward seconds of decode steps at `batch` sizes: without drafts, and with `draft` tokens per row."""

    batch: list[int]
    plain: list[float]
    drafted: list[float]
    draft: int

    def plain_at(self, rows: int) -> float:
        return _interpolate(self.batch, self.plain, rows)

    def per_draft_token(self, rows: int) -> float:
        """What one draft token adds to a step of `rows` rows: as measured, and never less than one more
        row adds (a draft token does a row's work; a lower figure is the noise of a shared machine)."""
        extra = [max(0.0, d - p) / (b * self.draft) for b, p, d in zip(self.batch, self.plain, self.drafted)]
        return max(_interpolate(self.batch, extra, rows), self.marginal_row(rows))

    def marginal_row(self, rows: int) -> float:
        """What one more row adds to a step of `rows` rows: the slope of the plain times from there on."""
        if len(self.batch) == 1:
            return self.plain[0] / self.batch[0]
        i = min(max(bisect.bisect_right(self.batch, rows), 1), len(self.batch) - 1)
        slope = (self.plain[i] - self.plain[i - 1]) / (self.batch[i] - self.batch[i - 1])
        return max(slope, 0.0)


def _interpolate(xs: list[int], ys: list[float], x: float) -> float:
    """Piecewise linear through (xs, ys); straight on past the ends."""
    if len(xs) == 1:
        return ys[0] * x / xs[0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


class SpeculationPolicy:
    """How many draft tokens each request of a step runs (see the module's doc)."""

    def __init__(self, max_draft: int, costs: StepCosts | None = None, measured: bool = True) -> None:
        self.max_draft = max_draft
        self.costs = costs
        self.measured = measured  # False (`--speculate-policy always`): no costs, every draft verified

    @property
    def enabled(self) -> bool:
        return self.max_draft > 0

    def plan(self, rows: int, prompt_tokens: int, candidates: list[tuple[float, int]]) -> list[int]:
        """Draft tokens per candidate, given as (acceptance rate, most tokens it may draft), for a step of
        `rows` decode rows and `prompt_tokens` prompt tokens. Without measured costs: every draft whole."""
        if not candidates:
            return []
        if self.costs is None:
            return [k for _, k in candidates]
        # Expected tokens the j-th draft token of a row brings: rate ** j (every one before it accepted).
        gains = [(-(rate**j), i) for i, (rate, k) in enumerate(candidates) for j in range(1, k + 1)]
        heapq.heapify(gains)
        per_token = self.costs.per_draft_token(rows)
        base = self.costs.plain_at(rows) + prompt_tokens * per_token
        best_rate, best_m = rows / base, 0
        tokens, taken = float(rows), []
        while gains:
            gain, i = heapq.heappop(gains)
            tokens -= gain
            taken.append(i)
            rate = tokens / (base + per_token * len(taken))
            if rate > best_rate:
                best_rate, best_m = rate, len(taken)
        if best_m == 0 or best_rate < (1 + MARGIN) * rows / base:
            return [0] * len(candidates)
        counts = [0] * len(candidates)
        for i in taken[:best_m]:
            counts[i] += 1
        return counts


def update_rate(rate: float, accepted: int, verified: int) -> float:
    """A request's acceptance rate after a step: its accepted draft tokens count 1, the first rejected 0."""
    for j in range(verified):
        rate += RATE_ALPHA * ((1.0 if j < accepted else 0.0) - rate)
        if j >= accepted:
            break
    return rate
