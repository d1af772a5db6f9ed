"""Ember's paged model code must give transformers' logits on the same weights.

`check_parity(model_dir)` is the reusable helper (the SmolLM2 test calls it
with the real model directory): a ragged batch of sequences of different
lengths is prefilled in one step, decoded for 20 steps, with one sequence
joining mid-way (its prompt in the same step as the others' decode tokens) and
one prompt run in two chunks, each compared against that sequence run alone
through transformers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ember.shard.runner import PagedRunner, Sequence, load_runner
from ember.store import GGUF_FILE

TOL = 1e-3


def load_reference(model_dir: Path):
    """transformers' own float32 model for `model_dir` (local files only; a converted GGUF's from its
    `model.gguf`, which transformers dequantizes)."""
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    gguf = {"gguf_file": GGUF_FILE} if (model_dir / GGUF_FILE).is_file() else {}
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True, **gguf).eval()


def reference_logits(reference, token_ids: list[int]) -> torch.Tensor:
    """Float32 logits [len, vocab] of one sequence run alone through `reference` (no padding, no cache)."""
    with torch.inference_mode():
        return reference(input_ids=torch.tensor([token_ids])).logits[0].float()


def _tokens(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def check_parity(
    model_dir: Path,
    prompt_lens: tuple[int, ...] = (5, 23, 40),
    late_prompt_len: int = 19,
    n_decode: int = 20,
    join_at: int = 5,
    tol: float = TOL,
    runner=None,
) -> None:
    """Ragged prefill + decode + a late joiner + a chunked prompt, each checked against transformers."""
    model_dir = Path(model_dir)
    runner = runner or load_runner(model_dir, dtype="float32", device="cpu")
    vocab = runner.info.vocab_size
    total = [n + n_decode for n in prompt_lens] + [late_prompt_len + n_decode - join_at]
    full = [_tokens(n, vocab, seed=i) for i, n in enumerate(total)]
    reference = load_reference(model_dir)
    refs = [reference_logits(reference, toks) for toks in full]
    del reference

    seqs = [Sequence(seq_id=i, token_ids=full[i][:n]) for i, n in enumerate(prompt_lens)]
    out = runner.step(seqs, want_prompt_logits=True)
    for i, n in enumerate(prompt_lens):
        _close(out.prompt_logits[i], refs[i][:n], tol, f"prefill prompt logits of seq {i}")
        _close(out.logits[i], refs[i][n - 1], tol, f"prefill last logits of seq {i}")

    late = Sequence(seq_id=len(prompt_lens), token_ids=full[-1][:late_prompt_len])
    for step in range(1, n_decode):
        for i, s in enumerate(seqs):
            if s is not late:
                s.token_ids.append(full[i][len(s.token_ids)])
        if step == join_at:
            seqs.append(late)  # its whole prompt rides in the same step as the others' decode tokens
        elif late in seqs:
            late.token_ids.append(full[-1][len(late.token_ids)])
        out = runner.step(seqs)
        for i, s in enumerate(seqs):
            _close(out.logits[i], refs[i][len(s.token_ids) - 1], tol, f"decode step {step} of seq {i}")
    for s in seqs:
        runner.free(s)

    chunked = Sequence(seq_id=99, token_ids=full[2][:17])
    runner.step([chunked])
    chunked.token_ids = full[2][:38]  # a chunk after a cached prefix, across a block boundary
    out = runner.step([chunked], want_prompt_logits=True)
    _close(out.prompt_logits[0], refs[2][17:38], tol, "chunk after a cached prefix")
    runner.free(chunked)


def _close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    diff = (got.float().cpu() - want.float().cpu()).abs().max().item()
    assert diff < tol, f"{what}: max abs diff {diff:.2e} >= {tol}"


@pytest.mark.parametrize("variant", ["llama", "llama3", "mistral", "qwen2"])
def test_paged_runner_matches_transformers(tiny_model_factory, variant):
    model_dir = tiny_model_factory(variant)
    runner = load_runner(model_dir, dtype="float32", device="cpu")
    assert isinstance(runner, PagedRunner)
    check_parity(model_dir, runner=runner)
    assert runner.cache.allocator.num_free == runner.cache.num_blocks


def test_mistral_window_is_reported_and_used(tiny_model_factory):
    """The window must change the logits once a sequence is longer than it (else parity proves nothing)."""
    model_dir = tiny_model_factory("mistral")
    runner = load_runner(model_dir, dtype="float32", device="cpu")
    assert runner.info.window_size == 16
    toks = _tokens(40, runner.info.vocab_size, seed=7)
    windowed = runner.step([Sequence(0, list(toks))]).logits[0]
    for layer in runner.model.layers:
        layer.attn.window = None
    full = runner.step([Sequence(1, list(toks))]).logits[0]
    assert (windowed - full).abs().max().item() > 1e-3
    _close(windowed, reference_logits(load_reference(model_dir), toks)[-1], TOL, "windowed logits")


def test_generic_runner_matches_transformers(tiny_gpt2_dir):
    """GPT-2 goes through the generic path; padded batches must not change any sequence's logits."""
    from ember.shard.models.generic import GenericRunner

    runner = load_runner(tiny_gpt2_dir, dtype="float32", device="cpu")
    assert isinstance(runner, GenericRunner)
    assert runner.info.attention_impl == "generic" and runner.info.requires_padding
    check_parity(tiny_gpt2_dir, runner=runner, tol=TOL)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_dtypes_are_honoured(tiny_llama_dir, dtype):
    runner = load_runner(tiny_llama_dir, dtype=dtype, device="cpu")
    assert runner.info.dtype == dtype
    assert runner.model.embed.weight.dtype == getattr(torch, dtype)
    assert runner.cache.k[0].dtype == getattr(torch, dtype)
    toks = _tokens(12, runner.info.vocab_size, seed=3)
    out = runner.step([Sequence(0, toks)])
    assert out.logits.dtype == torch.float32
    ref = reference_logits(load_reference(tiny_llama_dir), toks)[-1]
    assert (out.logits[0] - ref).abs().max().item() < 0.1  # close to float32, not equal


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@CUDA
@pytest.mark.parametrize("variant", ["llama", "mistral", "qwen2"])
def test_paged_runner_matches_transformers_on_cuda(tiny_model_factory, variant):
    """The CUDA path (torch's SDPA over the paged cache; no C kernels) against transformers on the CPU."""
    model_dir = tiny_model_factory(variant)
    runner = load_runner(model_dir, dtype="float32", device="cuda")
    assert runner.info.device_type == "cuda" and runner.cache.k[0].is_cuda
    check_parity(model_dir, runner=runner)
    assert runner.cache.allocator.num_free == runner.cache.num_blocks


@CUDA
def test_bf16_on_cuda_stays_near_float32(tiny_llama_dir):
    """bf16, what a GPU serves by default: a ragged prefill and decode steps within bf16's rounding."""
    runner = load_runner(tiny_llama_dir, dtype="bfloat16", device="cuda")
    reference = load_reference(tiny_llama_dir)
    full = [_tokens(n, runner.info.vocab_size, seed=20 + n) for n in (9, 30)]
    seqs = [Sequence(seq_id=i, token_ids=toks[:-4]) for i, toks in enumerate(full)]
    for step in range(4):
        out = runner.step(seqs)
        for i, s in enumerate(seqs):
            want = reference_logits(reference, s.token_ids)[-1]
            rel = ((out.logits[i].float().cpu() - want).norm() / want.norm()).item()
            assert rel < 3e-2, f"step {step}, seq {i}: relative error {rel:.2e}"
            s.token_ids.append(full[i][len(s.token_ids)])
