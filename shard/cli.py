"""`ember-shard serve`: load one tensor-parallel rank of a model and serve it over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from pathlib import Path

from ember.logs import setup_logging

log = logging.getLogger("ember.shard")


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="ember-shard", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="load the model and serve the gRPC contract on a unix socket")
    s.add_argument("--model-id", required=True, help="a local model directory, a .gguf file, or 'smollm2'")
    s.add_argument("--uds-path", default="/tmp/ember-server", help="socket prefix; rank r listens on PREFIX-r")
    s.add_argument("--rank", type=int, default=int(env("RANK", "0")))
    s.add_argument("--world-size", type=int, default=int(env("WORLD_SIZE", "1")))
    s.add_argument("--master-addr", default=env("MASTER_ADDR", "127.0.0.1"))
    s.add_argument("--master-port", type=int, default=int(env("MASTER_PORT", "29500")))
    s.add_argument("--dtype", default=env("DTYPE"), choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    s.add_argument("--matmul-dtype", default=env("MATMUL_DTYPE"), choices=["float32", "bfloat16", "float16"],
                   help="dtype of the linear layers' weights (default: --dtype). 'bfloat16' under float32 "
                        "keeps embedding, norms, attention and KV cache in float32, runs the matmuls on the "
                        "CPU's bf16 units and recomputes each token's 16 best logits in float32: 2-3x faster "
                        "decode on avx512_bf16 CPUs, logprobs within ~0.2 of float32")
    s.add_argument("--quantize", default=env("QUANTIZE") or None, choices=["int8", "int4", "w4a8"],
                   help="CPU weight-only quantization of the decoder's linear layers, multiplied in bf16: "
                        "int8 (a scale per output feature) or int4 (a scale and minimum per 32 inputs, "
                        "GGUF Q4_1's layout: a model converted from Q4_1 keeps its 4-bit codes); w4a8: int4 weights "
                        "times int8 activations on Ember's AVX-512 VNNI kernel (llama.cpp's Q4_1 x Q8_1), faster "
                        "at every batch size, less precise")
    s.add_argument("--kv-cache-dtype", default=env("KV_CACHE_DTYPE", "auto"),
                   choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the cached keys and values. auto: the model's, except bfloat16 for float32 "
                        "models on CPU with bf16 matmuls (--matmul-dtype bfloat16 or --quantize): decode "
                        "attention then reads half the bytes")
    s.add_argument("--num-threads", type=int, default=int(env("OMP_NUM_THREADS", "0")) or None,
                   help="torch intra-op threads (default: the CPUs this process may run on / world size)")
    s.add_argument("--kv-cache-bytes", type=int, default=int(env("KV_CACHE_BYTES", "0")) or None,
                   help="CPU: bytes for the KV cache (default: a share of free memory)")
    s.add_argument("--cuda-memory-fraction", type=float, default=float(env("CUDA_MEMORY_FRACTION", "0.9")))
    s.add_argument("--cuda-graphs", default=env("CUDA_GRAPHS"),
                   help="batch sizes whose decode steps replay CUDA graphs, comma-separated; 0 turns them off "
                        "(default 1,2,4,...,256 on CUDA; captured the first time each is needed)")
    s.add_argument("--prefill-chunk-tokens", type=int, default=int(env("PREFILL_CHUNK_TOKENS", "-1")),
                   help="most prompt tokens a step runs; longer prompts go on in the next steps, so running "
                        "streams never wait for a whole long prompt (default 256 on CPU, 2048 on CUDA; 0: "
                        "whole prompts)")
    s.add_argument("--json-output", action="store_true", default=env("JSON_OUTPUT", "") in ("1", "true"))
    s.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"))
    return p


def _device(rank: int):
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def set_threads(num_threads: int | None, world_size: int) -> int:
    """Intra-op threads for the model; one inter-op thread (the shard runs one forward at a time).

    By default the CPUs are split between the ranks of this machine, so tensor
    parallel ranks do not oversubscribe it. Must run before the first parallel
    torch op. Where the router and its clients share the cores, fewer threads can
    be faster: every parallel region waits for its slowest thread, and a thread
    that loses its core to another process stalls the whole step.
    """
    import torch

    n = num_threads or max(1, len(os.sched_getaffinity(0)) // world_size)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (inter-op work ran): harmless
        pass
    return n


def _dtype(name: str | None, device):
    import torch

    if name is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return getattr(torch, name)


# Prompt tokens per step by default, [CPU, CUDA]. On 2 Zen 4 cores 256 prompt tokens take ~0.15 s; against
# 512 (and whole prompts) it measured ITL p99 227 (434, 760) ms and TTFT p50 542 (929, 1,064) ms on the mix set
# at 4 and 16 streams, the same tokens/s; short prompts at 16 streams: ITL p99 152 vs 55 ms, TTFT 305 vs 345 ms.
DEFAULT_PREFILL_CHUNK = (256, 2048)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    setup_logging(f"shard-{args.rank}", args.json_output, args.log_level)
    start = time.perf_counter()

    from transformers import AutoTokenizer

    from ember.shard.dist import init_distributed
    from ember.shard.engine import Engine
    from ember.shard.grammar import GrammarCompiler
    from ember.shard.runner import load_runner
    from ember.shard.server import model_executor, serve

    model_dir = Path(args.model_id)
    if not model_dir.is_dir():
        from ember.store import resolve_model

        model_dir = resolve_model(args.model_id).path
    device = _device(args.rank)
    dtype = _dtype(args.dtype, device)
    executor = model_executor()
    from ember.shard.cuda_graphs import parse_batch_sizes

    cuda_graphs = parse_batch_sizes(args.cuda_graphs) if device.type == "cuda" else ()

    def load():
        """On the model thread: every torch op of this process runs there (see `model_executor`)."""
        threads = set_threads(args.num_threads, args.world_size)
        log.info("rank %d/%d: loading %s on %s in %s (matmuls in %s, %d threads)", args.rank, args.world_size,
                 model_dir, device, dtype, f"bfloat16 over {args.quantize} weights" if args.quantize
                 else args.matmul_dtype or dtype, threads)
        group = init_distributed(args.rank, args.world_size, args.master_addr, args.master_port, device)
        return load_runner(model_dir, dtype, device, rank=args.rank, world_size=args.world_size, group=group,
                           kv_cache_bytes=args.kv_cache_bytes, cuda_memory_fraction=args.cuda_memory_fraction,
                           matmul_dtype=args.matmul_dtype, quantize=args.quantize,
                           kv_cache_dtype=args.kv_cache_dtype, cuda_graphs=cuda_graphs)

    runner = executor.submit(load).result()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chunk = args.prefill_chunk_tokens
    if chunk < 0:
        chunk = DEFAULT_PREFILL_CHUNK[1 if device.type == "cuda" else 0]
    engine = Engine(runner, tokenizer, GrammarCompiler(tokenizer), kv_cache_bytes=args.kv_cache_bytes,
                    prefill_chunk=chunk)
    log.info("rank %d: model loaded in %.2fs (%s attention)", args.rank, time.perf_counter() - start,
             runner.info.attention_impl)
    asyncio.run(serve(engine, args.uds_path, args.rank, args.world_size, executor))


if __name__ == "__main__":
    main()
