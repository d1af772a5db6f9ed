"""Plots of a benchmark run: per scenario, tokens/s, TTFT and ITL against concurrency.

    python benchmarks/plots.py benchmarks/results/comparison.json

One PNG per scenario (`comparison-<scenario>.png`), one line per server: output tokens/s
(median over repeats, bars from min to max), TTFT p50 (solid) and p99
(dashed), and inter-token latency p50/p99, on log-scaled latency axes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (
    ("output_tokens_per_s", None, "output tokens/s", False),
    ("ttft_p50_ms", "ttft_p99_ms", "TTFT ms (p50 solid, p99 dashed)", True),
    ("itl_p50_ms", "itl_p99_ms", "inter-token latency ms (p50 solid, p99 dashed)", True),
)


def _series(rows: list[dict], scenario: str, metric: str) -> tuple[list[int], list[float], list[float], list[float]]:
    points = sorted((r["concurrency"], r[metric]) for r in rows if r["scenario"] == scenario and metric in r)
    xs = [c for c, _ in points]
    return xs, [m["median"] for _, m in points], [m["min"] for _, m in points], [m["max"] for _, m in points]


def plot_scenario(results: dict, scenario: str, path: Path) -> None:
    fig, axes = plt.subplots(1, len(PANELS), figsize=(6 * len(PANELS), 4.5))
    for ax, (p50, p99, label, log) in zip(axes, PANELS):
        for i, (name, server) in enumerate(results["servers"].items()):
            rows = server.get("summary") or []
            color = f"C{i}"
            xs, med, low, high = _series(rows, scenario, p50)
            if not xs:
                continue
            ax.errorbar(
                xs,
                med,
                yerr=[[m - lo for m, lo in zip(med, low)], [hi - m for m, hi in zip(med, high)]],
                marker="o",
                color=color,
                label=name,
                capsize=3,
            )
            if p99:
                xs99, med99, _, _ = _series(rows, scenario, p99)
                ax.plot(xs99, med99, linestyle="--", marker="x", color=color)
        ax.set_xscale("log", base=2)
        ticks = results["config"]["concurrency"]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off() if not log else None
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    tokens = results["config"]["max_new_tokens"]
    fig.suptitle(
        f"{scenario} prompts, {tokens} output tokens — {results['machine'].get('cpu_model')}, "
        f"{results['machine'].get('usable_cpus')} CPUs"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(results: dict, out: Path) -> list[Path]:
    """One PNG per scenario measured; returns their paths."""
    paths = []
    for scenario in results["config"]["scenarios"]:
        if any(r["scenario"] == scenario for s in results["servers"].values() for r in s.get("summary") or []):
            path = out / f"comparison-{scenario}.png"
            plot_scenario(results, scenario, path)
            paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="comparison.json of a run")
    args = p.parse_args()
    path = Path(args.results)
    for image in plot_all(json.loads(path.read_text()), path.parent):
        print(image)


if __name__ == "__main__":
    main()
