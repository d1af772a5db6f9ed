"""Gemma 3 on the generic transformers path, and its GGUF through the model store.

A tiny random Gemma 3 (sliding and full attention layers, a window of 8 tokens,
one KV head) is served by the shard's engine in process, the way the router
drives it: several requests of different lengths, longer than the window, one
joining mid-way, must each get transformers' greedy tokens; a second EOS id
(Gemma's `<end_of_turn>`) must stop a request. A tiny Gemma 3 GGUF, written
here with the `gguf` package, must convert (`ember.store.convert_gguf`) into a
directory that gives the GGUF's own logits, keeps both rope thetas, stops on
`<end_of_turn>` and prepends `<bos>`.

The slow test serves the real Gemma 3 270M GGUF named by `EMBER_GEMMA3_GGUF`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_model_parity import check_parity
from tiny import train_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

from ember.proto import generate_pb2 as pb
from ember.shard.engine import Engine
from ember.shard.grammar import GrammarCompiler
from ember.shard.models.generic import GenericRunner
from ember.shard.runner import Sequence, load_runner

WINDOW = 8
BOS, EOS = 1, 2  # the tiny tokenizer's <|im_start|> and <|im_end|>
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
PROMPTS = [
    "The capital of France is",
    "Once upon a time there was a little model that generated tokens. The quick brown fox",
    "Hello world! How are you today?",
]


# --- a tiny Gemma 3 saved by transformers ---------------------------------------------------------------


def _prepend_bos(model_dir: Path) -> None:
    """Make the tokenizer add BOS as Gemma's does (tokenizer.json's post-processor)."""
    path = model_dir / "tokenizer.json"
    tok = json.loads(path.read_text())
    tok["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [BOS], "tokens": ["<|im_start|>"]}},
    }
    path.write_text(json.dumps(tok))


def _tiny_gemma3_config(vocab_size: int, **overrides) -> Gemma3TextConfig:
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=WINDOW,
        layer_types=LAYER_TYPES,
        max_position_embeddings=256,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    return Gemma3TextConfig(**{**kwargs, **overrides})


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-gemma3")
    train_tokenizer(out, vocab_size=300)
    _prepend_bos(out)
    vocab_size = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(_tiny_gemma3_config(vocab_size))
    with torch.no_grad():  # random init is small: widen it so greedy choices are clear-cut
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if "norm" in name else 0.08)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def tokenizer(gemma_dir):
    return AutoTokenizer.from_pretrained(gemma_dir)


@pytest.fixture(scope="module")
def reference(gemma_dir):
    return AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32).eval()


def _greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' own greedy continuation (its sliding-window cache), EOS ignored."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(ids) :].tolist()


def _request(rid: int, ids: list[int], max_new: int, ignore_eos: bool = True) -> pb.Request:
    return pb.Request(
        id=rid,
        input_ids=ids,
        parameters=pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=max_new, ignore_eos_token=ignore_eos),
    )


def _engine(model_dir: Path, tokenizer) -> Engine:
    runner = load_runner(model_dir, dtype="float32", device="cpu")
    return Engine(runner, tokenizer, GrammarCompiler(tokenizer))


def _collect(tokens: dict[int, list[int]], finished: dict[int, int], reply) -> pb.CachedBatch | None:
    for g in reply.generations:
        tokens.setdefault(g.request_id, []).extend(g.tokens.ids)
        if g.HasField("generated_text"):
            finished[g.request_id] = g.generated_text.finish_reason
    return reply.batch if reply.HasField("batch") and reply.batch.size else None


def _run_alone(engine: Engine, ids: list[int], max_new: int) -> tuple[dict[int, list[int]], dict[int, int]]:
    """One request (EOS honoured) prefilled and decoded to its end: its tokens and finish reason, by id 0."""
    tokens: dict[int, list[int]] = {}
    finished: dict[int, int] = {}
    batch = pb.Batch(id=0, requests=[_request(0, ids, max_new, ignore_eos=False)], size=1)
    cached = _collect(tokens, finished, engine.prefill(pb.PrefillRequest(batch=batch)))
    while cached is not None:
        cached = _collect(tokens, finished, engine.decode(pb.DecodeRequest(batches=[cached])))
    return tokens, finished


def test_tiny_gemma3_takes_the_generic_path(gemma_dir, tokenizer):
    """Gemma 3 has no Ember model code: transformers' modules, its window reported, BOS prepended."""
    from ember.shard.precision import choose
    from ember.sharding import sharding_problem

    runner = load_runner(gemma_dir, dtype="float32", device="cpu")
    assert isinstance(runner, GenericRunner)
    info = runner.info
    assert (info.model_type, info.window_size, info.attention_impl) == ("gemma3_text", WINDOW, "generic")
    assert info.requires_padding and not info.shared_prefill and EOS in info.eos_token_ids
    assert tokenizer("Hello")["input_ids"][0] == BOS
    precision = choose(gemma_dir, torch.device("cpu"))
    assert precision.dtype == "float32" and precision.quantize is None and "generic" in precision.reason
    problem = sharding_problem(json.loads((gemma_dir / "config.json").read_text()), 2)
    assert problem is not None and "generic transformers path" in problem


