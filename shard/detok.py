"""Incremental detokenisation: one text piece per generated token.

Decoding a single token on its own loses information: byte-level BPE tokens
can hold part of a UTF-8 character, and SentencePiece-style decoders drop or
add a leading space depending on what precedes. So each step decodes a short
window of recent tokens twice (TGI's and vLLM's prefix/read offset
technique): once up to the last emitted token (``prefix``..``read``) and once
including the new tokens; the new piece is the difference. While the decoded
text ends with U+FFFD a character is still incomplete, so the piece is held
back until the following token completes it. Only the few tokens since the
last emitted piece plus the tokens of that piece are kept, so a step costs the same
at token 5 and token 5000.

The decoding goes through the ``tokenizers.Tokenizer`` (the Rust backend): a
transformers fast tokenizer is unwrapped to its ``backend_tokenizer``, which
avoids Python overhead and transformers' ``clean_up_tokenization_spaces``
rewriting (which would break the guarantee that pieces concatenate to the
decoded whole).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_REPLACEMENT = "\ufffd"
# Prompt tokens kept as context for the first generated tokens' leading spaces.
_PROMPT_CONTEXT = 5
# A UTF-8 character spans at most 4 bytes; if text still ends with U+FFFD after
# this many pending tokens, the bytes are invalid for good and are emitted.
_MAX_PENDING = 16


def _decoder(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """Return ids -> text for a tokenizers.Tokenizer or a transformers tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or tokenizer
    if hasattr(backend, "decode_batch"):  # tokenizers.Tokenizer
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(
        ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


class IncrementalDetokenizer:
    """Turns a request's generated token ids into text pieces, one push per token."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool = False) -> None:
        self._decode = _decoder(tokenizer, skip_special_tokens)
        self._ids: list[int] = list(prompt_ids[-_PROMPT_CONTEXT:])
        self._prefix = 0  # start of the context window
        self._read = len(self._ids)  # end of what was already emitted

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes ("" while held back)."""
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Emit whatever is still held back (at the end of the request)."""
        if self._read == len(self._ids):
            return ""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        pending = len(self._ids) - self._read
        if not final and full_text.endswith(_REPLACEMENT) and pending < _MAX_PENDING:
            return ""
        piece = full_text[len(prefix_text) :]
        # The tokens just emitted become the context window of the next step.
        del self._ids[: self._read]
        self._prefix, self._read = 0, len(self._ids)
        return piece
