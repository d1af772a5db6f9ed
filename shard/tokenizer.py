"""The tokenizer a shard process holds: `tokenizers` (the Rust library) read straight from `tokenizer.json`.

A shard never encodes (the router does), so it holds no BPE merges: it turns ids back into text
(streaming detokenization, stop sequences, `generated_text`), builds grammar vocabularies from token
strings, and marks special tokens. transformers' `AutoTokenizer` does that too, but importing and building
it added 67 MiB of resident memory to a SmolLM2 shard and 354 MiB to a Gemma 3 one (transformers pulls in
several hundred modules, sympy and PIL among them; Gemma's merges alone take 200 MiB), as
`benchmarks/results/memory.md` measures. `ShardTokenizer` answers the few questions the shard asks the way
transformers' fast tokenizer answers them, from the same files:

* `decode(ids, skip_special_tokens)`: the backend's decode, then `clean_up_tokenization_spaces` where the
  tokenizer's config asks for it and its model is not BPE (transformers 5 skips it for BPE);
* `all_special_ids`: the ids of the special tokens the config names (bos, eos, unk, sep, pad, cls, mask and
  the additional ones), as transformers lists them;
* `eos_token_id`, and `backend_tokenizer` for the grammar's vocabulary.

A model directory without `tokenizer.json` (a slow, sentencepiece-only tokenizer) still gets transformers'.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# transformers' `clean_up_tokenization`: spaces a word-level tokenizer left before punctuation and contractions.
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"))
_CLEANUPS += ((" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _content(token: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


class ShardTokenizer:
    """Decoding and special tokens from a `tokenizers.Tokenizer` and its `tokenizer_config.json`."""

    def __init__(self, backend: Any, config: dict) -> None:
        self.backend_tokenizer = backend
        # transformers cleans up only outside BPE, where the clean-up would strip real spaces
        bpe = type(backend.model).__name__ == "BPE"
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False)) and not bpe
        names = [_content(config.get(key)) for key in SPECIAL_TOKEN_KEYS]
        names += [_content(t) for t in config.get("additional_special_tokens") or []]
        ids = []
        for name in names:
            token_id = backend.token_to_id(name) if name else None
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
        self.all_special_ids = ids
        eos = _content(config.get("eos_token"))
        self.eos_token_id = backend.token_to_id(eos) if eos else None

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_spaces:
            for before, after in _CLEANUPS:
                text = text.replace(before, after)
        return text


def _decoding_only(path: Path) -> Any:
    """The tokenizer of `path` without BPE's merges, which only encoding reads: decoding maps ids to their
    tokens and runs the decoder. Gemma 3's 262k-token BPE takes 88 MiB so against 290 with its merges."""
    from tokenizers import Tokenizer

    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") == "BPE":
        model["merges"] = []
    return Tokenizer.from_str(json.dumps(spec))


def load_tokenizer(model_dir: Path) -> Any:
    """The shard's tokenizer for `model_dir`: a ShardTokenizer over its tokenizer.json, else transformers'."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if path.is_file():
        try:
            config = json.loads((model_dir / "tokenizer_config.json").read_text())
        except (OSError, ValueError):
            config = {}
        return ShardTokenizer(_decoding_only(path), config)
    log.info("%s has no tokenizer.json: loading transformers' tokenizer", model_dir)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
