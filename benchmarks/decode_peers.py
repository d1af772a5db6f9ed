"""Single-stream greedy decode speed: Ember serving a GGUF beside llama-cpp-python on the same file.

    .venv/bin/python benchmarks/decode_peers.py --model gemma3=PATH/gemma-3-270m-q4_k_m.gguf --model smollm2 \
        [--tokens 128] [--repeats 5] [--threads 2] [--out benchmarks/results/gemma3/decode.json]

For each model, one server at a time, never two at once: Ember as `make run` starts it
(`peers/start_ember_default.sh`: the launcher, the shard's automatic precision) with `--model-id`
the GGUF, then llama-cpp-python's server (`peers/start_llamacpp.sh`) on the same GGUF. Both get
`--threads` cores: the whole run is pinned to that many CPUs (the shard sizes its thread pool by
its affinity), and llama.cpp gets as many threads for decode and prefill. `smollm2` names Ember's
default model (its GGUF from the store).

Each repeat sends one request with a prompt of its own (`prompts.word_text`: no prefix cache
helps) asking for `--tokens` greedy tokens with EOS ignored -- Ember: TGI's `/generate` with
`ignore_eos` (Ember's extension) and `stop: []`; llama.cpp: `/v1/completions` with `min_tokens` --
and one more asking for a single token. Reported per server, medians over repeats:

* request tok/s: generated tokens / the request's wall time (prefill and HTTP included);
* decode tok/s: (tokens - 1) / (median wall of the long requests - median wall of the 1-token ones),
  the rate once the first token is out.

With `--profile`, after the servers, Ember's generic path (the shard's `GenericRunner`, in
process) is timed and profiled on the first model: a decode step, the forward inside it, the LM
head alone, and torch.profiler's heaviest operators. Writes `--out` (JSON) and its `.md` twin.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))

import lifecycle  # noqa: E402
import report  # noqa: E402
import run_all  # noqa: E402
from prompts import word_text  # noqa: E402

EMBER = lifecycle.PEERS["ember-default"]
LLAMA = lifecycle.PEERS["llama-cpp"]
PROMPT_WORDS = 24
SERVED_NAME = "bench"


def ember_request(url: str, prompt: str, tokens: int) -> int:
    parameters = {"max_new_tokens": tokens, "ignore_eos": True, "stop": [], "details": True}
    reply = httpx.post(url + "/generate", json={"inputs": prompt, "parameters": parameters}, timeout=600)
    reply.raise_for_status()
    return int(reply.json()["details"]["generated_tokens"])


def llama_request(url: str, prompt: str, tokens: int) -> int:
    body = {
        "model": SERVED_NAME,
        "prompt": prompt,
        "max_tokens": tokens,
        "min_tokens": tokens,
        "temperature": 0.0,
        "stream": False,
    }
    reply = httpx.post(url + "/v1/completions", json=body, timeout=600)
    reply.raise_for_status()
    return int(reply.json()["usage"]["completion_tokens"])


def timed(send, url: str, prompt: str, tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    got = send(url, prompt, tokens)
    return time.perf_counter() - start, got


def measure(send, url: str, tokens: int, repeats: int, first_index: int) -> dict:
    """One warm-up request, then `repeats` long and 1-token requests, each on a prompt of its own."""
    send(url, word_text(first_index, PROMPT_WORDS), 8)
    long, short = [], []
    for r in range(repeats):
        long.append(timed(send, url, word_text(first_index + 1 + 2 * r, PROMPT_WORDS), tokens))
        short.append(timed(send, url, word_text(first_index + 2 + 2 * r, PROMPT_WORDS), 1))
    walls = [w for w, _ in long]
    counts = [n for _, n in long]
    first = statistics.median(w for w, _ in short)
    n = statistics.median(counts)
    return {
        "long_requests": [{"wall_s": w, "tokens": c} for w, c in long],
        "one_token_wall_s": [w for w, _ in short],
        "tokens_median": n,
        "request_tok_s": statistics.median(c / w for w, c in long),
        "request_tok_s_spread": [min(c / w for w, c in long), max(c / w for w, c in long)],
        "first_token_s": first,
        "decode_tok_s": (n - 1) / (statistics.median(walls) - first),
    }


def ember_info(url: str) -> dict:
    info = httpx.get(url + "/info", timeout=30).json()
    keys = ("model_type", "attention_impl", "dtype", "precision", "precision_reason", "num_shard")
    return {k: info.get(k) for k in keys}


def bench_model(name: str, gguf: Path, args, log_dir: Path, index: int) -> dict:
    """Ember, then llama.cpp, on one GGUF; a server that fails is reported with its log's tail."""
    entry: dict = {
        "gguf": gguf.name,
        "gguf_sha256": sha256(gguf),
        "gguf_mib": round(gguf.stat().st_size / 2**20, 1),
        "servers": {},
    }
    plan = [
        ("ember", EMBER, {"EMBER_BENCH_MODEL_ID": str(gguf)}, ember_request),
        (
            "llama-cpp",
            LLAMA,
            {"EMBER_BENCH_GGUF": str(gguf), "LLAMA_THREADS": str(args.threads), "EMBER_BENCH_SERVED_NAME": SERVED_NAME},
            llama_request,
        ),
    ]
    for server, peer, env, send in plan:
        result: dict = {"version": lifecycle.version(peer)}
        log = log_dir / f"decode-{name}-{server}.log"
        try:
            if peer.install_script:
                lifecycle.install(peer, log_dir / f"install-{server}.log")
            with lifecycle.RunningServer(peer, log, env=env) as url:
                if server == "ember":
                    result["info"] = ember_info(url)
                result.update(measure(send, url, args.tokens, args.repeats, first_index=1000 * index))
            result["status"] = "ok"
        except (lifecycle.PeerError, httpx.HTTPError, KeyError, ValueError) as error:
            result.update(status="failed", error=str(error)[-3000:])
        entry["servers"][server] = result
        print(f"{name} {server}: {result.get('decode_tok_s', result.get('status'))}", file=sys.stderr, flush=True)
    ember, llama = entry["servers"]["ember"], entry["servers"]["llama-cpp"]
    if "decode_tok_s" in ember and "decode_tok_s" in llama:
        entry["llama_over_ember_decode"] = llama["decode_tok_s"] / ember["decode_tok_s"]
        entry["llama_over_ember_request"] = llama["request_tok_s"] / ember["request_tok_s"]
    return entry


