"""Fixed, reproducible prompt sets for the load generator: short, long and a mix.

Every prompt is built from a seeded word sequence and trimmed to a token count
with the served model's tokenizer, so every server sees the same prompts in the
same order. Each prompt starts with its own index, so no two share a prefix:
servers with prefix caching (vLLM, llama.cpp's prompt cache) gain nothing from
earlier requests, and repeats measure the same work as the first run.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

SHORT_TOKENS = 64
LONG_TOKENS = 1000
# In the mix, one prompt in MIX_LONG_EVERY is long: a chat-like load.
MIX_LONG_EVERY = 4
SCENARIOS = ("short", "long", "mix")

_WORDS = (
    "the river morning light garden stone window quiet market road mountain letter "
    "friend village winter summer engine bridge harbor forest station clock paper "
    "music kitchen teacher doctor farmer painter sailor keeper lantern storm ocean "
    "field orchard castle tower journey story answer question reason number table "
    "slowly gently carefully bright dark warm cold ancient modern small large green "
    "walks builds reads writes finds opens closes carries remembers follows watches "
    "and but because while after before during under over between through across "
    "a an one two three several many every each this that those these their her his"
).split()

Encode = Callable[[str], list[int]]
Decode = Callable[[list[int]], str]


def word_text(index: int, n_words: int) -> str:
    """A deterministic pseudo-sentence, unique per `index` from its first words."""
    rng = random.Random(index * 7919 + n_words)
    words = [rng.choice(_WORDS) for _ in range(n_words)]
    return f"Note {index}: " + " ".join(words) + "."


@dataclass
class PromptSet:
    """Prompts of one scenario, by index; `tokens(i)` is the prompt's length."""

    scenario: str
    encode: Encode
    decode: Decode
    _cache: dict[int, tuple[str, int]] = field(default_factory=dict)

    def target_tokens(self, index: int) -> int:
        if self.scenario == "short":
            return SHORT_TOKENS
        if self.scenario == "long":
            return LONG_TOKENS
        if self.scenario == "mix":
            return LONG_TOKENS if index % MIX_LONG_EVERY == MIX_LONG_EVERY - 1 else SHORT_TOKENS
        raise ValueError(f"unknown scenario {self.scenario!r}; expected one of {SCENARIOS}")

    def _build(self, index: int) -> tuple[str, int]:
        target = self.target_tokens(index)
        # About 1.3 tokens per word here: twice the words always covers the target.
        ids = self.encode(word_text(index, 2 * target))[:target]
        text = self.decode(ids)
        return text, len(self.encode(text))

    def text(self, index: int) -> str:
        if index not in self._cache:
            self._cache[index] = self._build(index)
        return self._cache[index][0]

    def tokens(self, index: int) -> int:
        self.text(index)
        return self._cache[index][1]


@lru_cache(maxsize=4)
def _tokenizer(path: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def prompt_set(scenario: str, tokenizer_json: Path) -> PromptSet:
    """A prompt set measured in the tokens of `tokenizer_json` (no special tokens)."""
    tok = _tokenizer(str(tokenizer_json))
    return PromptSet(
        scenario,
        encode=lambda text: tok.encode(text, add_special_tokens=False).ids,
        decode=lambda ids: tok.decode(ids),
    )