def test_sliding_window_changes_the_answer(gemma_dir, reference):
    """Past the window the sliding layers must see fewer tokens: else the tests below prove nothing."""
    ids = torch.tensor([[BOS] + list(range(10, 10 + 3 * WINDOW))])
    config = _tiny_gemma3_config(reference.config.vocab_size, sliding_window=10 * WINDOW)
    unwindowed = Gemma3ForCausalLM(config).eval()
    unwindowed.load_state_dict(reference.state_dict())
    with torch.inference_mode():
        diff = (reference(ids).logits[0, -1] - unwindowed(ids).logits[0, -1]).abs().max().item()
    assert diff > 1e-3


def test_padded_steps_match_transformers_across_the_window(gemma_dir):
    """Ragged prefill, decode, a prompt joining beside running sequences and a chunk after a cached
    prefix: all longer than the window, each row's logits as the sequence alone gives them."""
    runner = load_runner(gemma_dir, dtype="float32", device="cpu")
    check_parity(gemma_dir, runner=runner)
    assert not runner._kv


def test_engine_batches_give_the_greedy_tokens_of_each_request_alone(gemma_dir, tokenizer, reference):
    """Two requests prefilled together, a third merged in later (as the router batches the padded path)."""
    n = 3 * WINDOW
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    assert max(len(i) for i in ids) > WINDOW
    expected = [_greedy(reference, i, n) for i in ids]
    engine = _engine(gemma_dir, tokenizer)
    tokens: dict[int, list[int]] = {}
    finished: dict[int, int] = {}
    first = pb.Batch(id=0, requests=[_request(r, ids[r], n) for r in (0, 1)], size=2)
    cached = _collect(tokens, finished, engine.prefill(pb.PrefillRequest(batch=first)))
    for _ in range(4):
        cached = _collect(tokens, finished, engine.decode(pb.DecodeRequest(batches=[cached])))
    late = pb.Batch(id=1, requests=[_request(2, ids[2], n)], size=1)
    late_cached = _collect(tokens, finished, engine.prefill(pb.PrefillRequest(batch=late)))
    cached = _collect(tokens, finished, engine.decode(pb.DecodeRequest(batches=[cached, late_cached])))
    while cached is not None:
        cached = _collect(tokens, finished, engine.decode(pb.DecodeRequest(batches=[cached])))
    for r in range(3):
        assert tokens[r] == expected[r], f"request {r}"
        assert finished[r] == pb.FINISH_REASON_LENGTH
    assert not engine.batches and not engine.runner._kv