# --- where the generic path's time goes ----------------------------------------------------------


def profile_generic(gguf: Path, threads: int, steps: int = 24) -> dict:
    """Ember's generic runner in process: a decode step against its LM head alone, and the operators
    torch.profiler charges most (self CPU time, summed over `steps` steps)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ember.shard.models.generic import GenericRunner
    from ember.shard.runner import Sequence, load_runner
    from ember.store import resolve_model

    torch.set_num_threads(threads)
    model_dir = resolve_model(str(gguf)).path
    runner = load_runner(model_dir, dtype="float32", device="cpu")
    if not isinstance(runner, GenericRunner):
        raise SystemExit(f"{gguf.name} runs on Ember's own model code, not the generic path: nothing to profile")
    model = runner.model
    seq = Sequence(0, list(range(100, 132)))
    out = runner.step([seq])

    def decode_step():
        seq.token_ids.append(int(out.logits[0].argmax()))
        return runner.step([seq])

    for _ in range(4):
        out = decode_step()
    step_s = []
    for _ in range(steps):
        start = time.perf_counter()
        out = decode_step()
        step_s.append(time.perf_counter() - start)
    forward_s = transformers_decode(model, seq.token_ids, steps, runner._cache_arg)
    head = model.get_output_embeddings().weight
    hidden = torch.randn(1, head.shape[1])
    head_s = []
    with torch.inference_mode():
        for _ in range(steps):
            start = time.perf_counter()
            torch.nn.functional.linear(hidden, head)
            head_s.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            out = decode_step()
    table = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_us = sum(e.self_cpu_time_total for e in table)
    params = sum(p.numel() for p in model.parameters())
    return {
        "model_dir_params": params,
        "weights_mib_float32": round(params * 4 / 2**20, 1),
        "lm_head_shape": list(head.shape),
        "step_ms": 1e3 * statistics.median(step_s),
        "transformers_decode_ms": 1e3 * statistics.median(forward_s),
        "lm_head_ms": 1e3 * statistics.median(head_s),
        "threads": torch.get_num_threads(),
        "top_ops": [
            {
                "op": e.key,
                "calls_per_step": e.count / steps,
                "ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                "share": e.self_cpu_time_total / total_us,
            }
            for e in table[:8]
        ],
    }


def transformers_decode(model, token_ids: list[int], steps: int, cache_arg: str) -> list[float]:
    """Seconds per greedy step of transformers' own loop (its cache, no padding): what the runner adds is
    the difference. `cache_arg`: the forward's name for the cache (`cache`, formerly `past_key_values`)."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=torch.tensor([token_ids]), use_cache=True)
        times = []
        for _ in range(steps):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            out = model(input_ids=token, use_cache=True, logits_to_keep=1, **{cache_arg: getattr(out, cache_arg)})
            times.append(time.perf_counter() - start)
    return times


