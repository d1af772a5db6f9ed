"""Memory per model: the file, the store, and the shard's resident memory split into weights, KV cache and
runtime.

    .venv/bin/python benchmarks/memory.py [--models smollm2 gemma3:270m tiny-q4_1 (name@w4a8: that precision)] \
        [--kv-cache-bytes 64MiB]

Each model is measured in a fresh process, loaded as a shard loads it (the store or the registry resolves
it, the automatic precision of `ember.shard.precision` chooses how it runs, `load_runner` loads it):
- file: the GGUF's bytes; store: what the model takes in the cache (the GGUF once, plus what its
  converted directory adds: hard links to the GGUF count nothing);
- weights: the bytes the loaded model holds (every parameter, packed weight and head copy, each once);
- KV cache: the cache's tensors (`--kv-cache-bytes`, the same for every model);
- runtime: resident memory after loading, less the two above: torch, the libraries, Ember's kernels, the
  allocator's slack; `before load` is the process after importing all of it, before any model;
- peak: the process's high-water mark (loading takes one tensor's transient copies at a time).
Each is read after one short step, so that weights mapped from files are resident too.
`tiny-q4_1` is the tiny llama GGUF the tests write (benchmarks/tiny_gguf.py); `name@w4a8` is that model
under `--quantize w4a8` instead of its automatic precision.
Writes benchmarks/results/memory.json and memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MIB = 2**20


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _model_dir(name: str, work: Path) -> tuple[Path, Path]:
    """(the directory the shard loads, the GGUF it came from)."""
    from ember.registry import Registry
    from ember.store import GGUF_FILE, resolve_model

    if name.startswith("tiny-"):
        from tiny_gguf import write_tiny_gguf

        gguf = work / f"{name}.gguf"
        write_tiny_gguf(gguf, name.removeprefix("tiny-").upper(), vocab_multiple=16)
        return resolve_model(str(gguf), cache_dir=work / "cache").path, gguf
    if name == "smollm2":
        path = resolve_model(name).path
        return path, path / GGUF_FILE
    registry = Registry(None)
    manifest = registry.resolve(name)
    return Path(registry.model_dir(manifest)), registry.blob_path(manifest.digest)


def _store_bytes(model_dir: Path, gguf: Path) -> int:
    """The GGUF once, and the directory's files that are not the GGUF itself."""
    source = os.stat(gguf)
    own = 0
    for path in model_dir.rglob("*"):
        if path.is_file():
            st = os.stat(path)
            if (st.st_dev, st.st_ino) != (source.st_dev, source.st_ino):
                own += st.st_size
    return source.st_size + own


