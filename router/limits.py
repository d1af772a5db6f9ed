"""The router's limits (TGI's flag names) and the rules relating them."""

from __future__ import annotations

from dataclasses import dataclass

from ember import settings


def _d(name: str):
    return settings.default(name)


class LimitsError(ValueError):
    """Inconsistent limits: the router refuses to start."""


@dataclass
class Limits:
    """The router's limits; defaults from the settings registry, the token sizes settled at warmup."""

    max_concurrent_requests: int = _d("max-concurrent-requests")
    max_best_of: int = _d("max-best-of")
    max_stop_sequences: int = _d("max-stop-sequences")
    max_top_n_tokens: int = _d("max-top-n-tokens")
    max_input_tokens: int = 4095
    max_total_tokens: int = 4096
    waiting_served_ratio: float = _d("waiting-served-ratio")
    max_batch_prefill_tokens: int = 4096
    max_batch_total_tokens: int = 16384
    max_waiting_tokens: int = _d("max-waiting-tokens")
    # With shared prefills: prompt tokens one step takes on before it stops adding newcomers (the
    # first newcomer always fits): the shard's prefill budget (Info `prefill_chunk_tokens`), so the
    # router never hands a step more prompt than the shard runs in it (`prefill_step_budget`).
    prefill_step_tokens: int = 256
    max_batch_size: int | None = None
    validation_workers: int = _d("validation-workers")
    max_client_batch_size: int = _d("max-client-batch-size")
    disable_grammar_support: bool = False
    # Seconds the shards may take to build a grammar's index before the request fails (422).
    grammar_compile_timeout: float = _d("grammar-compile-timeout")

    def check(self) -> None:
        """TGI's start-up checks, with its messages."""
        if self.max_input_tokens >= self.max_total_tokens:
            raise LimitsError(
                f"`max_input_tokens` must be < `max_total_tokens` "
                f"(got {self.max_input_tokens} and {self.max_total_tokens})"
            )
        if self.max_batch_prefill_tokens < self.max_input_tokens:
            raise LimitsError(
                f"`max_batch_prefill_tokens` must be >= `max_input_tokens`. "
                f"Given: {self.max_batch_prefill_tokens} and {self.max_input_tokens}"
            )
        if self.max_total_tokens > self.max_batch_total_tokens:
            raise LimitsError(
                f"`max_total_tokens` must be <= `max_batch_total_tokens`. "
                f"Given: {self.max_total_tokens} and {self.max_batch_total_tokens}"
            )
        if self.max_concurrent_requests < 1:
            raise LimitsError("`max_concurrent_requests` must be >= 1")


def prefill_step_budget(shard_chunk: int, max_batch_prefill_tokens: int) -> int:
    """Prompt tokens newcomers may bring into one shared step: the shard's own budget per step
    (Info `prefill_chunk_tokens`, the one `--prefill-chunk-tokens` setting), or, where the shard runs
    whole prompts (0), the whole prefill budget."""
    return shard_chunk or max_batch_prefill_tokens


def resolve_pre_warmup(
    max_input: int | None,
    max_total: int | None,
    max_prefill: int | None,
    max_position_embeddings: int,
    cpu_cap: int = 4096,
) -> tuple[int, int, int]:
    """max_input/max_total/max_batch_prefill before Warmup (TGI's defaults, capped for CPU)."""
    if max_total is None:
        cap = max_position_embeddings or cpu_cap
        max_total = min(cap, cpu_cap)
        if max_input is not None and max_input >= max_total:
            max_total = max_input + 1
    if max_input is None:
        max_input = max_total - 1
    if max_prefill is None:
        max_prefill = max(max_input + 50, min(4096, max_total))
    return max_input, max_total, max_prefill


def apply_capacity(limits: Limits, capacity: int, total_given: bool, batch_total: int | None) -> None:
    """Fit max_total/max_batch_total to Warmup's capacity (TGI: min(capacity, ...))."""
    if capacity and capacity < limits.max_total_tokens:
        if total_given:
            raise LimitsError(f"Not enough memory to handle `max_total_tokens={limits.max_total_tokens}`")
        limits.max_total_tokens = capacity
        limits.max_input_tokens = min(limits.max_input_tokens, capacity - 1)
    if batch_total is None:
        limits.max_batch_total_tokens = capacity or max(limits.max_total_tokens, limits.max_batch_prefill_tokens)
    else:
        limits.max_batch_total_tokens = min(batch_total, capacity) if capacity else batch_total