# --- the report ----------------------------------------------------------------------------------


def _f(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Single-stream decode: Ember beside llama-cpp-python on the same GGUF",
        "",
        f"{result['tokens']} greedy tokens per request, EOS ignored, one request at a time, {result['repeats']} "
        f"repeats (medians; each request a prompt of its own, {PROMPT_WORDS} words), servers one after the other, "
        f"each on {result['threads']} CPU(s).",
        "",
        "## Machine",
        "",
        f"- CPU: {m.get('cpu_model')} — {m.get('usable_cpus')} usable of {m.get('logical_cpus')} logical CPUs; "
        f"{m.get('memory_gib')} GiB memory",
        f"- Load average at start {m['loadavg_at_start'][0]:.2f}, at the end {m.get('loadavg_end', 0):.2f} "
        "(a shared machine: other work competes for the cores)",
        f"- {m.get('platform')}, Python {m.get('python')}, torch {m.get('torch')}",
        "",
        "## Results",
        "",
        "| model | server | version | precision | decode tok/s | request tok/s [min–max] | 1-token request s "
        "| llama.cpp ÷ Ember (decode) |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for name, entry in result["models"].items():
        for server, s in entry["servers"].items():
            if s.get("status") != "ok":
                lines.append(f"| {name} | {server} | {s.get('version')} | | {s.get('status')} | | | |")
                continue
            info = s.get("info") or {}
            precision = f"{info.get('precision')} ({info.get('attention_impl')} path)" if info else "the GGUF's"
            spread = s["request_tok_s_spread"]
            ratio = _f(entry.get("llama_over_ember_decode"), 2) + "×" if server == "llama-cpp" else ""
            lines.append(
                f"| {name} ({entry['gguf']}, {entry['gguf_mib']} MiB) | {server} | {s.get('version')} | {precision} "
                f"| {_f(s['decode_tok_s'])} | {_f(s['request_tok_s'])} [{_f(spread[0])}–{_f(spread[1])}] "
                f"| {_f(s['first_token_s'], 3)} | {ratio} |"
            )
    lines += ["", *[f"- {note}" for note in result.get("notes", [])]]
    if result.get("profile"):
        p = result["profile"]
        gguf_mib = result["models"][result["profile_model"]]["gguf_mib"]
        head_share = p["lm_head_shape"][0] * p["lm_head_shape"][1] / p["model_dir_params"]
        lines += [
            "",
            f"## Where Ember's generic path spends a decode step ({result['profile_model']}, in process)",
            "",
            f"- decode step: {p['step_ms']:.1f} ms ({1e3 / p['step_ms']:.1f} tok/s) on {p['threads']} threads; "
            f"float32 weights {p['weights_mib_float32']:,.0f} MiB read per token, "
            f"{p['weights_mib_float32'] / gguf_mib:.1f}× the GGUF's {gguf_mib:,.0f} MiB that llama.cpp reads",
            f"- transformers' own decode loop on the same model (its cache, no padding): "
            f"{p['transformers_decode_ms']:.1f} ms per token, so the runner's padding and cache handling add "
            f"{p['step_ms'] - p['transformers_decode_ms']:.1f} ms",
            f"- LM head alone (float32 {p['lm_head_shape'][0]:,} × {p['lm_head_shape'][1]} matmul, tied to the "
            f"embedding: {100 * head_share:.0f} % of the weights): "
            f"{p['lm_head_ms']:.1f} ms ({100 * p['lm_head_ms'] / p['step_ms']:.0f} % of the step)",
            "",
            "| operator (torch.profiler, self CPU) | calls per step | ms per step | share |",
            "|---|---:|---:|---:|",
            *[
                f"| `{o['op']}` | {o['calls_per_step']:.0f} | {o['ms_per_step']:.2f} | {100 * o['share']:.0f} % |"
                for o in p["top_ops"]
            ],
        ]
    lines += ["", "Command:", "", f"    {result['command']}", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, help="NAME=PATH.gguf, or `smollm2` (the default model)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="CPUs for each server (the run is pinned to them)")
    p.add_argument("--profile", action="store_true", help="profile Ember's generic path on the first model")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gemma3" / "decode.json"))
    return p.parse_args(argv)


def model_gguf(spec: str) -> tuple[str, Path]:
    if "=" in spec:
        name, path = spec.split("=", 1)
        return name, Path(path).expanduser().resolve()
    import model_paths

    return spec, model_paths.gguf_path(spec)


def portable_arg(arg: str) -> str:
    """A GGUF outside the repository and the home folder is named by its file: `NAME=$GGUF_DIR/file.gguf`."""
    name, sep, path = arg.rpartition("=")
    if path.endswith(".gguf") and path.startswith("/") and report.portable(path) == path:
        return f"{name}{sep}$GGUF_DIR/{Path(path).name}"
    return report.portable(arg)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def pin(threads: int) -> list[int]:
    """Pin this process (and so every server it starts) to the first `threads` CPUs it may use."""
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cpus)
    return cpus


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cpus = pin(args.threads)
    machine = run_all.machine_info()
    machine.pop("flags", None)
    result: dict = {
        "command": " ".join([".venv/bin/python", "benchmarks/decode_peers.py", *map(portable_arg, sys.argv[1:])]),
        "tokens": args.tokens,
        "repeats": args.repeats,
        "threads": len(cpus),
        "machine": machine,
        "models": {},
        "notes": [
            "decode tok/s = (tokens − 1) / (median wall of the long requests − median wall of the 1-token ones)",
            "Ember: TGI /generate with `ignore_eos` and `stop: []`; llama.cpp: /v1/completions with `min_tokens`",
            "both read the same GGUF; Ember converts it once to float32 safetensors (the store) and serves that",
        ],
    }
    if "amx_tile" in Path("/proc/cpuinfo").read_text():
        result["notes"].append(
            "llama-cpp-python is compiled for this CPU without its AMX kernels (peers/install_llamacpp.sh): "
            "they crash here with SIGILL"
        )
    log_dir = lifecycle.bench_dir() / "logs"
    models = [model_gguf(spec) for spec in args.model]
    for index, (name, gguf) in enumerate(models):
        result["models"][name] = bench_model(name, gguf, args, log_dir, index)
    if args.profile:
        result["profile_model"] = models[0][0]
        result["profile"] = profile_generic(models[0][1], len(cpus))
    report.write_result(result, Path(args.out), markdown)


if __name__ == "__main__":
    main()
