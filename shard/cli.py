"""`ember-shard serve`: load one tensor-parallel rank of a model and serve it over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from pathlib import Path

from ember import lifeline, settings, tracing
from ember.cpus import usable_cpus
from ember.logs import setup_logging

log = logging.getLogger("ember.shard")


def _parser(environ=None) -> argparse.ArgumentParser:
    """`ember-shard serve`'s flags: the settings the registry says a shard reads (`ember.settings`)."""
    p = argparse.ArgumentParser(prog="ember-shard", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="load the model and serve the gRPC contract on a unix socket")
    shard_settings = settings.read_by(settings.SHARD)
    settings.add_arguments(s, shard_settings, environ)
    s.set_defaults(_settings=shard_settings)
    return p


def parse_args(argv: list[str] | None = None, environ=None) -> argparse.Namespace:
    args = _parser(environ).parse_args(argv)
    return settings.finish(args, args.__dict__.pop("_settings"))


def _device(rank: int):
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def set_threads(num_threads: int | None, world_size: int) -> int:
    """Intra-op threads for the model; one inter-op thread (the shard runs one forward at a time).

    By default the CPUs are split between the ranks of this machine, so tensor
    parallel ranks do not oversubscribe it: the CPUs this process may run on,
    bounded by a container's CPU quota (`ember.cpus`). Must run before the first parallel
    torch op. Where the router and its clients share the cores, fewer threads can
    be faster: every parallel region waits for its slowest thread, and a thread
    that loses its core to another process stalls the whole step.
    """
    import torch

    n = num_threads or max(1, usable_cpus() // world_size)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (inter-op work ran): harmless
        pass
    return n


# Prompt tokens per step by default, [CPU, CUDA]. On 2 Zen 4 cores 256 prompt tokens take ~0.15 s; against
# 512 (and whole prompts) it measured ITL p99 227 (434, 760) ms and TTFT p50 542 (929, 1,064) ms on the mix set
# at 4 and 16 streams, the same tokens/s; short prompts at 16 streams: ITL p99 152 vs 55 ms, TTFT 305 vs 345 ms.
DEFAULT_PREFILL_CHUNK = (256, 2048)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(f"shard-{args.rank}", args.json_output, args.log_level)
    # Before the server exists: its interceptor makes the spans (none, nothing imported, without an endpoint).
    tracing.setup(args.otlp_endpoint, f"{args.otlp_service_name}.shard", {"ember.rank": args.rank})
    lifeline.die_with_parent(f"shard-{args.rank}")
    start = time.perf_counter()

    from ember.shard.dist import init_distributed
    from ember.shard.engine import Engine
    from ember.shard.grammar import GrammarCompiler
    from ember.shard.runner import load_runner, resolve_dtype
    from ember.shard.server import model_executor, serve
    from ember.shard.tokenizer import load_tokenizer

    model_dir = Path(args.model_id)
    if not model_dir.is_dir():
        from ember.store import resolve_model

        model_dir = resolve_model(args.model_id, cache_dir=args.cache_dir).path
    device = _device(args.rank)
    from ember.shard import native

    native.configure(enabled=args.native_kernels, cache_dir=args.cache_dir)
    executor = model_executor()
    from ember.shard.cuda_graphs import parse_batch_sizes
    from ember.shard.precision import choose

    cuda_graphs = parse_batch_sizes(args.cuda_graphs) if device.type == "cuda" else ()

    def load():
        """On the model thread: every torch op of this process runs there (see `model_executor`)."""
        threads = set_threads(args.num_threads, args.world_size)
        precision = choose(model_dir, device, args.dtype, args.matmul_dtype, args.quantize)
        log.info(
            "rank %d/%d: precision %s (%s%s)",
            args.rank,
            args.world_size,
            precision.summary,
            precision.reason,
            "; --quantize, --matmul-dtype or --dtype override it" if precision.automatic else "",
        )
        dtype = resolve_dtype(precision.dtype, device)
        log.info(
            "rank %d/%d: loading %s on %s in %s (%d threads)",
            args.rank,
            args.world_size,
            model_dir,
            device,
            dtype,
            threads,
        )
        group = init_distributed(args.rank, args.world_size, args.master_addr, args.master_port, device)
        runner = load_runner(
            model_dir,
            dtype,
            device,
            rank=args.rank,
            world_size=args.world_size,
            group=group,
            kv_cache_bytes=args.kv_cache_bytes,
            cuda_memory_fraction=args.cuda_memory_fraction,
            matmul_dtype=precision.matmul_dtype,
            quantize=precision.quantize,
            kv_cache_dtype=args.kv_cache_dtype,
            cuda_graphs=cuda_graphs,
            prefix_caching=args.prefix_caching,
        )
        return runner, precision

    runner, precision = executor.submit(load).result()
    tokenizer = load_tokenizer(model_dir)  # the Rust tokenizer alone: ~100 MiB less than transformers'
    chunk = args.prefill_chunk_tokens
    if chunk is None:
        chunk = DEFAULT_PREFILL_CHUNK[1 if device.type == "cuda" else 0]
    engine = Engine(
        runner,
        tokenizer,
        GrammarCompiler(tokenizer),
        kv_cache_bytes=args.kv_cache_bytes,
        prefill_chunk=chunk,
        precision=(precision.summary, precision.reason),
        speculate=args.speculate,
        measure_speculation=args.speculate_policy == "measured",
    )
    log.info(
        "rank %d: model loaded in %.2fs (%s attention)",
        args.rank,
        time.perf_counter() - start,
        runner.info.attention_impl,
    )
    asyncio.run(serve(engine, args.uds_path, args.rank, args.world_size, executor))


if __name__ == "__main__":
    main()