def test_a_second_eos_id_stops_generation(gemma_dir, tokenizer, reference, tmp_path):
    """Gemma stops on `<eos>` and `<end_of_turn>`: the shard reads every id of generation_config.json."""
    ids = tokenizer(PROMPTS[1])["input_ids"]
    greedy = _greedy(reference, ids, 8)
    stop_at = next(k for k in range(2, 8) if greedy[k] not in greedy[:k])
    model_dir = tmp_path / "model"
    shutil.copytree(gemma_dir, model_dir)
    generation = json.loads((model_dir / "generation_config.json").read_text())
    generation["eos_token_id"] = [EOS, greedy[stop_at]]
    (model_dir / "generation_config.json").write_text(json.dumps(generation))
    engine = _engine(model_dir, tokenizer)
    assert greedy[stop_at] in engine.runner.info.eos_token_ids
    tokens, finished = _run_alone(engine, ids, 8)
    assert tokens[0] == greedy[: stop_at + 1]
    assert finished[0] == pb.FINISH_REASON_EOS_TOKEN


def test_sequence_ids_are_reusable_after_free(gemma_dir):
    """A freed sequence leaves nothing behind: the same id starts again from an empty cache."""
    runner = load_runner(gemma_dir, dtype="float32", device="cpu")
    seq = Sequence(7, [BOS] + list(range(20, 40)))
    first = runner.step([seq]).logits
    runner.free(seq)
    assert seq.num_cached == 0 and 7 not in runner._kv
    torch.testing.assert_close(runner.step([seq]).logits, first)


def test_a_short_row_beside_a_long_past_keeps_positions_in_range(tiny_gpt2_dir):
    """Pads after a row's new tokens repeat its last position: GPT-2's position table ends at 256."""
    from test_model_parity import load_reference, reference_logits

    runner = load_runner(tiny_gpt2_dir, dtype="float32", device="cpu")
    old = Sequence(0, [(7 * i) % 200 + 3 for i in range(250)])
    runner.step([old])
    old.token_ids.append(5)
    young = Sequence(1, [(5 * i) % 200 + 3 for i in range(40)])
    out = runner.step([old, young])
    reference = load_reference(tiny_gpt2_dir)
    for row, seq in enumerate((old, young)):
        want = reference_logits(reference, seq.token_ids)[-1]
        assert (out.logits[row] - want).abs().max().item() < 1e-3, f"row {row}"


# --- a tiny Gemma 3 GGUF through the store ------------------------------------------------------------

GGUF_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
GGUF_TEXT = "The capital of France is Paris. Once upon a time there was a tiny model."
GGUF_LAYERS = 6  # the GGUF has no layer types: transformers' default pattern makes every 6th layer global


def _gguf_vocab() -> list[str]:
    """A sentencepiece-style vocabulary: Gemma's specials, the 256 byte tokens, letters and whole words."""
    text = GGUF_TEXT.replace(" ", "\u2581")
    words = ["\u2581" + w for w in GGUF_TEXT.replace(".", "").split()]
    pieces = ["\u2581", *sorted(set(text))] + [w[:k] for w in words for k in range(2, len(w) + 1)]
    tokens = GGUF_SPECIALS + [f"<0x{b:02X}>" for b in range(256)]
    return tokens + [p for p in dict.fromkeys(pieces) if p not in tokens]


def _write_tiny_gguf(path: Path, skip: str | None = None) -> None:
    """A random Gemma 3 written as llama.cpp lays Gemma out (RMSNorm scales stored as 1 + w), float32 tensors."""
    import gguf

    tokens = _gguf_vocab()
    config = _tiny_gemma3_config(
        len(tokens), num_hidden_layers=GGUF_LAYERS, layer_types=None, bos_token_id=2, eos_token_id=1
    )
    torch.manual_seed(1)
    model = Gemma3ForCausalLM(config)
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(GGUF_LAYERS)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_sliding_window(WINDOW)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    kinds = [gguf.TokenType.CONTROL] * len(GGUF_SPECIALS) + [gguf.TokenType.BYTE] * 256
    writer.add_token_types(kinds + [gguf.TokenType.NORMAL] * (len(tokens) - len(kinds)))
    for name, token_id in (("pad", 0), ("eos", 1), ("bos", 2), ("unk", 3)):
        getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, GGUF_LAYERS)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name == "lm_head.weight" or name == skip:
                continue
            data = tensor.normal_(0.0, 0.3 if "norm" in name else 0.08) + (1 if name.endswith("norm.weight") else 0)
            writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), data.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def converted_gguf(tmp_path_factory) -> tuple[Path, Path]:
    from ember.store import convert_gguf

    folder = tmp_path_factory.mktemp("gemma3-gguf")
    _write_tiny_gguf(folder / "tiny.gguf")
    out = folder / "converted"
    out.mkdir()
    convert_gguf(folder / "tiny.gguf", out, progress=lambda *args: None)
    return folder / "tiny.gguf", out


