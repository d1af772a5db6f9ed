"""Many models on one server: time to first token cold (loaded from the store) and warm, memory per
loaded model, and single-stream decode speed, for `smollm2` (the default) and `gemma3:270m`.

    .venv/bin/python benchmarks/models_bench.py [--out benchmarks/results/models]

Starts `ember-launcher --model-id smollm2` (make run's server) on the cache `$EMBER_CACHE` (default
~/.cache/ember), pulls `gemma3:270m` through Jan's POST /v1/models when the store lacks it, then per model:
starts it once (so a first conversion of its GGUF is not timed), stops it (Jan's stop), times the first
token of a streamed completion (cold: the launcher starts the shard group from the converted store, the
router warms it up), repeats it loaded (warm), reads the group's resident memory from the launcher's
control service, and times greedy decode of 128 tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx
from report import portable
from servers import Launcher, control_client, free_port, wait_for

MODELS = ("gemma3:270m", "smollm2")
PROMPT = "The history of the printing press begins"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def stream_times(url: str, model: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, seconds from first to last token, tokens) of one streamed completion."""
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    started = time.perf_counter()
    first = last = None
    tokens = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=900) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            now = time.perf_counter()
            first = first or now
            last = now
            tokens += 1
    assert first is not None and last is not None, "no token came back"
    return first - started, last - first, tokens


def group_of(socket: str, name: str):
    from ember.proto import control_pb2 as cpb

    with control_client(socket) as stub:
        for group in stub.List(cpb.ListRequest(), timeout=30).groups:
            if group.name == name or (name == "smollm2" and group.default):
                return group
    return None


def ensure_pulled(url: str, name: str) -> None:
    card = httpx.get(f"{url}/v1/models/{name}", timeout=30).json()
    if card.get("state") not in ("not_downloaded", "downloading"):
        return
    httpx.post(url + "/v1/models", json={"model": name}, timeout=30).raise_for_status()
    print(f"pulling {name} ...", file=sys.stderr)

    def done():
        card = httpx.get(f"{url}/v1/models/{name}", timeout=30).json()
        if card.get("download", {}).get("error"):
            raise RuntimeError(card["download"]["error"])
        return card["state"] not in ("not_downloaded", "downloading")

    wait_for(done, 1800, f"pull of {name}", interval=1.0)


def measure(url: str, socket: str, model: str, repeats: int) -> dict:
    httpx.put(f"{url}/v1/models/{model}/start", timeout=1800).raise_for_status()  # converted once, untimed
    httpx.put(f"{url}/v1/models/{model}/stop", timeout=300).raise_for_status()
    cold_ttft, _, _ = stream_times(url, model, 4)
    group = group_of(socket, model)
    warm = [stream_times(url, model, 4)[0] for _ in range(repeats)]
    decode = []
    for _ in range(repeats):
        _, seconds, tokens = stream_times(url, model, 128)
        decode.append((tokens - 1) / seconds)
    group = group_of(socket, model) or group
    return {
        "model": model,
        "cold_ttft_s": round(cold_ttft, 3),
        "load_seconds": round(group.load_seconds, 3) if group else None,
        "warm_ttft_ms": round(statistics.median(warm) * 1e3, 1),
        "decode_tok_s": round(statistics.median(decode), 1),
        "rss_mib": round(group.rss_bytes / 2**20) if group else None,
        "weights_mib": round(group.weights_bytes / 2**20) if group else None,
    }


def render(result: dict) -> str:
    lines = [
        "# Many models on one server",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine']}. {result['date']}.",
        "",
        "Cold: the model was stopped (Jan's PUT /v1/models/{id}/stop); the first request starts its shard "
        "group from the store and the router warms it up. Warm: loaded, median of "
        f"{result['repeats']}. Decode: one stream, greedy, 128 tokens, median of {result['repeats']}. "
        "Memory: resident set of the group's shard processes after the runs, as the launcher reports it.",
        "",
        "| model | cold TTFT | of which load | warm TTFT | decode tok/s | RSS | weights on disk |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["models"]:
        lines.append(
            f"| `{row['model']}` | {row['cold_ttft_s']:.1f} s | {row['load_seconds']:.1f} s | "
            f"{row['warm_ttft_ms']:.0f} ms | {row['decode_tok_s']:.1f} | {row['rss_mib']} MiB | "
            f"{row['weights_mib']} MiB |"
        )
    lines += ["", result.get("note", "")]
    return portable("\n".join(lines).rstrip() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/models")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--uds", default="/tmp/ember-models-bench")
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    launcher = Launcher(
        "--model-id", "smollm2", "--port", str(port), "--hostname", "127.0.0.1", "--shard-uds-path", args.uds,
        "--keep-alive", "-1",
    )  # fmt: skip
    try:
        launcher.wait_for_line("[launcher] serving ", timeout=1800)
        for model in MODELS:
            ensure_pulled(url, model)
        rows = []
        for model in MODELS:
            print(f"measuring {model} ...", file=sys.stderr)
            rows.append(measure(url, f"{args.uds}-control", model, args.repeats))
            print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        launcher.kill()
    result = {
        "command": ".venv/bin/python benchmarks/models_bench.py " + " ".join(sys.argv[1:]),
        "machine": f"{cpu_name()}, {len(__import__('os').sched_getaffinity(0))} CPUs",
        "date": time.strftime("%Y-%m-%d"),
        "repeats": args.repeats,
        "models": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "models.json").write_text(portable(json.dumps(result, indent=2)) + "\n")
    (out / "models.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
