"""The sharded gRPC client: every call goes to all ranks, rank 0's reply is used.

Tensor-parallel shards run the same forward together (their collectives meet
inside it), so each Prefill/Decode/Filter/Clear must reach every rank; the
router waits for all of them and reads rank 0's answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc

from ember import tracing
from ember.proto import generate_pb2 as pb
from ember.proto import generate_pb2_grpc as pb_grpc

_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    # Shard calls are never retried by gRPC (a failed step is reported, not replayed); without the
    # retry machinery each call costs the client less CPU (measured: ~10-20 % of a Decode call's).
    ("grpc.enable_retries", 0),
]


# Called as soon as a Prefill/Decode is handed to gRPC (see ShardedClient._all).
OnSent = Callable[[], None] | None


def unix_url(path_or_url: str) -> str:
    return path_or_url if path_or_url.startswith("unix:") else f"unix://{path_or_url}"


class ShardClient:
    """One rank."""

    def __init__(self, url: str) -> None:
        self.url = unix_url(url)
        self.channel = grpc.aio.insecure_channel(self.url, options=_OPTIONS)
        self.stub = pb_grpc.TextGenerationServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()


class ShardedClient:
    def __init__(self, shards: list[ShardClient]) -> None:
        self.shards = shards
        # Calls that run the model (collectives inside) must reach every rank in the
        # same order; the batching task and e.g. embeddings routes call concurrently.
        self._model_lock = asyncio.Lock()

    @classmethod
    async def connect(cls, master_uds_path: str, timeout: float = 30.0) -> ShardedClient:
        """Ask the master shard for every rank's socket and connect to all of them."""
        master = ShardClient(master_uds_path)
        reply = await master.stub.ServiceDiscovery(pb.ServiceDiscoveryRequest(), timeout=timeout)
        await master.close()
        urls = list(reply.urls) or [master_uds_path]
        return cls([ShardClient(u) for u in urls])

    async def _all(self, method: str, request: Any, timeout: float | None = None, on_sent: OnSent = None) -> list[Any]:
        """`on_sent` runs as soon as the requests are handed to gRPC, before the replies are awaited:
        the batcher hands the last step's tokens over there (Batcher._deliver), so their fan-out to
        the clients runs while the shards work on this call instead of delaying its start."""
        metadata = tracing.outgoing()  # the current span's context for the shards' spans; None: tracing off
        if metadata is None:
            calls = [getattr(s.stub, method)(request, timeout=timeout) for s in self.shards]
        else:
            calls = [getattr(s.stub, method)(request, timeout=timeout, metadata=metadata) for s in self.shards]
        if on_sent is not None:
            on_sent()
        if len(calls) == 1:
            return [await calls[0]]
        return list(await asyncio.gather(*calls))

    async def _ordered(
        self, method: str, request: Any, timeout: float | None = None, on_sent: OnSent = None
    ) -> list[Any]:
        """`_all` for calls that run the model: one at a time, so every rank sees one order."""
        if len(self.shards) == 1:
            return await self._all(method, request, timeout, on_sent)
        async with self._model_lock:
            return await self._all(method, request, timeout, on_sent)

    async def info(self) -> pb.InfoResponse:
        return await self.shards[0].stub.Info(pb.InfoRequest(), timeout=30)

    async def health(self, timeout: float = 10.0) -> None:
        await self._all("Health", pb.HealthRequest(), timeout)

    async def clear_cache(self, batch_id: int | None = None) -> None:
        req = pb.ClearCacheRequest() if batch_id is None else pb.ClearCacheRequest(id=batch_id)
        await self._ordered("ClearCache", req)

    async def filter_batch(self, batch_id: int, request_ids: list[int]) -> pb.CachedBatch:
        replies = await self._ordered("FilterBatch", pb.FilterBatchRequest(batch_id=batch_id, request_ids=request_ids))
        return replies[0].batch

    async def warmup(self, request: pb.WarmupRequest) -> pb.WarmupResponse:
        """Every rank sizes its cache; the smallest capacity is the usable one."""
        replies = await self._ordered("Warmup", request)
        return min(replies, key=lambda r: r.max_supported_total_tokens)

    async def prefill(
        self,
        batch: pb.Batch,
        cached_batch: pb.CachedBatch | None = None,
        on_sent: OnSent = None,
        prompt_budget: int = 0,
    ) -> pb.PrefillResponse:
        request = pb.PrefillRequest(batch=batch, prompt_budget=prompt_budget)
        if cached_batch is not None:
            request.cached_batch.CopyFrom(cached_batch)
        return (await self._ordered("Prefill", request, on_sent=on_sent))[0]

    async def decode(
        self, batches: list[pb.CachedBatch], on_sent: OnSent = None, prompt_budget: int = 0
    ) -> pb.DecodeResponse:
        request = pb.DecodeRequest(batches=batches, prompt_budget=prompt_budget)
        return (await self._ordered("Decode", request, on_sent=on_sent))[0]

    async def embed(self, inputs: list[list[int]]) -> pb.EmbedResponse:
        req = pb.EmbedRequest(inputs=[pb.EmbedInput(input_ids=ids) for ids in inputs])
        return (await self._ordered("Embed", req))[0]

    async def compile_grammar(self, regex: str, timeout: float | None = None) -> pb.CompileGrammarResponse:
        """Have every rank build (and cache) the index of a regex grammar, off its model thread."""
        req = pb.CompileGrammarRequest(grammar_type=pb.GRAMMAR_TYPE_REGEX, grammar=regex)
        return (await self._all("CompileGrammar", req, timeout))[0]

    async def close(self) -> None:
        for shard in self.shards:
            await shard.close()
