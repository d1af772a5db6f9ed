"""Shard engine figures straight over gRPC (no router): decode and prefill speed, start times.

    .venv/bin/python benchmarks/shard_bench.py [--model-id smollm2] [--batches 1 8 32]

Starts a real `ember-shard serve` process on the model, then measures:
- decode tokens/s at each batch size (greedy, ignore_eos, fixed new tokens),
- prefill tokens/s for a 512-token prompt,
- cold start (download + convert + load, into an empty cache) when --cold is given,
  and warm start (load from the cache) always.
Results go to benchmarks/results/shard.json (and are printed), with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent

import report  # noqa: E402
from servers import shard_process  # noqa: E402

from ember.proto import generate_pb2 as pb  # noqa: E402
from ember.proto import generate_pb2_grpc as pb_grpc  # noqa: E402


def request(rid: int, ids: list[int], max_new: int) -> pb.Request:
    return pb.Request(
        id=rid,
        input_ids=ids,
        parameters=pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=max_new, ignore_eos_token=True),
    )


def decode_speed(stub, batch_size: int, prompt: list[int], new_tokens: int, batch_id: int) -> float:
    reqs = [request(i, prompt, new_tokens) for i in range(batch_size)]
    out = stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=batch_id, requests=reqs, size=batch_size)))
    cached = out.batch
    steps = 0
    start = time.perf_counter()
    while cached is not None and cached.size:
        out = stub.Decode(pb.DecodeRequest(batches=[cached]))
        steps += 1
        cached = out.batch if out.HasField("batch") else None
    elapsed = time.perf_counter() - start
    return batch_size * steps / elapsed


def prefill_speed(stub, prompt: list[int], batch_id: int) -> float:
    start = time.perf_counter()
    out = stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=batch_id, requests=[request(0, prompt, 1)], size=1)))
    elapsed = time.perf_counter() - start
    assert out.generations
    return len(prompt) / elapsed


def batched_decode(model_dir: Path, env: dict, batch: int = 32, new_tokens: int = 48, repeats: int = 3) -> dict:
    """Decode tokens/s of one shard started with `env` (its settings: QUANTIZE, MATMUL_DTYPE, ...) at
    `batch` sequences, straight over gRPC: the engine's batched decode, without router or prefill."""
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(model_dir)("The history of the city of Paris begins")["input_ids"]
    with tempfile.TemporaryDirectory() as tmp, shard_process(model_dir, f"{tmp}/s", timeout=300, env=env) as socket:
        stub = pb_grpc.TextGenerationServiceStub(grpc.insecure_channel(f"unix://{socket}"))
        stub.Warmup(pb.WarmupRequest(max_prefill_tokens=1024, max_total_tokens=2048, max_input_tokens=1024))
        decode_speed(stub, batch, prompt, 8, 1)  # first steps of this shape
        runs = [decode_speed(stub, batch, prompt, new_tokens, 2 + i) for i in range(repeats)]
    return {
        "batch": batch,
        "new_tokens": new_tokens,
        "prompt_tokens": len(prompt),
        "env": env,
        "tokens_per_s": statistics.median(runs),
        "runs": runs,
    }


def timed_start(model_id: str, cache: str) -> float:
    """Seconds from process start until the shard answers Health (resolving the model itself)."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        with shard_process(model_id, f"{tmp}/s", timeout=900, env={"EMBER_CACHE": cache}):
            return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-id", default="smollm2")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cold", action="store_true", help="also time a start into an empty cache")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "shard.json"))
    args = p.parse_args()

    from transformers import AutoTokenizer

    from ember.store import resolve_model

    cache = os.environ.get("EMBER_CACHE", str(Path.home() / ".cache" / "ember"))
    results: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "model_id": args.model_id}
    if args.cold:
        with tempfile.TemporaryDirectory() as empty:
            results["cold_start_s"] = timed_start(args.model_id, empty)
    results["warm_start_s"] = timed_start(args.model_id, cache)

    model_dir = resolve_model(args.model_id).path
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = tok("The history of the city of Paris begins")["input_ids"]
    long_prompt = (tok("Paris is the capital of France. " * 80)["input_ids"])[:512]

    with tempfile.TemporaryDirectory() as tmp, shard_process(model_dir, f"{tmp}/s") as socket:
        stub = pb_grpc.TextGenerationServiceStub(grpc.insecure_channel(f"unix://{socket}"))
        stub.Warmup(pb.WarmupRequest(max_prefill_tokens=1024, max_total_tokens=2048, max_input_tokens=1024))
        batch_id = 1
        decode: dict[str, dict] = {}
        for b in args.batches:
            runs = []
            for _ in range(args.repeats):
                runs.append(decode_speed(stub, b, prompt, args.new_tokens, batch_id))
                batch_id += 1
            decode[str(b)] = {"median_tok_s": statistics.median(runs), "runs": runs}
        prefill = []
        for _ in range(args.repeats):
            prefill.append(prefill_speed(stub, long_prompt, batch_id))
            batch_id += 1
        results["decode"] = decode
        results["prefill_512"] = {"median_tok_s": statistics.median(prefill), "runs": prefill}

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report.portable(json.dumps(results, indent=2)))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
