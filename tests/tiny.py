"""Tiny random-weight models and a tokenizer, built at test time.

Nothing comes from a hub: the tokenizer is a byte-level BPE trained here on a
small corpus (with emoji, CJK and accents so detokenisation is exercised), and
the models are transformers' own classes with random weights, saved as
float32 safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_ID = 2  # <|im_end|>, as in SmolLM2

_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Hello world! How are you today? I am fine, thank you.",
    "Once upon a time there was a little model that generated tokens.",
    "def add(a, b):\n    return a + b\n",
    '{"name": "John Smith", "age": 45, "color": "red", "tags": ["a", "b"]}',
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14",
    "Emoji: 🎉🔥👍 ✨ 🚀 — café naïve façade über straße",
    "CJK: 你好，世界。日本語のテキスト。한국어 문장.",
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention keeps the KV cache in blocks of sixteen tokens.",
]


def train_tokenizer(out_dir: Path, vocab_size: int = 600) -> None:
    """Train a byte-level BPE tokenizer and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)


def _config_kwargs(vocab_size: int, variant: str) -> tuple[str, dict]:
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=EOS_ID,
        pad_token_id=0,
    )
    if variant == "llama":  # SmolLM2-like: tied embeddings
        return "llama", dict(common, tie_word_embeddings=True, rope_theta=100000.0)
    if variant == "llama3":
        return "llama", dict(
            common,
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if variant == "mistral":
        return "mistral", dict(common, tie_word_embeddings=False, sliding_window=16, rope_theta=10000.0)
    if variant == "qwen2":
        return "qwen2", dict(common, tie_word_embeddings=False, rope_theta=10000.0, use_sliding_window=False)
    raise ValueError(f"unknown tiny variant {variant!r}")


def build_tiny_llama(out_dir: Path, *, variant: str = "llama", seed: int = 0, **config_overrides) -> Path:
    """A tiny Llama-family model (random weights, float32 safetensors) with the trained tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    train_tokenizer(out_dir)
    vocab_size = len(json.loads((out_dir / "tokenizer.json").read_text())["model"]["vocab"])
    model_type, kwargs = _config_kwargs(vocab_size, variant)
    kwargs.update(config_overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init is small; widen it so logits differ clearly between tokens.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(out_dir, safe_serialization=True)
    _add_legacy_config_keys(out_dir)
    return out_dir


def build_tiny_gpt2(out_dir: Path, seed: int = 0) -> Path:
    """A tiny GPT-2 (a non-Llama architecture for the generic path)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out_dir = Path(out_dir)
    train_tokenizer(out_dir)
    vocab_size = len(json.loads((out_dir / "tokenizer.json").read_text())["model"]["vocab"])
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=256,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=1,
        eos_token_id=EOS_ID,
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _add_legacy_config_keys(out_dir: Path) -> None:
    """Write rope_theta / torch_dtype beside transformers 5's spellings (see models.md)."""
    path = out_dir / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    if "torch_dtype" not in cfg and "dtype" in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    path.write_text(json.dumps(cfg, indent=2))


def step_logits(runner, prompts: list[list[int]], continuation=(11, 12, 13)) -> list:
    """Prefill `prompts`, then decode steps over fixed tokens (same inputs for every runner compared).

    Returns the [B, V] logits of each step and frees the sequences' blocks.
    """
    from ember.shard.runner import Sequence

    seqs = [Sequence(i, list(p)) for i, p in enumerate(prompts)]
    steps = [runner.step(seqs).logits]
    for token in continuation:
        for s in seqs:
            s.token_ids.append(token)
        steps.append(runner.step(seqs).logits)
    for s in seqs:
        runner.free(s)
    return steps


def run_two_ranks(worker, model_dir: Path | str, out_dir: Path) -> list:
    """Run `worker(rank, model_dir, port, out_dir)` as ranks 0 and 1 (their gloo group on a free loopback port)
    and return what each saved to `out_dir/rank{rank}.pt`."""
    import socket

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(str(model_dir), port, str(out_dir)), nprocs=2, join=True)
    return [torch.load(Path(out_dir) / f"rank{rank}.pt") for rank in range(2)]


def ragged_steps(runner, first: list[int], second: list[int], appended: tuple[int, int], steps: int = 4) -> list:
    """Prefill two ragged sequences (their prompt logits too), then `steps` decode steps appending
    appended[0] + i and appended[1] + i: each step's logits, in order."""
    from ember.shard.runner import Sequence

    a, b = Sequence(0, list(first)), Sequence(1, list(second))
    out = runner.step([a, b], want_prompt_logits=True)
    results = [out.logits, *out.prompt_logits]
    for i in range(steps):
        a.token_ids.append(appended[0] + i)
        b.token_ids.append(appended[1] + i)
        results.append(runner.step([a, b]).logits)
    return results


def assert_ranks_give(ranks: list, want: list, tol: float = 1e-4) -> None:
    """Every rank's saved tensors (`run_two_ranks`) equal `want`, one rank's, to `tol`."""
    import torch

    for got in ranks:
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=tol, rtol=tol)
