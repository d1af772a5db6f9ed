"""Session fixtures: tiny models built once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The process helpers (`servers`: start a shard, a router, a launcher and wait for them) live with the
# benchmarks, which use them too; tests may import benchmarks, never the other way round.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import tiny  # noqa: E402


@pytest.fixture(autouse=True)
def _embers_bf16_kernel_wherever_it_runs():
    """In process, tests run Ember's bf16 kernel on every CPU that has AVX-512 BF16, AMX ones included (where
    a served shard prefers oneDNN's AMX path: `native.bf16_kernel_problem`), so the kernel stays tested."""
    from ember.shard import native

    native.prefer_bf16_kernel(True)
    yield
    native.prefer_bf16_kernel(None)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Build (once per variant and overrides) a tiny model directory."""
    built: dict[tuple, Path] = {}

    def make(variant: str = "llama", **overrides) -> Path:
        key = (variant, tuple(sorted(overrides.items())))
        if key not in built:
            out = tmp_path_factory.mktemp(f"tiny-{variant}")
            built[key] = tiny.build_tiny_llama(out, variant=variant, **overrides)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return tiny.build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default model, resolved through the persistent cache ($EMBER_CACHE or ~/.cache/ember).

    The first run on a machine downloads and converts it (about a minute); later runs reuse it.
    """
    from ember.store import resolve_model

    return resolve_model("smollm2").path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2_dir):
    """SmolLM2's real 49k byte-level vocabulary."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)
