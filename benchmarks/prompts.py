"""Fixed, reproducible prompt sets for the load generator: short, long, a mix, rag and chat.

Every prompt is built from a seeded word sequence and trimmed to a token count
with the served model's tokenizer, so every server sees the same prompts in the
same order. In `short`, `long` and `mix` each prompt starts with its own index,
so no two share a prefix: servers with prefix caching (vLLM, llama.cpp's prompt
cache, Ember) gain nothing from earlier requests, as long as no prompt is sent
twice (`run_all.py --fresh-repeats`). The traffic prefix caching is for:

* `rag`: ~1,500-token prompts whose first ~1,200 tokens are one of 4 shared
  documents, then a question of their own;
* `chat` (`ChatScript`): users holding 4-turn conversations behind one shared
  ~1,000-token system prompt, every turn resending the whole history (the
  server's own earlier answers included) and ~100 new tokens.
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
RAG_DOCUMENTS = 4
RAG_DOCUMENT_TOKENS = 1200
RAG_QUESTION_TOKENS = 300
CHAT_SYSTEM_TOKENS = 1000
CHAT_TURN_TOKENS = 100
CHAT_TURNS = 4
SCENARIOS = ("short", "long", "mix", "rag", "chat")

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
        if self.scenario == "rag":
            return RAG_DOCUMENT_TOKENS + RAG_QUESTION_TOKENS
        raise ValueError(f"unknown scenario {self.scenario!r}; expected one of {SCENARIOS}")

    def trimmed(self, index: int, target: int) -> str:
        """`word_text(index)` cut to `target` tokens."""
        # About 1.3 tokens per word here: twice the words always covers the target.
        return self.decode(self.encode(word_text(index, 2 * target))[:target])

    def _build(self, index: int) -> tuple[str, int]:
        if self.scenario == "rag":
            document = self.trimmed(-1 - index % RAG_DOCUMENTS, RAG_DOCUMENT_TOKENS)
            question = self.trimmed(index, RAG_QUESTION_TOKENS)
            text = f"Document:\n{document}\n\nQuestion: {question}\nAnswer:"
        else:
            text = self.trimmed(index, self.target_tokens(index))
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


@dataclass
class ChatScript:
    """The `chat` scenario's texts: one system prompt for everyone, user `u`'s turn `t`, and the prompt
    of a turn from the conversation so far (as a completion prompt, the same text for every server)."""

    prompts: PromptSet

    def system(self) -> str:
        return self.prompts.trimmed(-100, CHAT_SYSTEM_TOKENS)

    def user(self, user: int, turn: int) -> str:
        return self.prompts.trimmed(user * CHAT_TURNS + turn, CHAT_TURN_TOKENS)

    @staticmethod
    def prompt(system: str, exchanges: list[tuple[str, str]], question: str) -> str:
        """The whole conversation: system, the earlier (user, answer) pairs, the new user turn."""
        text = f"System: {system}"
        for asked, answered in exchanges:
            text += f"\n\nUser: {asked}\n\nAssistant:{answered}"
        return text + f"\n\nUser: {question}\n\nAssistant:"


def chat_script(tokenizer_json: Path) -> ChatScript:
    return ChatScript(prompt_set("chat", tokenizer_json))
