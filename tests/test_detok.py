"""IncrementalDetokenizer: pieces never hold broken UTF-8 and concatenate to the full decode."""

from __future__ import annotations

import random

import pytest

from ember.shard.detok import IncrementalDetokenizer

TEXTS = [
    "Hello world! How are you today?",
    " leading space, then  two  spaces and\nnewlines\n\n  indented",
    "Emoji: 🎉🔥👍 ✨ 🚀 and a family 👨‍👩‍👧 with skin tone 👍🏽",
    "CJK: 你好，世界。日本語のテキスト。한국어 문장.",
    "café naïve façade über straße — ½ ∑ ∞",
    '{"name": "John Smith", "age": 45}',
]


def stream(tokenizer, prompt_ids, ids, skip=False) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip)
    return [detok.push(i) for i in ids] + [detok.flush()]


def check_texts(tokenizer) -> None:
    prompt = tokenizer("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"] + [eos]
        for skip in (False, True):
            pieces = stream(tokenizer, prompt, ids, skip)
            assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip)
            assert not any("\ufffd" in p for p in pieces), pieces
        assert "".join(stream(tokenizer, [], ids)) == tokenizer.decode(ids)  # no prompt context


def test_texts_tiny_tokenizer(tiny_tokenizer):
    check_texts(tiny_tokenizer)


def test_multibyte_characters_are_held_back(tiny_tokenizer):
    ids = tiny_tokenizer("🚀x")["input_ids"]
    assert len(ids) > 2  # the rocket is split into byte tokens by this small vocabulary
    pieces = stream(tiny_tokenizer, [], ids)
    assert "🚀" in pieces or any(p.startswith("🚀") for p in pieces)
    assert pieces.count("") >= 1  # held back while the character was incomplete


def test_backend_tokenizer_gives_the_same_pieces(tiny_tokenizer):
    ids = tiny_tokenizer(TEXTS[2])["input_ids"]
    assert stream(tiny_tokenizer.backend_tokenizer, [5, 6], ids) == stream(tiny_tokenizer, [5, 6], ids)


def test_truncated_character_is_flushed_at_the_end(tiny_tokenizer):
    ids = tiny_tokenizer("ok 🎉")["input_ids"][:-1]  # drop the emoji's last byte token
    detok = IncrementalDetokenizer(tiny_tokenizer, [])
    pieces = [detok.push(i) for i in ids]
    assert not any("\ufffd" in p for p in pieces)
    tail = detok.flush()
    assert tail.endswith("\ufffd")
    assert "".join(pieces) + tail == tiny_tokenizer.decode(ids)
    assert detok.flush() == ""


def test_random_token_streams_concatenate_to_decode(tiny_tokenizer):
    rng = random.Random(0)
    vocab = len(tiny_tokenizer)
    for _ in range(20):
        ids = [rng.randrange(3, vocab) for _ in range(60)]
        assert "".join(stream(tiny_tokenizer, [], ids)) == tiny_tokenizer.decode(ids)


def test_window_stays_small(tiny_tokenizer):
    ids = tiny_tokenizer(" ".join(TEXTS) * 20)["input_ids"]
    detok = IncrementalDetokenizer(tiny_tokenizer, list(range(3, 100)))
    for i in ids:
        detok.push(i)
        assert len(detok._ids) <= 8


@pytest.mark.slow
def test_texts_smollm2_tokenizer(smol_tokenizer):
    check_texts(smol_tokenizer)
