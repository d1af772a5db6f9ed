"""Roofline probe: the machine's achievable matmul GFLOP/s, and a decode rate as a share of it.

    python benchmarks/roofline.py [--dtype float32 bfloat16] [--tokens-per-s 450] [--json out.json]

A decoder's forward costs about 2 × parameters FLOPs per token (every weight
is one multiply-add), so `tokens/s × 2 × params` is the FLOP rate a decode
step achieves; divided by the best rate torch's matmul reaches on this machine
(same threads, same dtype, measured in the same run) it says how far the
engine is from compute-bound. Shapes: one large square matmul (the peak) and
the model's own batch-32 decode shapes (what decode can hope for).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

# (name, m, k, n): a large square matmul, and SmolLM2-135M's MLP / LM-head at batch 32.
SHAPES = (("square-2048", 2048, 2048, 2048), ("mlp-b32", 32, 576, 1536), ("lm-head-b32", 32, 576, 49152))
# A GPU reaches its peak only on a much larger product.
CUDA_SHAPES = (("square-8192", 8192, 8192, 8192),) + SHAPES[1:]


def matmul_gflops(
    m: int, k: int, n: int, dtype: torch.dtype, min_time_s: float = 0.5, max_iters: int = 10_000, device: str = "cpu"
) -> float:
    """Best-of-batches GFLOP/s of `[m,k] @ [k,n]`, timed for at least `min_time_s` (bounded by `max_iters`).
    int8: `torch._int_mm` (int8 x int8 -> int32, oneDNN's VNNI GEMM on CPU), in GOP/s. On a GPU each
    batch of products ends with a synchronize, so the clock reads finished work."""
    if dtype == torch.int8:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
        b = torch.randint(-127, 128, (k, n), dtype=torch.int8, device=device)
        matmul = torch._int_mm
    else:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        matmul = torch.matmul
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    flops = 2.0 * m * k * n
    t0 = time.perf_counter()
    matmul(a, b)  # first call: allocation and kernel selection
    sync()
    first_s = time.perf_counter() - t0
    if first_s > 4 * min_time_s:
        # A product this slow (bf16 emulated on a CPU without AVX-512 BF16: a minute for square-2048) is
        # its own measurement: three more would add minutes to every run and nothing to the figure.
        return flops / first_s / 1e9
    best, iters, started = 0.0, 0, time.perf_counter()
    while iters < max_iters and (time.perf_counter() - started < min_time_s or iters < 3):
        batch = max(1, min(64, int((1e12 if device != "cpu" else 1e9) / flops)))
        t0 = time.perf_counter()
        for _ in range(batch):
            matmul(a, b)
        sync()
        best = max(best, batch * flops / (time.perf_counter() - t0))
        iters += batch
    return best / 1e9


def probe(dtypes: list[str], min_time_s: float = 0.5, device: str = "cpu") -> dict:
    """GFLOP/s per dtype and shape, and each dtype's peak (the roofline), on `device`."""
    out: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__, "device": device, "dtypes": {}}
    shapes_of = CUDA_SHAPES if torch.device(device).type == "cuda" else SHAPES
    if torch.device(device).type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    for name in dtypes:
        dtype = getattr(torch, name)
        shapes = {label: matmul_gflops(m, k, n, dtype, min_time_s, device=device) for label, m, k, n in shapes_of}
        out["dtypes"][name] = {"shapes_gflops": shapes, "peak_gflops": max(shapes.values())}
    return out


def param_count(model_dir: Path) -> int:
    """Parameters in the model's safetensors files, read from their headers (tied weights once)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                numel = 1
                for dim in f.get_slice(key).get_shape():
                    numel *= dim
                total += numel
    return total


def decode_share(tokens_per_s: float, params: int, peak_gflops: float) -> dict:
    """The FLOP rate a decode of `tokens_per_s` achieves, and its percentage of `peak_gflops`."""
    achieved = tokens_per_s * 2 * params / 1e9
    return {
        "tokens_per_s": tokens_per_s,
        "params": params,
        "flops_per_token": 2 * params,
        "achieved_gflops": achieved,
        "peak_gflops": peak_gflops,
        "percent_of_peak": 100 * achieved / peak_gflops if peak_gflops else float("nan"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16", "int8"])
    p.add_argument("--model-dir", help="model directory for the parameter count (default: smollm2's)")
    p.add_argument("--tokens-per-s", type=float, help="a measured decode rate to place under the roofline")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds timed per shape")
    p.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU's own roofline")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args()
    result = probe(args.dtype, args.min_time, args.device)
    if args.tokens_per_s:
        if args.model_dir:
            model_dir = Path(args.model_dir)
        else:
            from ember.store import resolve_model

            model_dir = resolve_model("smollm2").path
        peak = result["dtypes"][args.dtype[0]]["peak_gflops"]
        result["decode"] = decode_share(args.tokens_per_s, param_count(model_dir), peak)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
