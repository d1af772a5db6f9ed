"""The router's limits (TGI's flag names) and the rules relating them."""

from __future__ import annotations

import os
from dataclasses import dataclass


class LimitsError(ValueError):
    """Inconsistent limits: the router refuses to start."""


@dataclass
class Limits:
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_input_tokens: int = 4095
    max_total_tokens: int = 4096
    waiting_served_ratio: float = 1.2
    max_batch_prefill_tokens: int = 4096
    max_batch_total_tokens: int = 16384
    max_waiting_tokens: int = 20
    # With shared prefills: prompt tokens one step takes on before it stops adding newcomers
    # (the first newcomer always fits). Smaller: earlier first tokens for the first arrivals of a
    # burst and shorter pauses for running streams; the matmuls stay compute-bound at a few hundred.
    prefill_step_tokens: int = 512
    max_batch_size: int | None = None
    validation_workers: int = 2
    max_client_batch_size: int = 4
    disable_grammar_support: bool = False
    # Seconds the shards may take to build a grammar's index before the request fails (422).
    grammar_compile_timeout: float = 30.0

    def check(self) -> None:
        """TGI's start-up checks, with its messages."""
        if self.max_input_tokens >= self.max_total_tokens:
            raise LimitsError(
                f"`max_input_tokens` must be < `max_total_tokens` "
                f"(got {self.max_input_tokens} and {self.max_total_tokens})")
        if self.max_batch_prefill_tokens < self.max_input_tokens:
            raise LimitsError(
                f"`max_batch_prefill_tokens` must be >= `max_input_tokens`. "
                f"Given: {self.max_batch_prefill_tokens} and {self.max_input_tokens}")
        if self.max_total_tokens > self.max_batch_total_tokens:
            raise LimitsError(
                f"`max_total_tokens` must be <= `max_batch_total_tokens`. "
                f"Given: {self.max_total_tokens} and {self.max_batch_total_tokens}")
        if self.max_concurrent_requests < 1:
            raise LimitsError("`max_concurrent_requests` must be >= 1")


def shares_prefill_with_running(shard_can: bool) -> bool:
    """Whether newcomers join the running batch in one Prefill: when the shard can (Info
    `prefill_with_cached_batch`) and `PREFILL_CHUNKING` does not turn it off, as in TGI."""
    return shard_can and os.environ.get("PREFILL_CHUNKING", "1").lower() not in ("0", "false", "no", "off")


def resolve_pre_warmup(max_input: int | None, max_total: int | None, max_prefill: int | None,
                       max_position_embeddings: int, cpu_cap: int = 4096) -> tuple[int, int, int]:
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
