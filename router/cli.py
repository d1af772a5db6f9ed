"""`ember-router`: connect to the shards, warm them up, fix the limits, serve HTTP.

Every flag has TGI's name and default and also reads its environment
variable (MAX_INPUT_TOKENS for --max-input-tokens, ...). The router binds its
port only after Warmup, so "listening" means "ready", as with TGI.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import signal
import sys
import time

from ember import lifeline, settings, tracing
from ember.proto import generate_pb2 as pb
from ember.router.limits import Limits, LimitsError, apply_capacity, prefill_step_budget, resolve_pre_warmup

log = logging.getLogger("ember.router")


def parse_args(argv: list[str] | None = None, environ=None) -> argparse.Namespace:
    """The settings the registry says the router reads (`ember.settings`), from flags, then env, then defaults."""
    parser = argparse.ArgumentParser(prog="ember-router", description=__doc__.splitlines()[0])
    args = settings.parse(parser, settings.ROUTER, argv, environ)
    if not args.tokenizer_name:
        parser.error("--tokenizer-name (or TOKENIZER_NAME) is required")
    return args


def warmup_request(tokenizer, limits: Limits) -> pb.WarmupRequest:
    """Requests of max_input_tokens filling max_batch_prefill_tokens (TGI's warmup batch)."""
    base = tokenizer.encode_sync("_test " * 32, False).ids or [0]
    requests, remaining, i = [], limits.max_batch_prefill_tokens, 0
    new_tokens = max(limits.max_total_tokens - limits.max_input_tokens, 1)
    while remaining > 0:
        n = min(limits.max_input_tokens, remaining)
        ids = (base * (n // len(base) + 1))[:n]
        requests.append(
            pb.Request(
                id=i,
                inputs="_test",
                input_ids=ids,
                parameters=pb.NextTokenChooserParameters(
                    temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0
                ),
                stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=new_tokens),
            )
        )
        remaining -= n
        i += 1
    batch = pb.Batch(
        id=0, requests=requests, size=len(requests), max_tokens=sum(len(r.input_ids) + new_tokens for r in requests)
    )
    return pb.WarmupRequest(
        batch=batch,
        max_input_tokens=limits.max_input_tokens,
        max_prefill_tokens=limits.max_batch_prefill_tokens,
        max_total_tokens=limits.max_total_tokens,
    )


def _limits(args: argparse.Namespace, info: pb.InfoResponse) -> Limits:
    max_input, max_total, max_prefill = resolve_pre_warmup(
        args.max_input_tokens, args.max_total_tokens, args.max_batch_prefill_tokens, info.max_position_embeddings
    )
    limits = Limits(
        max_concurrent_requests=args.max_concurrent_requests,
        max_best_of=args.max_best_of,
        max_stop_sequences=args.max_stop_sequences,
        max_top_n_tokens=args.max_top_n_tokens,
        max_input_tokens=max_input,
        max_total_tokens=max_total,
        waiting_served_ratio=args.waiting_served_ratio,
        max_batch_prefill_tokens=max_prefill,
        max_batch_total_tokens=args.max_batch_total_tokens or max(max_total, max_prefill),
        max_waiting_tokens=args.max_waiting_tokens,
        max_batch_size=args.max_batch_size,
        prefill_step_tokens=prefill_step_budget(info.prefill_chunk_tokens, max_prefill),
        validation_workers=args.validation_workers,
        max_client_batch_size=args.max_client_batch_size,
        disable_grammar_support=args.disable_grammar_support,
        grammar_compile_timeout=args.grammar_compile_timeout,
    )
    limits.check()
    return limits


def _shard_info(info: pb.InfoResponse) -> dict:
    return {
        "dtype": info.dtype,
        "device_type": info.device_type,
        "num_shard": info.world_size,
        "attention_impl": info.attention_impl,
        "block_size": info.block_size,
        "max_position_embeddings": info.max_position_embeddings,
        "model_type": info.model_type,
        "vocab_size": info.vocab_size,
        "speculate": info.speculate,
        "requires_padding": info.requires_padding,
        "window_size": info.window_size if info.HasField("window_size") else None,
        "hidden_size": info.hidden_size,
        "supports_embeddings": info.supports_embeddings,
        "prefix_caching": info.prefix_caching,
        "precision": info.precision or None,
        "precision_reason": info.precision_reason or None,
    }


async def connect_model(
    args: argparse.Namespace,
    master_socket: str,
    tokenizer_dir: str,
    name: str,
    sha: str | None,
    group: str = "default",
    default: bool = True,
):
    """Connect to one model's shard group, warm it up, fix its limits; returns it as `models.Served`
    with its batcher running."""
    from ember.router.batcher import Batcher
    from ember.router.chat_template import ChatTemplate
    from ember.router.client import ShardedClient
    from ember.router.infer import Infer
    from ember.router.metrics import Metrics
    from ember.router.models import Served
    from ember.router.pacer import Pacer
    from ember.router.tokenizer import TokenizerPool
    from ember.router.validation import Validator

    tokenizer = TokenizerPool(tokenizer_dir, args.validation_workers)
    client = await ShardedClient.connect(master_socket)
    try:
        log.info("%s: connected to %d shard(s)", name, len(client.shards))
        info = await client.info()
        limits = _limits(args, info)  # refuse bad limits before touching the shards' state
        await client.clear_cache()
        reply = await client.warmup(warmup_request(tokenizer, limits))
    except BaseException:
        await client.close()
        tokenizer.close()
        raise
    log.info("%s: warmup: capacity %d tokens", name, reply.max_supported_total_tokens)
    apply_capacity(
        limits, reply.max_supported_total_tokens, args.max_total_tokens is not None, args.max_batch_total_tokens
    )
    limits.check()
    metrics = Metrics(limits.max_input_tokens, limits.max_total_tokens)
    metrics.batch_max_total_tokens.set(limits.max_batch_total_tokens)
    shared_prefill = info.shared_prefill and args.prefill_chunking
    log.info(
        "%s: new requests join the running batch %s",
        name,
        f"in a shared forward (shared prefill, {limits.prefill_step_tokens} prompt tokens a step)"
        if shared_prefill
        else "after their own prefill (TGI's waiting_served_ratio / max_waiting_tokens)",
    )
    if info.precision:
        log.info("%s: shards serve at %s: %s", name, info.precision, info.precision_reason)
    prefix_block = info.block_size if info.prefix_caching else 0  # shared prompt blocks are budgeted once
    pacer = Pacer(info.prefill_chunk_tokens if shared_prefill else 0, args.step_target_ms)
    batcher = Batcher(client, limits, metrics, shared_prefill=shared_prefill, prefix_block=prefix_block, pacer=pacer)
    infer = Infer(Validator(tokenizer, limits, client.compile_grammar), batcher, limits, metrics)
    log.info("%s: limits: %s", name, limits)
    batcher.start()
    return Served(
        name=name,
        group=group,
        infer=infer,
        client=client,
        tokenizer=tokenizer,
        limits=limits,
        metrics=metrics,
        shard_info=_shard_info(info),
        model_sha=sha,
        template=ChatTemplate.from_dir(tokenizer_dir),
        default=default,
    )


async def _models(args: argparse.Namespace, default):
    """The router's models: the default one and, with a launcher's control service, any registered one."""
    from ember.durations import keep_alive_text
    from ember.router.control import ControlClient
    from ember.router.models import Models

    control = registry = None
    if args.control_uds_path:
        control = ControlClient(args.control_uds_path)
        for group in await control.list():
            if group.default:
                default.group = group.group or default.group
                default.weights_bytes, default.rss_bytes = group.weights_bytes, group.rss_bytes
        from ember.registry import Registry

        registry = Registry(args.cache_dir)

    async def build_group(group, target):
        served = await connect_model(
            args,
            group.master_socket,
            group.model_dir,
            args.model_id if group.default else target.name,
            group.model_sha or None,
            group=group.group,
            default=group.default,
        )
        served.weights_bytes, served.rss_bytes = group.weights_bytes, group.rss_bytes
        return served

    return Models(
        default,
        args.model_id,
        build_group,
        control=control,
        registry=registry,
        keep_alive=keep_alive_text(args.keep_alive),
        max_loaded=args.max_loaded_models,
        memory=args.models_memory,
        strict=args.strict_model_names,
    )


async def build(args: argparse.Namespace):
    """Connect, warm up, fix the limits; returns the Starlette app."""
    from ember.router.app import AppState, create_app

    default = await connect_model(args, args.master_shard_uds_path, args.tokenizer_name, args.model_id, args.model_sha)
    models = await _models(args, default)
    for name in args.preload:
        log.info("preloading %s", name)
        await models.ensure_loaded(models.target(name))
    state = AppState(
        infer=default.infer,
        client=default.client,
        tokenizer=default.tokenizer,
        limits=default.limits,
        metrics=default.metrics,
        model_id=args.model_id,
        model_sha=args.model_sha,
        shard_info=default.shard_info,
        payload_limit=args.payload_limit,
        compute_type=args.compute_type or default.shard_info["device_type"],
        api_key=args.api_key,
        cors_allow_origin=args.cors_allow_origin,
        models=models,
        chat_template=default.template,
        model_management=not args.disable_model_management,
    )
    from ember.router.api import jan, ollama, openai

    routes = [*jan.install(state), *ollama.install(state), *openai.install(state, args.tokenizer_name)]
    return create_app(state, extra_routes=routes)


def _http_impl() -> str:
    """uvicorn's HTTP/1.1 parser: httptools (C) when installed, else the pure-Python h11."""
    return "httptools" if importlib.util.find_spec("httptools") is not None else "h11"


LAST_CLOSE_S = 1.0
"""After the drain: the most uvicorn waits for connections to close before it cancels what is left."""


async def serve(args: argparse.Namespace) -> None:
    import uvicorn

    app = await build(args)
    config = uvicorn.Config(
        app,
        host=args.hostname,
        port=args.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=LAST_CLOSE_S,
        lifespan="on",
        http=_http_impl(),
    )
    drain_s = max(args.graceful_shutdown_timeout - LAST_CLOSE_S - 0.5, 0.0)
    await draining_server(uvicorn, config, app.state.ember, drain_s).serve()


def draining_server(uvicorn, config, state, drain_s: float):
    """uvicorn's server, draining before it stops: the first SIGTERM/SIGINT marks the server draining
    (app.Traffic) and stops it once nothing is in flight, or after `drain_s`; a second stops it at once."""

    class DrainingServer(uvicorn.Server):
        loop: asyncio.AbstractEventLoop | None = None

        async def startup(self, sockets=None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets)

        def handle_exit(self, sig, frame) -> None:
            traffic = state.traffic
            if traffic.draining or self.should_exit or self.loop is None:
                super().handle_exit(sig, frame)
                return
            self._captured_signals.append(sig)  # re-raised once serve() returns, as uvicorn does
            traffic.draining = True
            state.server_metrics.draining.set(1)
            self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._drain()))

        async def _drain(self) -> None:
            traffic = state.traffic
            log.info("draining: %d requests in flight, up to %.0f s", traffic.active, drain_s)
            started = time.monotonic()
            if await traffic.idle(drain_s):
                log.info("drained in %.2f s", time.monotonic() - started)
            else:
                log.warning("drain timed out after %.0f s with %d requests in flight", drain_s, traffic.active)
            self.should_exit = True

    return DrainingServer(config)


def run_loop(main_coro, event_loop: str = "auto") -> None:
    """Run the router's event loop: uvloop when installed (less CPU per streamed token: every
    token is a socket write and a task wake-up), else asyncio's. `--event-loop asyncio`
    (EMBER_EVENT_LOOP=asyncio) forces asyncio's loop."""
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(main_coro)
            return
    asyncio.run(main_coro)


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    from ember.logs import setup_logging

    args = parse_args(argv)
    setup_logging("router", args.json_output, args.log_level)
    tracing.setup(args.otlp_endpoint, args.otlp_service_name)
    lifeline.die_with_parent("router")
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal: exit 0 then.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)
    try:
        run_loop(serve(args), args.event_loop)
    except LimitsError as exc:
        log.error("%s", exc)
        print(f"ember-router: {exc}", file=sys.stderr)
        return 1
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
