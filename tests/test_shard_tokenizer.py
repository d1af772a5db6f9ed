"""The shard's tokenizer (the Rust `tokenizers` alone) answers as transformers' tokenizer does, without
importing transformers."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys

from tokenizers import Tokenizer, decoders
from tokenizers.models import WordPiece
from transformers import AutoTokenizer

from ember.shard.detok import IncrementalDetokenizer
from ember.shard.grammar import build_vocabulary
from ember.shard.tokenizer import ShardTokenizer, load_tokenizer

TEXT = "Hello world! It's a test , isn't it ? We 're done . Emoji 🎉 and café, 你好。"


def _same_answers(model_dir) -> None:
    ref, mine = AutoTokenizer.from_pretrained(model_dir), load_tokenizer(model_dir)
    assert isinstance(mine, ShardTokenizer)
    assert mine.all_special_ids == ref.all_special_ids and mine.eos_token_id == ref.eos_token_id
    rng = random.Random(5)
    samples = [ref(TEXT)["input_ids"], ref.all_special_ids + ref(TEXT)["input_ids"][:5]]
    samples += [[rng.randrange(len(ref)) for _ in range(rng.randrange(1, 16))] for _ in range(200)]
    for ids in samples:
        for skip in (False, True):
            assert mine.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), ids
    pieces = IncrementalDetokenizer(mine, [], skip_special_tokens=True)
    streamed = "".join(pieces.push(i) for i in samples[0]) + pieces.flush()
    assert streamed == ref.decode(samples[0], skip_special_tokens=True)


def test_smollm2_decodes_as_transformers_does(smollm2_dir):
    _same_answers(smollm2_dir)
    # without the BPE merges, which only encoding reads (a third of Gemma 3's tokenizer in memory)
    spec = json.loads(load_tokenizer(smollm2_dir).backend_tokenizer.to_str())
    assert spec["model"]["type"] == "BPE" and spec["model"]["merges"] == [] and len(spec["model"]["vocab"]) > 49000
    # the grammar's vocabulary is the same built from either
    ref_tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ref, mine = build_vocabulary(ref_tok), build_vocabulary(load_tokenizer(smollm2_dir))
    assert mine.get_eos_token_id() == ref.get_eos_token_id() == ref_tok.eos_token_id
    backend = ref_tok.backend_tokenizer
    for token_id in random.Random(1).sample(range(len(ref_tok)), 300):
        token = backend.id_to_token(token_id)
        assert mine.get(token) == ref.get(token), token


def test_tiny_model_and_the_space_clean_up(tiny_llama_dir, tmp_path):
    _same_answers(tiny_llama_dir)
    # A config asking for transformers' clean-up of spaces before punctuation: transformers skips it for
    # BPE (it would strip real spaces), and so does the shard.
    copy = tmp_path / "cleanup"
    shutil.copytree(tiny_llama_dir, copy)
    config_path = copy / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config["clean_up_tokenization_spaces"] = True
    config_path.write_text(json.dumps(config))
    assert not load_tokenizer(copy).clean_up_spaces
    _same_answers(copy)
    # Elsewhere (WordPiece) it applies.
    wordpiece = ShardTokenizer(
        Tokenizer(WordPiece({"[UNK]": 0, "a": 1, ".": 2, "'": 3, "s": 4}, unk_token="[UNK]")),
        {"clean_up_tokenization_spaces": True},
    )
    wordpiece.backend_tokenizer.decoder = decoders.WordPiece()
    assert wordpiece.decode([1, 2, 1, 3, 4]) == "a. a's"


def test_a_shard_never_imports_transformers(smollm2_dir):
    """What the shard process loads (runner, engine, grammar compiler, tokenizer) leaves transformers out:
    ~100 MiB of resident memory per rank (benchmarks/results/memory.md)."""
    code = f"""
import sys
from ember.shard.engine import Engine
from ember.shard.grammar import GrammarCompiler
from ember.shard.runner import load_runner
from ember.shard.tokenizer import load_tokenizer
runner = load_runner({str(smollm2_dir)!r})
tokenizer = load_tokenizer({str(smollm2_dir)!r})
Engine(runner, tokenizer, GrammarCompiler(tokenizer))
print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
