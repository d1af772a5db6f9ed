"""The README: its first examples, run as a new user runs them (`make run`, the launcher with no flags, the
default model at the automatic precision, then each `curl` of the "Try it" block, word for word but the
port), and its speed figures, generated from benchmarks/results/."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from servers import Launcher, free_port

README = Path(__file__).resolve().parent.parent / "README.md"


def try_it_commands() -> list[str]:
    """The `curl` commands of the README's "Try it" block, continuation lines joined."""
    section = README.read_text().split("## Try it", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    joined = re.sub(r"\\\n\s*", "", block)
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip().startswith("curl ")]


def test_the_try_it_block_has_the_examples_this_test_checks():
    routes = [re.search(r"localhost:3000(/\S*)", c).group(1) for c in try_it_commands()]
    assert routes == ["/v1/chat/completions", "/generate", "/generate_stream"]


def test_the_speed_figures_are_generated_from_the_results():
    """The README quotes no figure by hand: its speed block is what readme_figures.py makes of the results."""
    import readme_figures

    block = readme_figures.block()
    # Short prompts: the header and four servers (make run's, w4a8, bf16, vLLM CPU); traffic that shares
    # prefixes: the header and three (make run's, without prefix caching, vLLM CPU); the AVX2 run: the header
    # and the servers it holds.
    avx2 = readme_figures._load("traffic_avx2/comparison.json")["servers"]
    assert block.count("\n| ") == 5 + 4 + 1 + sum(name in avx2 for name, _ in readme_figures.AVX2_SERVERS)
    assert readme_figures.readme_block(README.read_text()) == block, "run benchmarks/readme_figures.py --write"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    port = free_port()
    launcher = Launcher(
        "--port",
        str(port),
        "--hostname",
        "127.0.0.1",
        "--shard-uds-path",
        str(tmp_path_factory.mktemp("readme") / "s"),
        env={k: "" for k in ("QUANTIZE", "MATMUL_DTYPE", "DTYPE")},
    )
    try:
        launcher.wait_for_line("router answers GET /health", timeout=600)
        yield port, launcher
    finally:
        launcher.kill()


def _run(command: str, port: int) -> str:
    out = subprocess.run(
        ["bash", "-c", command.replace("localhost:3000", f"127.0.0.1:{port}")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return out.stdout


@pytest.mark.slow
def test_the_first_examples_answer(served):
    port, launcher = served
    chat, generate, stream = (_run(c, port) for c in try_it_commands())
    assert "Paris" in json.loads(chat)["choices"][0]["message"]["content"]
    assert json.loads(generate)["generated_text"].strip()
    events = [json.loads(line[len("data:") :]) for line in stream.splitlines() if line.startswith("data:")]
    assert len(events) > 5 and events[-1]["generated_text"].strip()
    # `make run` serves at the automatic precision, and says so at start.
    assert any("precision" in line and "override" in line for line in launcher.output())
