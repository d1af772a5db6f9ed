"""Fixed, reproducible prompt sets for the load generator: short, long, a mix, rag, chat and grounded.

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

And the traffic n-gram speculative decoding (`--speculate N`) is for, answers
that repeat their prompt:

* `grounded`: ~300-token passages to copy back, at even indices a note of
  numbered sentences (`note_lines`) to copy word for word, at odd ones a small
  Python function (`code_function`) to copy with the function renamed. Each
  prompt names its note or function in its first line and ends where the copy
  starts (its first words given), which a model as small as SmolLM2-135M needs
  to copy long runs rather than write its own text. No two share a prefix.
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
# The passage a `grounded` prompt asks the model to copy (prose) or lightly edit (code).
GROUNDED_PASSAGE_TOKENS = 300
SCENARIOS = ("short", "long", "mix", "rag", "chat", "grounded")

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

# The `grounded` scenario's words: the sentences of its notes, and the names in its Python functions (a verb,
# one of the nouns, a suffix). SmolLM2-135M copies numbered sentences far longer than a run of `word_text`'s
# words, in which it soon loses its place and loops.
_NOUNS = tuple(_WORDS[1:45])  # river ... table
_ADJECTIVES = tuple("bright dark warm cold ancient modern small large green".split())
_VERBS = tuple("walks builds reads writes finds opens closes carries remembers follows watches".split())
_PREPOSITIONS = tuple("after before during under over between through across".split())
_CODE_VERBS = ("gather", "merge", "count", "scan", "fold", "trace", "pack", "split", "rank", "blend")
_CODE_SUFFIXES = ("total", "count", "size", "step", "mark", "left", "best", "span")

Encode = Callable[[str], list[int]]
Decode = Callable[[list[int]], str]


def word_text(index: int, n_words: int) -> str:
    """A deterministic pseudo-sentence, unique per `index` from its first words."""
    rng = random.Random(index * 7919 + n_words)
    words = [rng.choice(_WORDS) for _ in range(n_words)]
    return f"Note {index}: " + " ".join(words) + "."


def note_lines(index: int, n_sentences: int) -> list[str]:
    """A deterministic note: its title line `Note <index>:`, then `n_sentences` numbered sentences."""
    rng = random.Random(index * 7919 + 1)
    lines = [f"Note {index}:"]
    for number in range(1, n_sentences + 1):
        subject = f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
        verb, thing, preposition = rng.choice(_VERBS), rng.choice(_NOUNS), rng.choice(_PREPOSITIONS)
        place = f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
        lines.append(f"{number}. The {subject} {verb} the {thing} {preposition} the {place}.")
    return lines


def code_function(index: int, n_statements: int) -> tuple[str, list[tuple[str, list[str]]]]:
    """A deterministic Python function of integers, unique per `index` from its name (which holds the index):
    its `def` line and `n_statements` statements, each the name it assigns and its lines (each statement
    uses only the parameters and names assigned before it, so any prefix of them is a valid body)."""
    rng = random.Random(index * 104729 + 13)
    verb, noun = rng.choice(_CODE_VERBS), rng.choice(_NOUNS)
    params = rng.sample(_NOUNS, 3)
    head = f"def {verb}_{noun}_{index}({params[0]}, {params[1]}, {params[2]}={rng.randint(2, 9)}):"
    known = list(params)
    statements: list[tuple[str, list[str]]] = []
    for _ in range(n_statements):
        target = f"{rng.choice(_NOUNS)}_{rng.choice(_CODE_SUFFIXES)}"
        x, y, k = rng.choice(known), rng.choice(known), rng.randint(2, 9)
        kind = rng.randrange(5)
        if kind == 0:
            lines = [f"    {target} = {x} + {y} * {k}"]
        elif kind == 1:
            lines = [
                f"    if {x} > {y}:",
                f"        {target} = {x} - {k}",
                "    else:",
                f"        {target} = {y} + {k}",
            ]
        elif kind == 2:
            lines = [f"    {target} = 0", f"    for step in range({k}):", f"        {target} += {x} * step"]
        elif kind == 3:
            lines = [f"    {target} = max({x}, {y}, {k})"]
        else:
            lines = [f"    {target} = {x} % {k} + {y} // {k}"]
        statements.append((target, lines))
        known.append(target)
    return head, statements


def _renamed(index: int, name: str) -> str:
    """The name a `grounded` code prompt asks for instead of `name` (`<verb>_<noun>_<index>`): another verb."""
    verb = name.split("_", 1)[0]
    others = [v for v in _CODE_VERBS if v != verb]
    return random.Random(index).choice(others) + name[len(verb) :]


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
        if self.scenario == "grounded":  # the passage; the instruction around it adds a few dozen tokens
            return GROUNDED_PASSAGE_TOKENS
        raise ValueError(f"unknown scenario {self.scenario!r}; expected one of {SCENARIOS}")

    def trimmed(self, index: int, target: int) -> str:
        """`word_text(index)` cut to `target` tokens."""
        # About 1.3 tokens per word here: twice the words always covers the target.
        return self.decode(self.encode(word_text(index, 2 * target))[:target])

    def within(self, pieces: list[tuple[list[str], str]], target: int) -> str:
        """The most of `pieces` (each: its lines, and the line that closes the text after it, or "") that
        keeps the text, with the closing line of the last one taken, within `target` tokens (the first
        always); the `grounded` passages, cut between whole sentences or statements."""
        lines, closing = [*pieces[0][0]], pieces[0][1]
        for more, after in pieces[1:]:
            if len(self.encode("\n".join([*lines, *more, after]).rstrip("\n"))) > target:
                break
            lines, closing = lines + more, after
        return "\n".join([*lines, closing]).rstrip("\n")

    def passage(self, index: int) -> str:
        """`grounded`: the text prompt `index` asks to copy (even indices, a note) or rename in (odd, code)."""
        if index % 2 == 0:  # a numbered sentence is >= 10 tokens; one per 8 of the target is enough
            return self.within(
                [([line], "") for line in note_lines(index, GROUNDED_PASSAGE_TOKENS // 8)], GROUNDED_PASSAGE_TOKENS
            )
        head, statements = code_function(index, GROUNDED_PASSAGE_TOKENS // 4)  # a statement: >= 6 tokens
        first = head.split("(", 1)[1].split(",", 1)[0]  # returned when no statement fits
        pieces = [([head], f"    return {first}")] + [(lines, f"    return {name}") for name, lines in statements]
        return self.within(pieces, GROUNDED_PASSAGE_TOKENS)

    def _build(self, index: int) -> tuple[str, int]:
        if self.scenario == "rag":
            document = self.trimmed(-1 - index % RAG_DOCUMENTS, RAG_DOCUMENT_TOKENS)
            question = self.trimmed(index, RAG_QUESTION_TOKENS)
            text = f"Document:\n{document}\n\nQuestion: {question}\nAnswer:"
        elif self.scenario == "grounded":
            text = grounded_prompt(index, self.passage(index))
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


def grounded_prompt(index: int, passage: str) -> str:
    """A completion prompt asking to copy `passage` back: word for word (a note, even `index`), or with the
    function renamed and every other line unchanged (code, odd `index`). It ends with the copy's first words
    (the note's title and first number; the `def` with the new name), the model's answer being the rest."""
    if index % 2 == 0:
        title = passage.split("\n", 1)[0]  # "Note <index>:"
        return (
            f"Copy {title[:-1].lower()} below exactly, word for word.\n\n{passage}\n\n"
            f"Exact copy of {title[:-1].lower()}:\n{title}\n1."
        )
    name = passage.split("(", 1)[0].removeprefix("def ")
    new = _renamed(index, name)
    return (
        f"Rename the function `{name}` to `{new}` in the Python code below, and copy every other line "
        f"exactly as it is.\n\nCode:\n```python\n{passage}\n```\n\n"
        f"The same code with the function renamed:\n```python\ndef {new}("
    )


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