def test_converted_gguf_config_keeps_gemmas_settings(converted_gguf):
    """transformers 4 readers need the thetas spelled out; transformers 5 reads `rope_parameters`."""
    _, out = converted_gguf
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    assert config["rope_theta"] == 1_000_000.0 and config["rope_local_base_freq"] == 10_000.0
    if "rope_parameters" in config:  # transformers 5's spelling, when it wrote the config
        assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 10_000.0
    assert config["sliding_window"] == WINDOW and config["tie_word_embeddings"]
    assert config["layer_types"].count("full_attention") == 1 and config["layer_types"][5] == "full_attention"
    assert "query_pre_attn_scalar" in config and "final_logit_softcapping" in config
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, GGUF_SPECIALS.index("<end_of_turn>")]
    with safe_open(out / "model.safetensors", "pt") as weights:  # the tied head is the embedding, stored once
        assert "model.embed_tokens.weight" in weights.keys() and "lm_head.weight" not in weights.keys()


def test_converted_gguf_tokenizer_prepends_bos_for_the_router_and_the_shard(converted_gguf):
    from tokenizers import Tokenizer

    gguf_file, out = converted_gguf
    text = "The capital of France is"
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True
    router_ids = Tokenizer.from_file(str(out / "tokenizer.json")).encode(text).ids
    shard_ids = AutoTokenizer.from_pretrained(out)(text)["input_ids"]
    gguf_ids = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)(text)["input_ids"]
    assert router_ids == shard_ids == gguf_ids
    assert router_ids[0] == 2 and len(router_ids) > 4


def test_converted_gguf_gives_the_ggufs_logits(converted_gguf):
    gguf_file, out = converted_gguf
    direct = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for n in (5, 3 * WINDOW):
        ids = torch.tensor([[2] + list(range(270, 270 + n))])
        with torch.inference_mode():
            diff = (direct.eval()(ids).logits - converted.eval()(ids).logits).abs().max().item()
        assert diff < 1e-3, f"{n} tokens: max abs diff {diff}"


def test_a_gguf_with_a_missing_tensor_is_refused(tmp_path):
    """transformers would only warn and leave the weight random; the store must not cache that."""
    from ember.store import ModelStoreError, convert_gguf

    _write_tiny_gguf(tmp_path / "broken.gguf", skip="model.layers.2.mlp.up_proj.weight")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelStoreError, match="model.layers.2.mlp.up_proj.weight"):
        convert_gguf(tmp_path / "broken.gguf", out, progress=lambda *args: None)


# --- the real model -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_gemma3_270m_answers_greedily():
    """The base model's greedy continuation, served from the GGUF the registry fetches."""
    gguf_file = os.environ.get("EMBER_GEMMA3_GGUF")
    if not gguf_file or not Path(gguf_file).is_file():
        pytest.skip("set EMBER_GEMMA3_GGUF to the Gemma 3 270M Q4_K_M GGUF")
    from ember.store import resolve_model

    model_dir = resolve_model(gguf_file).path
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = _engine(model_dir, tokenizer)
    assert isinstance(engine.runner, GenericRunner) and set(engine.runner.info.eos_token_ids) == {1, 106}
    ids = tokenizer("The capital of France is")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 2
    tokens, finished = _run_alone(engine, ids, 8)
    assert tokenizer.decode(tokens[0]) == " the capital of the country of France."
