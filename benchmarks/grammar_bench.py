"""Grammar figures: index compile time by schema size, and the decode cost of masking.

    .venv/bin/python benchmarks/grammar_bench.py [--model-id smollm2] [--batch 8] [--new-tokens 48]

1. Compile time of three JSON schemas of growing size on the model's
   vocabulary (schema -> regex, then the outlines-core Index), each on a
   fresh compiler so nothing is cached; the vocabulary is built once first.
2. Decode tokens/s at batch `--batch`, straight over gRPC to a real
   `ember-shard serve`, without a grammar and with a JSON grammar on every
   request. Only decode steps where the whole batch is alive are counted, so
   a request finishing early cannot flatter either figure. The grammar's
   index is built through the CompileGrammar rpc first (timed too), as the
   router does before queueing.
Results go to benchmarks/results/grammar.json (and are printed), with the command.
"""

from __future__ import annotations

import argparse
import json
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

SMALL = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
MEDIUM = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "email": {"type": "string"},
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "[0-9]{5}"},
            },
            "required": ["street", "city", "zip"],
        },
    },
    "required": ["name", "age", "email", "active", "role", "tags", "address"],
}
_ITEM = {
    "type": "object",
    "properties": {
        "sku": {"type": "string", "pattern": "[A-Z]{3}-[0-9]{4}"},
        "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
        "price": {"type": "number"},
        "gift": {"type": "boolean"},
    },
    "required": ["sku", "quantity", "price", "gift"],
}
LARGE = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "ORD-[0-9]{8}"},
        "customer": MEDIUM,
        "items": {"type": "array", "items": _ITEM, "minItems": 1, "maxItems": 10},
        "shipping": {
            "type": "object",
            "properties": {
                "method": {"enum": ["standard", "express", "overnight"]},
                "cost": {"type": "number"},
                "address": MEDIUM["properties"]["address"],
                "instructions": {"type": "string", "maxLength": 200},
            },
            "required": ["method", "cost", "address"],
        },
        "payment": {
            "type": "object",
            "properties": {
                "card": {"enum": ["visa", "mastercard", "amex"]},
                "last4": {"type": "string", "pattern": "[0-9]{4}"},
                "installments": {"type": "integer", "minimum": 1, "maximum": 12},
            },
            "required": ["card", "last4"],
        },
        "status": {"enum": ["pending", "paid", "shipped", "delivered", "cancelled"]},
        "notes": {"type": "array", "items": {"type": "string", "maxLength": 100}, "maxItems": 3},
    },
    "required": ["order_id", "customer", "items", "shipping", "payment", "status"],
}
# What every request of the decode run must produce: long enough that no request ends early.
DECODE_SCHEMA = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 400, "maxLength": 600}},
    "required": ["story"],
}


def compile_times(model_dir: Path) -> dict:
    from transformers import AutoTokenizer

    from ember.schema_regex import regex_for
    from ember.shard.grammar import GrammarCompiler

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    start = time.perf_counter()
    vocabulary = GrammarCompiler(tokenizer).vocabulary
    out: dict = {
        "vocabulary_build_s": round(time.perf_counter() - start, 3),
        "vocab_size": len(tokenizer),
        "schemas": {},
    }
    for name, schema in (("small", SMALL), ("medium", MEDIUM), ("large", LARGE)):
        start = time.perf_counter()
        regex = regex_for("json", schema, validate=False)
        regex_s = time.perf_counter() - start
        compiler = GrammarCompiler(tokenizer)
        compiler._vocabulary = vocabulary  # the same vocabulary: time the index alone
        start = time.perf_counter()
        compiler.compile("regex", regex)
        out["schemas"][name] = {
            "properties": json.dumps(schema).count('"type"'),
            "regex_chars": len(regex),
            "schema_to_regex_s": round(regex_s, 4),
            "index_s": round(time.perf_counter() - start, 3),
        }
    return out


def _request(rid: int, ids: list[int], new_tokens: int, regex: str | None) -> pb.Request:
    params = pb.NextTokenChooserParameters(
        temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0, do_sample=True, seed=rid
    )
    if regex:
        params.grammar, params.grammar_type = regex, pb.GRAMMAR_TYPE_REGEX
    return pb.Request(
        id=rid,
        input_ids=ids,
        parameters=params,
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=new_tokens, ignore_eos_token=True),
    )


def decode_speed(stub, batch: int, prompt: list[int], new_tokens: int, regex: str | None, batch_id: int) -> float:
    """Tokens/s over the decode steps that ran the whole batch."""
    reqs = [_request(i, prompt, new_tokens, regex) for i in range(batch)]
    cached = stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=batch_id, requests=reqs, size=batch))).batch
    full_steps, full_time = 0, 0.0
    while cached is not None and cached.size:
        size = cached.size
        start = time.perf_counter()
        out = stub.Decode(pb.DecodeRequest(batches=[cached]))
        elapsed = time.perf_counter() - start
        if size == batch:
            full_steps, full_time = full_steps + 1, full_time + elapsed
        cached = out.batch if out.HasField("batch") else None
    return batch * full_steps / full_time if full_time else 0.0


def decode_figures(model_dir: Path, batch: int, new_tokens: int, runs: int) -> dict:
    from transformers import AutoTokenizer

    from ember.schema_regex import regex_for

    prompt = AutoTokenizer.from_pretrained(model_dir)("Write a JSON object with a long story:")["input_ids"]
    regex = regex_for("json", DECODE_SCHEMA, validate=False)
    with (
        tempfile.TemporaryDirectory() as tmp,
        shard_process(model_dir, f"{tmp}/s", timeout=600) as socket,
        grpc.insecure_channel(f"unix://{socket}") as channel,
    ):
        stub = pb_grpc.TextGenerationServiceStub(channel)
        stub.Warmup(
            pb.WarmupRequest(
                batch=pb.Batch(id=0, requests=[_request(0, prompt, 1, None)], size=1),
                max_input_tokens=512,
                max_prefill_tokens=1024,
                max_total_tokens=2048,
            )
        )
        start = time.perf_counter()
        stub.CompileGrammar(pb.CompileGrammarRequest(grammar_type=pb.GRAMMAR_TYPE_REGEX, grammar=regex))
        compile_s = time.perf_counter() - start
        plain, constrained = [], []
        for r in range(runs):
            plain.append(decode_speed(stub, batch, prompt, new_tokens, None, 100 + 2 * r))
            constrained.append(decode_speed(stub, batch, prompt, new_tokens, regex, 101 + 2 * r))
    p, c = statistics.median(plain), statistics.median(constrained)
    return {
        "batch": batch,
        "new_tokens": new_tokens,
        "runs": runs,
        "compile_grammar_rpc_s": round(compile_s, 3),
        "no_grammar_tok_s": round(p, 1),
        "json_grammar_tok_s": round(c, 1),
        "grammar_overhead_pct": round(100 * (p - c) / p, 1),
        "all_no_grammar": plain,
        "all_json_grammar": constrained,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-id", default="smollm2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "grammar.json"))
    args = p.parse_args()
    model_dir = Path(args.model_id)
    if not model_dir.is_dir():
        from ember.store import resolve_model

        model_dir = resolve_model(args.model_id).path
    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model_id": args.model_id,
        "compile": compile_times(model_dir),
        "decode": decode_figures(model_dir, args.batch, args.new_tokens, args.runs),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report.portable(json.dumps(results, indent=2)))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