def _tensor_bytes(gguf: Path) -> int:
    """The bytes of the GGUF's tensors (the file less its header: metadata and tokenizer)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(gguf).tensors)


def _held_bytes(model) -> int:
    """Bytes of every tensor and packed weight the model holds, each counted once."""
    import torch

    from ember.shard import native
    from ember.shard.layers import OneDNNWeight, PackedWeight

    seen: set[int] = set()
    total = 0

    def add(obj) -> None:
        nonlocal total
        # A tensor by its storage: a tied head and its embedding are two tensors over one.
        key = obj.untyped_storage().data_ptr() if isinstance(obj, torch.Tensor) else id(obj)
        if obj is None or key in seen:
            return
        seen.add(key)
        if isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, (PackedWeight, native.Q4Weight, native.BF16Weight, OneDNNWeight)):
            total += obj.nbytes

    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, (PackedWeight, native.Q4Weight, native.BF16Weight, OneDNNWeight)):
                add(value)
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            add(tensor)
    for name in ("q8_head", "packed_head", "fast_head"):
        add(getattr(model, name, None))
    return total


def child(name: str, kv_cache_bytes: int) -> dict:
    """Measure one model in this process (a fresh one: `--child`)."""
    import torch

    from ember.shard import native, server  # noqa: F401 (the gRPC server's libraries: part of a shard's runtime)
    from ember.shard.engine import Engine
    from ember.shard.grammar import GrammarCompiler
    from ember.shard.precision import choose
    from ember.shard.runner import Sequence, load_runner, resolve_dtype
    from ember.shard.tokenizer import load_tokenizer

    native.kernels()  # compiled or loaded now: the runtime, not the model
    with tempfile.TemporaryDirectory() as work:
        model, _, quantize = name.partition("@")  # `gemma3:270m@w4a8`: that model with --quantize w4a8
        model_dir, gguf = _model_dir(model, Path(work))
        before = _status("VmRSS")
        device = torch.device("cpu")
        precision = choose(model_dir, device, None, None, quantize or None)
        runner = load_runner(
            model_dir,
            resolve_dtype(precision.dtype, device),
            device,
            kv_cache_bytes=kv_cache_bytes,
            matmul_dtype=precision.matmul_dtype,
            quantize=precision.quantize,
        )
        # One short step, so that weights mapped from files (transformers' generic path) are resident too.
        seq = Sequence(seq_id=0, token_ids=[1, 2, 3, 4])
        runner.step([seq])
        runner.free(seq)
        tokenizer = load_tokenizer(model_dir)  # what the shard holds beside the model (shard/cli.py)
        engine = Engine(runner, tokenizer, GrammarCompiler(tokenizer))
        after, peak = _status("VmRSS"), _status("VmHWM")
        # What transformers' tokenizer, which the shard no longer loads, would add to that.
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(model_dir)
        transformers_tokenizer = _status("VmRSS") - after
        del engine
        model = getattr(runner, "model", None)
        weights = _held_bytes(model)
        cache = getattr(runner, "cache", None)
        kv = sum(t.numel() * t.element_size() for t in [*cache.k, *cache.v]) if cache is not None else 0
        return {
            "model": name,
            "precision": precision.summary,
            "file_bytes": os.stat(gguf).st_size,
            "file_tensor_bytes": _tensor_bytes(gguf),
            "store_bytes": _store_bytes(model_dir, gguf),
            "weights_bytes": weights,
            "kv_cache_bytes": kv,
            "rss_before_load_bytes": before,
            "rss_bytes": after,
            "runtime_bytes": after - weights - kv,
            "peak_bytes": peak,
            "transformers_tokenizer_bytes": transformers_tokenizer,
        }


def render(rows: list[dict], command: str) -> str:
    def mib(n: int) -> str:
        return f"{n / MIB:,.1f}" if abs(n) >= 10 * MIB else f"{n / MIB:.2f}"

    lines = [
        "# Memory per model: file, store, and the shard's resident memory",
        "",
        "Each model loaded in a fresh process as a shard loads it (automatic precision). Its tensors: the file",
        "less its header (metadata, tokenizer). Weights: the bytes the",
        "loaded model holds; runtime: resident memory less weights and KV cache (torch, the gRPC libraries, the",
        "tokenizer and engine the shard holds, Ember's kernels, allocator slack); before load: the process after",
        "importing all of it. The last column: what loading transformers' tokenizer (which the shard did until",
        "2026-12-06; it now reads tokenizer.json with the Rust `tokenizers` alone) adds on top. MiB.",
        "",
        "| model | precision | file | its tensors | store | weights | weights ÷ tensors | KV cache | runtime "
        "| before load | RSS | peak | transformers' tokenizer would add |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error']} | | | | | | | | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['precision']} | {mib(r['file_bytes'])} | {mib(r['file_tensor_bytes'])} | "
            f"{mib(r['store_bytes'])} | {mib(r['weights_bytes'])} | "
            f"{r['weights_bytes'] / r['file_tensor_bytes']:.2f}× | {mib(r['kv_cache_bytes'])} | "
            f"{mib(r['runtime_bytes'])} | {mib(r['rss_before_load_bytes'])} | {mib(r['rss_bytes'])} | "
            f"{mib(r['peak_bytes'])} | {mib(r['transformers_tokenizer_bytes'])} |"
        )
    lines += ["", "Command:", "", f"    {command}", ""]
    return "\n".join(lines)


def _bytes(text: str) -> int:
    units = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    for suffix, scale in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * scale)
    return int(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2", "gemma3:270m", "tiny-q4_1"])
    p.add_argument("--kv-cache-bytes", default="64MiB")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(RESULTS / "memory.json"))
    args = p.parse_args()
    kv = _bytes(args.kv_cache_bytes)
    if args.child:
        print(json.dumps(child(args.child, kv)))
        return
    rows = []
    for name in args.models:
        print(f"memory: {name} ...", flush=True)
        cmd = [sys.executable, __file__, "--child", name, "--kv-cache-bytes", args.kv_cache_bytes]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "benchmarks")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            rows.append({"model": name, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"memory: {name}: {rows[-1]}", flush=True)
    command = " ".join([".venv/bin/python", "benchmarks/memory.py", *sys.argv[1:]])
    out = Path(args.out)
    out.write_text(json.dumps({"command": command, "models": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(rows, command))
    print(render(rows, command))


if __name__ == "__main__":
    main()
