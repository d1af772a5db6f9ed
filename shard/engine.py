"""The shard's engine: cached batches by id and the operations the rpcs call.

Everything here runs on the one model thread (see server.py), so it needs no
locks. Errors are raised as `BadRequest` (caller's fault), `UnknownBatch`, or
`OutOfBlocks` (from the KV cache); the servicer maps them to gRPC statuses.
"""

from __future__ import annotations

import logging
import time

from ember.proto import generate_pb2 as pb
from ember.shard.batch import BadRequest, Context, GenerationBatch
from ember.shard.runner import ModelRunner

log = logging.getLogger(__name__)


class UnknownBatch(KeyError):
    def __str__(self) -> str:
        return f"batch {self.args[0]} is not cached on this shard"


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer,
        grammar_compiler,
        kv_cache_bytes: int | None = None,
        prefill_chunk: int = 0,
        precision: tuple[str, str] = ("", ""),
        speculate: int = 0,
        measure_speculation: bool = True,
    ) -> None:
        self.runner = runner
        self.precision, self.precision_reason = precision
        self.ctx = Context(runner, tokenizer, grammar_compiler, prefill_chunk, speculate)
        self.ctx.speculation.measured = measure_speculation
        if speculate and not self.ctx.speculation.enabled:
            log.warning("--speculate %d: this model's path runs padded batches, which cannot verify drafts", speculate)
        self.kv_cache_bytes = kv_cache_bytes
        self.batches: dict[int, GenerationBatch] = {}

    # ---- cache ----------------------------------------------------------------------------

    def clear(self, batch_id: int | None) -> None:
        ids = list(self.batches) if batch_id is None else [batch_id]
        for i in ids:
            batch = self.batches.pop(i, None)
            if batch is not None:
                batch.release()

    def filter(self, batch_id: int, request_ids: list[int]) -> pb.CachedBatch | None:
        batch = self._take(batch_id)
        batch.filter(request_ids)
        return self._store(batch)

    def _take(self, batch_id: int) -> GenerationBatch:
        try:
            return self.batches.pop(batch_id)
        except KeyError:
            raise UnknownBatch(batch_id) from None

    def _store(self, batch: GenerationBatch) -> pb.CachedBatch | None:
        cached = batch.to_pb()
        if cached is not None:
            self.batches[batch.id] = batch
        return cached

    # ---- generation -----------------------------------------------------------------------

    def prefill(self, request: pb.PrefillRequest) -> pb.PrefillResponse:
        start = time.perf_counter_ns()
        if request.batch.id in self.batches:
            raise BadRequest(f"batch {request.batch.id} already exists on this shard")
        running = request.cached_batch if request.HasField("cached_batch") else None
        if running is not None:
            if not self.ctx.runner.info.shared_prefill:
                raise BadRequest("this shard's model path cannot prefill beside a cached batch; use Decode")
            if running.id not in self.batches:
                raise UnknownBatch(running.id)
        batch = GenerationBatch.from_pb(request.batch, self.ctx)  # a bad request leaves the running batch as it was
        concat_ns = None
        budget = request.prompt_budget
        if running is None:
            try:
                generations, timings = batch.step(budget)
            except BaseException:
                batch.release()
                raise
        else:
            batch = GenerationBatch.concatenate([self._take_as(running), batch])
            concat_ns = time.perf_counter_ns() - start
            generations, timings = self._step_stored(batch, budget)
        return self._reply(pb.PrefillResponse, generations, batch, timings, start, concat_ns)

    def _reply(self, response_type, generations, batch: GenerationBatch, timings, start: int, concat_ns: int | None):
        """A Prefill or Decode response: the generations, what stays cached, and the step's timings."""
        return response_type(
            generations=generations,
            batch=self._store(batch),
            forward_ns=timings.forward_ns,
            decode_ns=timings.decode_ns,
            total_ns=time.perf_counter_ns() - start,
            concat_ns=concat_ns,
            decode_rows=timings.decode_rows,
            prompt_tokens=timings.prompt_tokens,
            draft_tokens=timings.draft_tokens,
            accepted_tokens=timings.accepted_tokens,
        )

    def _step_stored(self, batch: GenerationBatch, prompt_budget: int = 0):
        """Step a batch made of cached ones, stored meanwhile: if the step fails, ClearCache(id) frees it."""
        self.batches[batch.id] = batch
        result = batch.step(prompt_budget)
        self.batches.pop(batch.id)
        return result

    def _take_as(self, cached: pb.CachedBatch) -> GenerationBatch:
        """Take a stored batch, dropping requests the router no longer lists (cancellations)."""
        part = self._take(cached.id)
        if len(cached.request_ids) != len(part.requests):
            part.filter(list(cached.request_ids))
        return part

    def decode(self, request: pb.DecodeRequest) -> pb.DecodeResponse:
        start = time.perf_counter_ns()
        if not request.batches:
            raise BadRequest("Decode needs at least one cached batch")
        missing = [b.id for b in request.batches if b.id not in self.batches]
        if missing:
            raise UnknownBatch(missing[0])
        parts = [self._take_as(b) for b in request.batches]
        batch = GenerationBatch.concatenate(parts)
        concat_ns = time.perf_counter_ns() - start
        generations, timings = self._step_stored(batch, request.prompt_budget)
        return self._reply(pb.DecodeResponse, generations, batch, timings, start, concat_ns)

    # ---- the rest -------------------------------------------------------------------------

    def warmup(self, request: pb.WarmupRequest) -> pb.WarmupResponse:
        max_prefill = request.max_prefill_tokens or sum(len(r.input_ids) for r in request.batch.requests)
        max_total = request.max_total_tokens or max_prefill
        self.clear(None)
        capacity = self.runner.warmup(max_prefill, max_total, self.kv_cache_bytes)
        policy = self.ctx.speculation
        if policy.enabled and policy.measured:
            policy.costs = self.runner.speculation_costs(policy.max_draft)
        block_size = self.runner.info.block_size
        log.info("warmup: %d prefill tokens ran; KV cache holds %d tokens", max_prefill, capacity)
        return pb.WarmupResponse(
            max_supported_total_tokens=capacity,
            num_blocks=capacity // block_size if block_size else 0,
            block_size=block_size,
        )

    def embed(self, request: pb.EmbedRequest) -> pb.EmbedResponse:
        start = time.perf_counter_ns()
        token_lists = [list(i.input_ids) for i in request.inputs]
        if not token_lists or any(not t for t in token_lists):
            raise BadRequest("every embedding input needs at least one token")
        vectors = self.runner.embed(token_lists)
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=v) for v in vectors.float().cpu().tolist()],
            total_ns=time.perf_counter_ns() - start,
        )

    def health(self) -> None:
        self.runner.health()

    def info(self) -> pb.InfoResponse:
        i = self.runner.info
        return pb.InfoResponse(
            requires_padding=i.requires_padding,
            dtype=i.dtype,
            device_type=i.device_type,
            window_size=i.window_size,
            speculate=self.ctx.speculation.max_draft,
            block_size=i.block_size,
            eos_token_ids=sorted(i.eos_token_ids),
            pad_token_id=i.pad_token_id,
            vocab_size=i.vocab_size,
            max_position_embeddings=i.max_position_embeddings,
            model_type=i.model_type,
            world_size=i.world_size,
            attention_impl=i.attention_impl,
            hidden_size=i.hidden_size,
            supports_embeddings=i.supports_embeddings,
            shared_prefill=i.shared_prefill,
            prefill_chunk_tokens=self.ctx.prefill_chunk,
            prefix_caching=self.runner.prefix_caching,
            precision=self.precision,
            precision_reason=self.precision_reason,
        )
