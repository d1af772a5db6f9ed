"""Linear layers in PyTorch's layout vs reordered once for oneDNN, on SmolLM2-135M's 30 layers.

    .venv/bin/python benchmarks/linear_layout.py [--rows 1 16 32 256] [--repeats 5]

Times one pass over the qkv, o, gate_up and down matmuls of 30 layers of distinct
random weights (so they stream from memory, as in a decode step), per dtype and
rows per step: `F.linear` on the plain weight, `mkldnn._linear_pointwise` on the
weight from `mkldnn._reorder_linear_weight` (Ember's `OneDNNWeight`), torch's
int4 weight-only kernel (`--quantize int4`) and Ember's int4 x int8 kernel
(`--quantize w4a8`, `shard/kernels/matmul_q4.c`). Writes benchmarks/results/linear_layout.json/.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate_up, down (out, in)
LAYERS = 30


def pass_ms(rows: int, weights, matmul, repeats: int) -> float:
    xs = {k: torch.randn(rows, k).to(weights[0][0][1]) for k in (576, 1536)}

    def one_pass() -> None:
        for layer in weights:
            for (_, k), (w, _) in zip(SHAPES, layer):
                matmul(xs[k], w)

    one_pass()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        one_pass()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32, 256])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "linear_layout.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    result = {
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()[0]},
    }
    onednn = lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")  # noqa: E731
    rows_out = []
    for dtype in (torch.float32, torch.bfloat16):
        plain = [[(torch.randn(n, k).to(dtype), dtype) for n, k in SHAPES] for _ in range(LAYERS)]
        reordered = [[(torch.ops.mkldnn._reorder_linear_weight(w), d) for w, d in layer] for layer in plain]
        for rows in args.rows:
            a = pass_ms(rows, plain, F.linear, args.repeats)
            b = pass_ms(rows, reordered, onednn, args.repeats)
            rows_out.append(
                {
                    "dtype": str(dtype).removeprefix("torch."),
                    "rows": rows,
                    "plain_ms": a,
                    "onednn_ms": b,
                    "speedup": a / b,
                }
            )
            print(f"{dtype} rows={rows}: F.linear {a:.2f} ms, oneDNN layout {b:.2f} ms ({a / b:.2f}x)", flush=True)
    int4 = []
    for _ in range(LAYERS):
        layer = []
        for n, k in SHAPES:
            q = torch.randint(0, 16, (n, k), dtype=torch.int32)
            layer.append(
                (
                    (torch._convert_weight_to_int4pack_for_cpu(q, 1), torch.rand(k // 32, n, 2).bfloat16()),
                    torch.bfloat16,
                )
            )
        int4.append(layer)
    int4_mm = lambda x, w: torch._weight_int4pack_mm_for_cpu(x, w[0], 32, w[1])  # noqa: E731
    for rows in args.rows:
        ms = pass_ms(rows, int4, int4_mm, args.repeats)
        rows_out.append({"dtype": "int4 weights, bf16", "rows": rows, "int4_ms": ms})
        print(f"int4 rows={rows}: {ms:.2f} ms", flush=True)
    from ember.shard import native

    kernels = native.kernels()
    if kernels is not None and kernels.q4:
        q4 = [
            [
                (
                    native.Q4Weight.pack(
                        torch.randint(0, 16, (n, k)), torch.rand(n, k // 32) * 0.01, -torch.rand(n, k // 32) * 0.05
                    ),
                    torch.float32,
                )
                for n, k in SHAPES
            ]
            for _ in range(LAYERS)
        ]
        for rows in args.rows:
            ms = pass_ms(rows, q4, kernels.q4_linear, args.repeats)
            rows_out.append({"dtype": "w4a8 (Ember's VNNI kernel, float32 in and out)", "rows": rows, "int4_ms": ms})
            print(f"w4a8 rows={rows}: {ms:.2f} ms", flush=True)
    result["rows"] = rows_out
    report.write_result(result, Path(args.out), render)


def render(result: dict) -> str:
    lines = [
        "# Linear layers: PyTorch's layout vs oneDNN's, SmolLM2-135M shapes (30 layers, one pass)",
        "",
        f"{result['threads']} threads, load average {result['machine']['loadavg_start']:.1f} at start and "
        f"{result['machine']['loadavg_end']:.1f} at the end; best of the repeats.",
        "",
        "| dtype | rows | F.linear ms | oneDNN layout ms | speed-up | int4 / w4a8 kernel ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    nan = float("nan")
    for r in result["rows"]:
        lines.append(
            f"| {r['dtype']} | {r['rows']} | {r.get('plain_ms', nan):.2f} | {r.get('onednn_ms', nan):.2f} "
            f"| {r.get('speedup', nan):.2f} | {r.get('int4_ms', nan):.2f} |"
        )
    return "\n".join(lines + ["", "Command:", "", "    " + result["command"], ""])


if __name__ == "__main__":
    main()
