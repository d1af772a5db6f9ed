"""The shard's gRPC servicer (grpc.aio over a unix socket).

Each rpc is a thin translation: hand the request to the engine on the single
model thread, map the engine's exceptions to a gRPC status with a message for
that call, and keep serving. Only one model operation runs at a time, so the
engine needs no locks and every rank runs the same operations in the same
order (which tensor parallelism's collectives require). CompileGrammar is the
exception: it only fills the grammar compiler's (locked) cache, on its own
threads, so building an index never delays a decode step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from ember import tracing
from ember.proto import generate_pb2 as pb
from ember.proto import generate_pb2_grpc as pb_grpc
from ember.schema_regex import GrammarError
from ember.shard.batch import BadRequest
from ember.shard.engine import Engine, UnknownBatch
from ember.shard.kv_cache import OutOfBlocks

log = logging.getLogger(__name__)


def socket_path(prefix: str, rank: int) -> str:
    return f"{prefix}-{rank}"


def model_executor() -> ThreadPoolExecutor:
    """The one thread that runs every torch operation of the shard: loading, warmup, steps.

    One thread means one OpenMP thread team. A second thread that ran parallel ops
    (e.g. the main thread loading the weights) leaves its own idle team behind;
    libgomp then counts more threads than CPUs and stops spinning between parallel
    regions, and every region pays a futex wake-up (measured: decode steps ~35%
    slower on 2 cores). So the CLI loads the model on this executor too.
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")


class Servicer(pb_grpc.TextGenerationServiceServicer):
    def __init__(
        self, engine: Engine, uds_prefix: str, world_size: int, executor: ThreadPoolExecutor | None = None
    ) -> None:
        self.engine = engine
        self.urls = [f"unix://{socket_path(uds_prefix, r)}" for r in range(world_size)]
        self.executor = executor or model_executor()
        # outlines-core releases the GIL while building an index: these threads run beside the model's.
        self.grammar_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar")

    async def _run(self, context: grpc.aio.ServicerContext, fn: Callable, *args):
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.executor, fn, *args)
        except BadRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except UnknownBatch as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except OutOfBlocks as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"out of KV cache blocks: {exc}")
        except Exception as exc:  # the shard keeps serving; the router fails the affected requests
            log.error("rpc failed: %s\n%s", exc, traceback.format_exc())
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    async def Info(self, request, context):
        return await self._run(context, self.engine.info)

    async def Health(self, request, context):
        await self._run(context, self.engine.health)
        return pb.HealthResponse()

    async def ServiceDiscovery(self, request, context):
        return pb.ServiceDiscoveryResponse(urls=self.urls)

    async def ClearCache(self, request, context):
        await self._run(context, self.engine.clear, request.id if request.HasField("id") else None)
        return pb.ClearCacheResponse()

    async def FilterBatch(self, request, context):
        cached = await self._run(context, self.engine.filter, request.batch_id, list(request.request_ids))
        return pb.FilterBatchResponse(batch=cached)

    async def Warmup(self, request, context):
        return await self._run(context, self.engine.warmup, request)

    async def Prefill(self, request, context):
        return await self._run(context, self.engine.prefill, request)

    async def Decode(self, request, context):
        return await self._run(context, self.engine.decode, request)

    async def Embed(self, request, context):
        return await self._run(context, self.engine.embed, request)

    async def CompileGrammar(self, request, context):
        compiler = self.engine.ctx.grammar_compiler
        start = time.perf_counter_ns()
        cached = compiler.contains(request.grammar_type, request.grammar)
        try:
            await asyncio.get_running_loop().run_in_executor(
                self.grammar_executor, compiler.compile, request.grammar_type, request.grammar
            )
        except GrammarError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.CompileGrammarResponse(cached=cached, total_ns=time.perf_counter_ns() - start)


async def serve(
    engine: Engine, uds_prefix: str, rank: int, world_size: int, executor: ThreadPoolExecutor | None = None
) -> None:
    """Serve until SIGTERM/SIGINT; the socket file exists only while serving.

    `executor` is the model thread (`model_executor()`) the engine was built on, if any.
    """
    path = socket_path(uds_prefix, rank)
    if os.path.exists(path):
        os.unlink(path)
    server = grpc.aio.server(
        interceptors=tracing.server_interceptors(),  # a span per call with --otlp-endpoint; None without
        options=[
            ("grpc.max_send_message_length", 256 * 1024 * 1024),
            ("grpc.max_receive_message_length", 256 * 1024 * 1024),
        ],
    )
    pb_grpc.add_TextGenerationServiceServicer_to_server(Servicer(engine, uds_prefix, world_size, executor), server)
    server.add_insecure_port(f"unix://{path}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    log.info("shard %d serving on unix://%s", rank, path)
    try:
        await stop.wait()
    finally:
        log.info("shard %d stopping", rank)
        await server.stop(grace=1.0)
        if os.path.exists(path):
            os.unlink(path)
