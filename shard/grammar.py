"""Grammar-constrained decoding with outlines-core, on a local tokenizer.

A grammar (a regex, or a JSON schema turned into a regex) is compiled into an
``outlines_core.Index``: a table from automaton state to the token ids that
keep the output inside the grammar. Building it walks the whole vocabulary,
so indices are cached (LRU keyed by grammar) and built once per grammar;
each request then only carries a `GrammarState` (an int state and a shared
per-state cache of allowed-id tensors), which is cheap per step.

The vocabulary is built from the tokenizer on disk, never from the hub. The
automaton runs on bytes, so every token is mapped to its exact bytes:
byte-level BPE symbols (``Ġthe``) through the inverse of GPT-2's
byte-to-unicode table, SentencePiece byte-fallback tokens (``<0x0A>``) to
their byte, ``▁`` to a space. A token holding half of a UTF-8 character keeps
its raw bytes, so emoji and CJK can be produced under a grammar.

The regex a grammar stands for is `ember.schema_regex.regex_for`, which the
router also uses to validate grammars before queueing a request.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any

import outlines_core

from ember.schema_regex import GrammarError, grammar_kind, regex_for

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_STATE_CACHE_SIZE = 512  # allowed-id tensors kept per Index
_INDEX_TABLES = 64  # indices whose tables are kept


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _backend(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` behind a transformers fast tokenizer (or itself)."""
    return getattr(tokenizer, "backend_tokenizer", None) or tokenizer


def _decoder_types(backend: Any) -> set[str]:
    """Types of the tokenizer's decoder, flattening a Sequence decoder."""
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return {p.get("type", "") for p in parts}


def _token_bytes_fn(backend: Any):
    """Return token string -> its bytes in decoded output, for this tokenizer's decoder."""
    kinds = _decoder_types(backend)
    if "ByteLevel" in kinds:
        inverse = {ch: b for b, ch in _bytes_to_unicode().items()}

        def byte_level(token: str) -> bytes | None:
            if all(ch in inverse for ch in token):
                return bytes(inverse[ch] for ch in token)
            return token.encode()  # an added token written in plain text

        return byte_level

    def sentencepiece(token: str) -> bytes | None:
        if "ByteFallback" in kinds and (m := _BYTE_TOKEN.match(token)):
            return bytes([int(m.group(1), 16)])
        return token.replace("\u2581", " ").encode()

    return sentencepiece


def build_vocabulary(tokenizer: Any, eos_token_id: int | None = None) -> outlines_core.Vocabulary:
    """outlines-core Vocabulary from a local tokenizer: token bytes -> ids, special tokens left out.

    `tokenizer` is a transformers fast tokenizer or a `tokenizers.Tokenizer`;
    `eos_token_id` defaults to the tokenizer's EOS. The EOS (and every other
    special token) is not a vocabulary entry: outlines-core allows EOS itself
    in accepting states.
    """
    backend = _backend(tokenizer)
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
    if eos_token_id is None:
        raise GrammarError("the tokenizer has no EOS token; pass eos_token_id")
    special = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
    to_bytes = _token_bytes_fn(backend)
    groups: dict[bytes, list[int]] = {}
    for token, token_id in backend.get_vocab(with_added_tokens=True).items():
        if token_id in special or token_id == eos_token_id:
            continue
        data = to_bytes(token)
        if data:
            groups.setdefault(data, []).append(token_id)
    return outlines_core.Vocabulary(eos_token_id, groups)


class GrammarCompiler:
    """Builds and caches (LRU) the Index of each grammar for one tokenizer.

    Thread-safe: the shard builds indices on its grammar threads (the
    CompileGrammar rpc) while the model thread takes them from the cache at
    Prefill. A lock per grammar makes a second caller wait for the build in
    progress instead of repeating it; different grammars build in parallel
    (outlines-core releases the GIL).
    """

    def __init__(self, tokenizer: Any, cache_size: int = 32, eos_token_id: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.cache_size = cache_size
        self._eos_token_id = eos_token_id
        self._vocabulary: outlines_core.Vocabulary | None = None
        self._cache: OrderedDict[tuple[str, str], outlines_core.Index] = OrderedDict()
        self._lock = threading.Lock()  # guards _cache, _building and the vocabulary
        self._building: dict[tuple[str, str], threading.Lock] = {}

    @property
    def vocabulary(self) -> outlines_core.Vocabulary:
        """Built on first use (a pass over the whole vocabulary)."""
        with self._lock:
            if self._vocabulary is None:
                self._vocabulary = build_vocabulary(self.tokenizer, self._eos_token_id)
            return self._vocabulary

    @property
    def eos_token_id(self) -> int:
        return self.vocabulary.get_eos_token_id()

    def new_state(self, grammar_type: int | str, value: str | dict) -> GrammarState:
        """A fresh per-request state for a grammar (compiled or taken from the cache)."""
        return GrammarState(self.compile(grammar_type, value), self.eos_token_id)

    @staticmethod
    def _key(grammar_type: int | str, value: str | dict) -> tuple[str, str]:
        return grammar_kind(grammar_type), value if isinstance(value, str) else json.dumps(value, sort_keys=True)

    def _cached(self, key: tuple[str, str]) -> outlines_core.Index | None:
        with self._lock:
            index = self._cache.get(key)
            if index is not None:
                self._cache.move_to_end(key)
            return index

    def contains(self, grammar_type: int | str, value: str | dict) -> bool:
        """Whether the grammar's Index is cached now."""
        with self._lock:
            return self._key(grammar_type, value) in self._cache

    def compile(self, grammar_type: int | str, value: str | dict) -> outlines_core.Index:
        """The Index of a grammar, from the cache or built now. Raises `GrammarError`."""
        key = self._key(grammar_type, value)
        index = self._cached(key)
        if index is not None:
            return index
        with self._lock:
            building = self._building.setdefault(key, threading.Lock())
        try:
            with building:
                index = self._cached(key)
                return index if index is not None else self._build(key, value)
        finally:
            with self._lock:
                self._building.pop(key, None)

    def _build(self, key: tuple[str, str], value: str | dict) -> outlines_core.Index:
        regex = regex_for(key[0], value, validate=False)
        vocabulary = self.vocabulary
        try:
            index = outlines_core.Index(regex, vocabulary)
        except Exception as exc:
            raise GrammarError(f"cannot compile grammar: {exc}") from exc
        with self._lock:
            self._cache[key] = index
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return index


class _IndexTables:
    """Per-Index tables shared by every request on that Index: EOS id and an LRU of allowed ids.

    The allowed ids of a state become an int64 tensor once, on the sampling
    device, instead of converting a list of up to a whole vocabulary per
    request and step.
    """

    def __init__(self, index: outlines_core.Index, size: int = _STATE_CACHE_SIZE) -> None:
        self.index = index  # held, so the registry's id() key cannot be reused
        self.size = size
        self.eos_token_id = _find_eos(index)
        self._tensors: OrderedDict[tuple[int, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def allowed(self, state: int, device: Any = None):
        key = (state, str(device) if device is not None else "cpu")
        with self._lock:
            tensor = self._tensors.get(key)
            if tensor is not None:
                self._tensors.move_to_end(key)
                return tensor
        import torch

        tensor = torch.tensor(self.index.get_allowed_tokens(state), dtype=torch.int64, device=device)
        with self._lock:
            self._tensors[key] = tensor
            if len(self._tensors) > self.size:
                self._tensors.popitem(last=False)
        return tensor


_TABLES: OrderedDict[int, _IndexTables] = OrderedDict()
_TABLES_LOCK = threading.Lock()


def _tables_for(index: outlines_core.Index) -> _IndexTables:
    """The shared tables of an Index (LRU over the most recent indices)."""
    with _TABLES_LOCK:
        tables = _TABLES.get(id(index))
        if tables is not None and tables.index is index:
            _TABLES.move_to_end(id(index))
            return tables
    tables = _IndexTables(index)
    with _TABLES_LOCK:
        _TABLES[id(index)] = tables
        while len(_TABLES) > _INDEX_TABLES:
            _TABLES.popitem(last=False)
    return tables


def _find_eos(index: outlines_core.Index) -> int:
    """EOS of an Index: the token allowed in an accepting state that leads nowhere."""
    for final in index.get_final_states():
        for token_id in index.get_allowed_tokens(final):
            if index.get_next_state(final, token_id) is None:
                return token_id
    raise GrammarError("grammar has no accepting state")


class GrammarState:
    """One request's position in its grammar's automaton (None once EOS was taken)."""

    def __init__(self, index: outlines_core.Index, eos_token_id: int | None = None) -> None:
        self.index = index
        self._tables = _tables_for(index)
        self.eos_token_id = self._tables.eos_token_id if eos_token_id is None else eos_token_id
        self.state: int | None = index.get_initial_state()

    def allowed_ids(self, device: Any = None):
        """Token ids (int64 tensor, on `device`, CPU by default) that keep the output in the grammar.

        EOS is among them only in an accepting state; once the automaton has
        ended (EOS taken) only EOS is allowed.
        """
        if self.state is None:
            import torch

            return torch.tensor([self.eos_token_id], dtype=torch.int64, device=device)
        return self._tables.allowed(self.state, device)

    def advance(self, token_id: int) -> None:
        """Move along `token_id`; EOS, or a token the grammar does not allow, ends the automaton."""
        if self.state is not None:
            self.state = None if token_id == self.eos_token_id else self.index.get_next_state(self.state, token_id)

    def is_accepting(self) -> bool:
        """The output so far is a complete match (EOS may be sampled now)."""
        return self.state is not None and self.index.is_final_state(self.state)

    def is_finished(self) -> bool:
        """Nothing but EOS can follow: EOS was taken, or the accepting state allows only EOS."""
        if self.state is None:
            return True
        return self.index.is_final_state(self.state) and len(self._tables.allowed(self.state)) == 1
