"""Gemma 3 on Ember's paged model code (and on the generic transformers path, which still takes it when
asked), and its GGUF through the model store.

A tiny random Gemma 3 (sliding and full attention layers, a window of 8 tokens,
one KV head) must give transformers' float32 logits on the paged path (`check_parity`:
a ragged prefill longer than the window, decode steps, a request joining mid-way, a
chunk after a cached prefix), as must a second one with Gemma's own scalings made
visible (a head_dim that is not hidden / heads, a `query_pre_attn_scalar` that is not
head_dim, linearly scaled rope on the full layers, soft-capped logits). It is served
by the shard's engine in process, the way the router drives it: several requests
of different lengths, longer than the window, one joining mid-way, must each get
transformers' greedy tokens; a second EOS id (Gemma's `<end_of_turn>`) must stop a
request. Under `--quantize` its linears are packed and its logits stay near float32.
A tiny Gemma 3 GGUF (Q8_0 matrices), written here with the `gguf` package, must
convert (`ember.store.convert_gguf`) into a directory that keeps the GGUF as its
weights, is served from the file's own codes on the paged path with the GGUF's own
logits, keeps both rope thetas, stops on `<end_of_turn>` and prepends `<bos>`.

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
from tiny import assert_ranks_give, ragged_steps, run_two_ranks, train_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

from ember.proto import generate_pb2 as pb
from ember.shard import native
from ember.shard.engine import Engine
from ember.shard.grammar import GrammarCompiler
from ember.shard.layers import PackedWeight
from ember.shard.models.generic import GenericRunner
from ember.shard.runner import PagedRunner, Sequence, load_runner
from ember.store import GGUF_FILE

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


def _save_tiny_gemma3(out: Path, seed: int, **overrides) -> Path:
    train_tokenizer(out, vocab_size=300)
    _prepend_bos(out)
    vocab_size = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(_tiny_gemma3_config(vocab_size, **overrides))
    with torch.no_grad():  # random init is small: widen it so greedy choices are clear-cut
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if "norm" in name else 0.08)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> Path:
    return _save_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"), seed=0)


ODD_SCALE = 24  # query_pre_attn_scalar: neither head_dim (32) nor hidden / heads (16)
SOFTCAP = 30.0


@pytest.fixture(scope="module")
def odd_gemma_dir(tmp_path_factory) -> Path:
    """Gemma's scalings made visible: the first fixture's query_pre_attn_scalar equals its head_dim, which
    equals hidden / heads, so a model using either would still match there."""
    return _save_tiny_gemma3(
        tmp_path_factory.mktemp("odd-gemma3"),
        seed=3,
        head_dim=32,
        num_key_value_heads=2,
        query_pre_attn_scalar=ODD_SCALE,
        final_logit_softcapping=SOFTCAP,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    )


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


def _runner(model_dir: Path, path: str = "paged"):
    """The paged runner `load_runner` picks, or the generic one built directly."""
    if path == "generic":
        return GenericRunner(model_dir, torch.float32, torch.device("cpu"))
    runner = load_runner(model_dir, dtype="float32", device="cpu")
    assert isinstance(runner, PagedRunner)
    return runner


def _holds_nothing(runner) -> bool:
    """No sequence's state left: the generic runner's past, the paged runner's blocks."""
    if isinstance(runner, GenericRunner):
        return not runner._kv
    return runner.cache.allocator.num_free == runner.cache.num_blocks


def _engine(model_dir: Path, tokenizer, path: str = "paged") -> Engine:
    return Engine(_runner(model_dir, path), tokenizer, GrammarCompiler(tokenizer))


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


def test_tiny_gemma3_takes_the_paged_path(gemma_dir, tokenizer):
    """Gemma 3 runs on Ember's own model code: paged, its window reported, BOS prepended, the fused C
    step refused with its reason, tensor parallel refused only for its single KV head."""
    from ember.shard.precision import choose
    from ember.sharding import sharding_problem

    runner = _runner(gemma_dir)
    info = runner.info
    assert (info.model_type, info.window_size, info.attention_impl) == ("gemma3_text", WINDOW, "paged")
    assert not info.requires_padding and info.shared_prefill and EOS in info.eos_token_ids
    assert tokenizer("Hello")["input_ids"][0] == BOS
    model = runner.model
    sliding = [t == "sliding_attention" for t in LAYER_TYPES]
    assert [layer.attn.window for layer in model.layers] == [WINDOW if s else None for s in sliding]
    assert [layer.attn.rope for layer in model.layers] == [int(s) for s in sliding]
    assert model.fused is None and "Gemma" in model.fused_why and "silu only" in model.fused_why
    paths = dict((kind, path) for kind, path, _ in model.kernel_paths())
    assert paths["fused step"].startswith("none")
    precision = choose(gemma_dir, torch.device("cpu"))
    assert precision.dtype == "float32" and precision.quantize is None and "generic" not in precision.reason
    config = json.loads((gemma_dir / "config.json").read_text())
    problem = sharding_problem(config, 2)
    assert problem is not None and "num_key_value_heads=1" in problem
    assert sharding_problem({**config, "num_key_value_heads": 2}, 2) is None


def test_the_fused_step_refuses_gemma_even_where_it_would_run(gemma_dir):
    """Under w4a8 on a VNNI CPU a Llama model's layers run in one C call; Gemma's must not (silu only,
    two norms per layer), and say so."""
    from ember.shard.models.llama import FusedDecode

    if native.kernels() is None or not native.kernels().q4:
        pytest.skip("w4a8 needs Ember's kernels on an AVX2 or AVX-512 VNNI CPU")
    runner = load_runner(gemma_dir, dtype="float32", device="cpu", quantize="w4a8")
    reason = FusedDecode.unfit_reason(runner.model)
    assert runner.model.fused is None and reason == runner.model.fused_why and "Gemma" in reason


def test_sliding_window_changes_the_answer(gemma_dir, reference):
    """Past the window the sliding layers must see fewer tokens: else the tests below prove nothing."""
    ids = torch.tensor([[BOS] + list(range(10, 10 + 3 * WINDOW))])
    config = _tiny_gemma3_config(reference.config.vocab_size, sliding_window=10 * WINDOW)
    unwindowed = Gemma3ForCausalLM(config).eval()
    unwindowed.load_state_dict(reference.state_dict())
    with torch.inference_mode():
        diff = (reference(ids).logits[0, -1] - unwindowed(ids).logits[0, -1]).abs().max().item()
    assert diff > 1e-3


def test_paged_steps_match_transformers_across_the_window(gemma_dir):
    """Ragged prefill, decode, a prompt joining beside running sequences and a chunk after a cached
    prefix, on the paged cache: all longer than the window, each row's logits as the sequence alone
    gives them in transformers (float32, within 1e-3)."""
    runner = _runner(gemma_dir)
    check_parity(gemma_dir, runner=runner)
    assert _holds_nothing(runner)


def test_paged_steps_match_transformers_with_gemmas_own_scalings(odd_gemma_dir):
    runner = _runner(odd_gemma_dir)
    spec = runner.model.spec
    assert spec.head_dim * spec.num_heads != spec.hidden_size
    assert spec.attention_scale == ODD_SCALE**-0.5 and spec.final_logit_softcapping == SOFTCAP
    check_parity(odd_gemma_dir, runner=runner)
    assert _holds_nothing(runner)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_paged_steps_match_transformers_on_cuda(odd_gemma_dir):
    """torch's SDPA over the paged cache and CUDA graphs for decode steps (two rope tables, the embedding
    scale on the device), against transformers on the CPU."""
    runner = load_runner(odd_gemma_dir, dtype="float32", device="cuda")
    assert runner.info.device_type == "cuda"
    check_parity(odd_gemma_dir, runner=runner)
    assert _holds_nothing(runner)


@pytest.fixture(scope="module")
def multimodal_gemma_dir(tmp_path_factory) -> Path:
    """Gemma 3 as its multimodal checkpoints come (model_type `gemma3`, the text model's config nested in
    `text_config`, a vision tower beside it), saved by transformers."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    out = tmp_path_factory.mktemp("tiny-gemma3-multimodal")
    train_tokenizer(out, vocab_size=300)
    _prepend_bos(out)
    vocab_size = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = Gemma3Config(
        text_config=_tiny_gemma3_config(vocab_size).to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4
    )
    torch.manual_seed(4)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if "norm" in name else 0.08)
    model.save_pretrained(out, safe_serialization=True)
    return out


def test_a_multimodal_gemma3_checkpoint_serves_its_text_model(multimodal_gemma_dir):
    """The text model of a `gemma3` checkpoint on the paged path (its vision tower left unread): the
    logits of transformers' multimodal model given text alone."""
    config = json.loads((multimodal_gemma_dir / "config.json").read_text())
    assert config["model_type"] == "gemma3" and "text_config" in config
    runner = _runner(multimodal_gemma_dir)
    assert (runner.info.model_type, runner.info.window_size) == ("gemma3", WINDOW)
    check_parity(multimodal_gemma_dir, runner=runner)
    assert _holds_nothing(runner)


def _tp_steps(runner) -> list[torch.Tensor]:
    """A ragged prefill past the window (with prompt logits), then decode steps."""
    first = [BOS] + [(5 * i) % 250 + 20 for i in range(3 * WINDOW)]
    return ragged_steps(runner, first, [BOS] + [(3 * i) % 250 + 20 for i in range(5)], appended=(30, 40))


def _tp_worker(rank: int, model_dir: str, port: int, out_dir: str) -> None:
    from ember.shard.dist import init_distributed

    torch.set_num_threads(1)
    group = init_distributed(rank, 2, "127.0.0.1", port, "cpu")
    runner = load_runner(model_dir, dtype="float32", rank=rank, world_size=2, group=group)
    assert runner.model.kv_heads_per_rank == 1 and runner.model.layers[0].attn.heads == 2
    torch.save(_tp_steps(runner), Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_tensor_parallel_two_ranks_match_one(odd_gemma_dir, tmp_path):
    """Two ranks over gloo (heads, KV heads, MLP and vocabulary split; the query/key norms replicated)
    give one rank's logits."""
    assert_ranks_give(run_two_ranks(_tp_worker, odd_gemma_dir, tmp_path), _tp_steps(_runner(odd_gemma_dir)))


def test_padded_steps_match_transformers_across_the_window(gemma_dir):
    """The generic path, still there for Gemma when built directly: ragged prefill, decode, a late joiner
    and a chunk after a cached prefix, each row's logits as the sequence alone gives them."""
    runner = _runner(gemma_dir, "generic")
    check_parity(gemma_dir, runner=runner)
    assert not runner._kv


@pytest.mark.parametrize("path", ["paged", "generic"])
def test_engine_batches_give_the_greedy_tokens_of_each_request_alone(gemma_dir, tokenizer, reference, path):
    """Two requests prefilled together, a third merged in later (as the router batches either path)."""
    n = 3 * WINDOW
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    assert max(len(i) for i in ids) > WINDOW
    expected = [_greedy(reference, i, n) for i in ids]
    engine = _engine(gemma_dir, tokenizer, path)
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
    assert not engine.batches and _holds_nothing(engine.runner)


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


@pytest.mark.parametrize("path", ["paged", "generic"])
def test_sequence_ids_are_reusable_after_free(gemma_dir, path):
    """A freed sequence leaves nothing behind: the same id starts again from an empty cache (the paged
    runner may take the prompt's first full block from its prefix cache: the same logits)."""
    runner = _runner(gemma_dir, path)
    seq = Sequence(7, [BOS] + list(range(20, 40)))
    first = runner.step([seq]).logits
    runner.free(seq)
    assert seq.num_cached == 0 and _holds_nothing(runner)
    torch.testing.assert_close(runner.step([seq]).logits, first, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_dtypes_stay_near_float32(gemma_dir, reference, dtype):
    """Activations in a half dtype: the norms compute in float32 and round once (Gemma's order), the
    embedding scale is rounded to the dtype; the logits stay as near float32 as transformers' own bf16
    (measured: Ember bf16 0.081, fp16 0.008, transformers bf16 0.099 of the logits' std)."""
    from test_model_parity import reference_logits

    runner = load_runner(gemma_dir, dtype=dtype, device="cpu")
    assert runner.info.dtype == dtype and runner.model.layers[0].input_norm.weight.dtype == torch.float32
    tokens = [BOS] + [(7 * i) % 250 + 20 for i in range(3 * WINDOW)]
    got = runner.step([Sequence(0, tokens)], want_prompt_logits=True).prompt_logits[0]
    want = reference_logits(reference, tokens)
    assert got.dtype == torch.float32 and (got - want).abs().max() < 0.15 * want.std()


QUANTIZED_BOUND = {"w4a8": 2.2, "int4": 2.2, "int8": 0.2}
"""Largest |logit difference| from float32 under `--quantize`, as a share of the logits' standard deviation,
over a prompt longer than the window and four decode steps. Measured: w4a8 1.64, int4 1.83, int8 0.12. The
tiny random Gemma (weights widened so greedy choices are clear-cut) is a hard case for 4-bit weights: a
float32 runner holding the same dequantized weights is as far off (1.67, 1.81), so the distance is the
weights' rounding, which `TWIN_BOUND` separates from the arithmetic."""
TWIN_BOUND = 0.1
"""Largest difference on each row's four best logits from a float32 runner holding the packed weights'
`dequantize()`d values: what bf16 / int8 activations leave (measured 0.062 w4a8, 0.034 int4, 0.023 int8)."""


@pytest.mark.parametrize("kind", ["w4a8", "int4", "int8"])
def test_quantized_gemma_serves_near_float32(gemma_dir, reference, kind):
    """The decoder linears are the same parallel linears as Llama's: `--quantize` packs every one of them,
    the step computes with what they hold, and the logits stay within `QUANTIZED_BOUND` of float32."""
    from test_model_parity import reference_logits

    if kind == "w4a8" and (native.kernels() is None or not native.kernels().q4):
        pytest.skip("w4a8 needs Ember's kernels on an AVX2 or AVX-512 VNNI CPU")
    runner = load_runner(gemma_dir, dtype="float32", device="cpu", quantize=kind)
    twin = _runner(gemma_dir)
    for layer, twin_layer in zip(runner.model.layers, twin.model.layers):
        for name in ("attn.qkv", "attn.o_proj", "mlp.gate_up", "mlp.down"):
            weight = layer.get_submodule(name).weight
            assert isinstance(weight, PackedWeight) and weight.kind == kind
            linear = twin_layer.get_submodule(name)
            del linear.weight
            linear.weight = torch.nn.Parameter(weight.dequantize(), requires_grad=False)
    assert runner.model.fused is None
    tokens = [BOS] + [(7 * i) % 250 + 20 for i in range(3 * WINDOW)]
    want = reference_logits(reference, tokens)
    seqs = [Sequence(0, tokens[:-4]), Sequence(0, tokens[:-4])]
    out, twin_out = (r.step([s], want_prompt_logits=True) for r, s in zip((runner, twin), seqs))
    pairs = [(out.prompt_logits[0], twin_out.prompt_logits[0], want[: len(tokens) - 4])]
    for n in range(len(tokens) - 4, len(tokens)):
        for s in seqs:
            s.token_ids.append(tokens[n])
        pairs.append((runner.step([seqs[0]]).logits, twin.step([seqs[1]]).logits, want[n : n + 1]))
    worst = worst_twin = 0.0
    for got, twin_got, exact in pairs:
        worst = max(worst, ((got - exact).abs().max() / exact.std()).item())
        best = twin_got.topk(4, dim=-1).indices
        worst_twin = max(
            worst_twin, ((got.gather(1, best) - twin_got.gather(1, best)).abs().max() / exact.std()).item()
        )
    print(f"{kind}: max |logit - float32| = {worst:.3f}, top-4 vs dequantized twin = {worst_twin:.3f} (of the std)")
    assert worst_twin <= TWIN_BOUND and worst <= QUANTIZED_BOUND[kind]


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
    """A sentencepiece-style vocabulary: Gemma's specials, the 256 byte tokens, letters and whole words,
    padded with unused tokens to a multiple of 16 (as Gemma's 262,144: its table then packs as codes)."""
    text = GGUF_TEXT.replace(" ", "\u2581")
    words = ["\u2581" + w for w in GGUF_TEXT.replace(".", "").split()]
    pieces = ["\u2581", *sorted(set(text))] + [w[:k] for w in words for k in range(2, len(w) + 1)]
    tokens = GGUF_SPECIALS + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [p for p in dict.fromkeys(pieces) if p not in tokens]
    return tokens + [f"<unused{i}>" for i in range(-len(tokens) % 16)]


def _write_tiny_gguf(path: Path, skip: str | None = None, quant: str | None = None) -> None:
    """A random Gemma 3 written as llama.cpp lays Gemma out (RMSNorm scales stored as 1 + w): float32
    tensors, or with `quant` (a type the `gguf` package quantizes: Q8_0, Q4_0, ...) its matrices in that
    type and its norms in F32, as llama.cpp's quantizations keep them."""
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
    kinds += [gguf.TokenType.UNUSED if t.startswith("<unused") else gguf.TokenType.NORMAL for t in tokens[len(kinds) :]]
    writer.add_token_types(kinds)
    for name, token_id in (("pad", 0), ("eos", 1), ("bos", 2), ("unk", 3)):
        getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, GGUF_LAYERS)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name == "lm_head.weight" or name == skip:
                continue
            data = tensor.normal_(0.0, 0.3 if "norm" in name else 0.08) + (1 if name.endswith("norm.weight") else 0)
            gguf_name = names.get_name(name, try_suffixes=(".weight",))
            if quant is not None and data.dim() == 2:
                qtype = gguf.GGMLQuantizationType[quant]
                writer.add_tensor(gguf_name, gguf.quants.quantize(data.numpy(), qtype), raw_dtype=qtype)
            else:
                writer.add_tensor(gguf_name, data.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


GGUF_QUANT = "Q8_0"
GGUF_W4A8_BOUND = 0.15
"""Largest |logit difference| from the float32 model of the same file under w4a8, as a share of the logits'
std: the file's own 8-bit codes are kept exactly, what remains is int8 activations (measured 0.078)."""


@pytest.fixture(scope="module")
def converted_gguf(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Gemma 3 GGUF with Q8_0 matrices, converted by the store (which keeps it as the weights)."""
    from ember.store import convert_gguf

    folder = tmp_path_factory.mktemp("gemma3-gguf")
    _write_tiny_gguf(folder / "tiny.gguf", quant=GGUF_QUANT)
    out = folder / "converted"
    out.mkdir()
    convert_gguf(folder / "tiny.gguf", out, progress=lambda *args: None)
    return folder / "tiny.gguf", out


def test_converted_gguf_config_keeps_gemmas_settings(converted_gguf):
    """transformers 4 readers need the thetas spelled out; transformers 5 reads `rope_parameters`."""
    gguf_file, out = converted_gguf
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
    # Ember's own code serves Gemma 3: the GGUF itself is the weights (a hard link), no float copy.
    assert os.stat(out / GGUF_FILE).st_ino == os.stat(gguf_file).st_ino
    assert not list(out.glob("*.safetensors"))


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


def test_the_gguf_gives_its_own_logits_on_the_paged_path(converted_gguf):
    """Float32 from the file's tensors (dequantized, norms read back from 1 + w): the logits transformers
    gives on the same GGUF, over prompts longer than the window, decode, a late joiner and a chunk."""
    _, out = converted_gguf
    runner = _runner(out)
    assert runner.model.spec.attention_scale == 256**-0.5  # transformers' default: the GGUF does not say
    check_parity(out, runner=runner)
    assert _holds_nothing(runner)


def test_the_gguf_serves_its_own_codes_under_w4a8(converted_gguf):
    """Under w4a8 every projection, the embedding and the tied head hold the file's own 8-bit codes (their
    values exactly what transformers dequantizes), the norms the file's 1 + w, and the logits stay near
    the float32 model of the same file."""
    from test_model_parity import load_reference, reference_logits

    if native.kernels() is None or not native.kernels().q4:
        pytest.skip("w4a8 needs Ember's kernels on an AVX2 or AVX-512 VNNI CPU")
    _, out = converted_gguf
    reference = load_reference(out)
    state = reference.state_dict()
    runner = load_runner(out, dtype="float32", device="cpu", quantize="w4a8")
    model = runner.model
    projections = {
        "attn.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        "attn.o_proj": ["self_attn.o_proj"],
        "mlp.gate_up": ["mlp.gate_proj", "mlp.up_proj"],
        "mlp.down": ["mlp.down_proj"],
    }
    norms = {
        "input_norm": "input_layernorm",
        "attn.q_norm": "self_attn.q_norm",
        "attn.k_norm": "self_attn.k_norm",
        "attn_out_norm": "post_attention_layernorm",
        "post_norm": "pre_feedforward_layernorm",
        "mlp_out_norm": "post_feedforward_layernorm",
    }
    for i, layer in enumerate(model.layers):
        for where, names in projections.items():
            weight = layer.get_submodule(where).weight
            assert isinstance(weight, PackedWeight) and weight.q4.bits == 8, (i, where)
            want = torch.cat([state[f"model.layers.{i}.{name}.weight"] for name in names])
            assert torch.equal(weight.dequantize(), want), (i, where)
        for where, name in norms.items():
            got = layer.get_submodule(where).weight
            torch.testing.assert_close(got, 1 + state[f"model.layers.{i}.{name}.weight"], rtol=0, atol=1e-6)
    assert isinstance(model.embed.weight, native.Q4Weight) and model.q8_head is model.embed.weight
    ids = torch.tensor([0, 7, 250, 271])
    assert torch.equal(model.embed(ids), state["model.embed_tokens.weight"][ids])
    assert model.fused is None and "Gemma" in model.fused_why

    tokens = [2] + [(11 * i) % 300 + 6 for i in range(3 * WINDOW)]
    want = reference_logits(reference, tokens)
    got = runner.step([Sequence(seq_id=1, token_ids=tokens)], want_prompt_logits=True).prompt_logits[0]
    share = ((got - want).abs().max() / want.std()).item()
    print(f"GGUF {GGUF_QUANT} under w4a8: max |logit - float32| = {share:.3f} of the logits' std")
    assert share <= GGUF_W4A8_BOUND


def test_the_ggufs_float_directory_gives_the_ggufs_logits(converted_gguf, tmp_path):
    """What the benchmarks' peers load (`float_directory`: transformers' dequantization into float32
    safetensors) still gives the GGUF's logits, the tied head stored once."""
    from ember.store import float_directory

    gguf_file, _ = converted_gguf
    out = tmp_path / "float"
    out.mkdir()
    float_directory(gguf_file, out, progress=lambda *args: None)
    with safe_open(out / "model.safetensors", "pt") as weights:  # the tied head is the embedding, stored once
        assert "model.embed_tokens.weight" in weights.keys() and "lm_head.weight" not in weights.keys()
    direct = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for n in (5, 3 * WINDOW):
        ids = torch.tensor([[2] + list(range(270, 270 + n))])
        with torch.inference_mode():
            diff = (direct.eval()(ids).logits - converted.eval()(ids).logits).abs().max().item()
        assert diff < 1e-3, f"{n} tokens: max abs diff {diff}"


def test_a_float32_gemma_directory_of_format_2_is_converted_again(tmp_path):
    """Before format 3 a Gemma 3 GGUF became float32 safetensors for the generic path: the store converts
    such a directory again, to keep the GGUF's own tensors."""
    from ember import store

    _write_tiny_gguf(tmp_path / "tiny.gguf", quant=GGUF_QUANT)
    cache = tmp_path / "cache"
    first = store.resolve_model(str(tmp_path / "tiny.gguf"), cache_dir=cache, progress=lambda *args: None)
    source = json.loads((first.path / "ember_source.json").read_text())
    assert source["format"] == store.CONVERSION_FORMAT == 3 and source["weight_type"] == GGUF_QUANT
    (first.path / GGUF_FILE).unlink()
    (first.path / "model.safetensors").write_bytes(b"float32 weights")
    (first.path / "ember_source.json").write_text(json.dumps({**source, "format": 2}))
    again = store.resolve_model(str(tmp_path / "tiny.gguf"), cache_dir=cache, progress=lambda *args: None)
    assert again.path == first.path
    assert (again.path / GGUF_FILE).is_file() and not (again.path / "model.safetensors").exists()


def test_a_gguf_with_a_missing_tensor_is_refused(tmp_path):
    """The shard would fail on it at every start (and transformers, for a float directory, would only warn
    and leave the weight random): the store must not cache that."""
    from ember.store import ModelStoreError, convert_gguf, float_directory

    _write_tiny_gguf(tmp_path / "broken.gguf", skip="model.layers.2.mlp.up_proj.weight")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelStoreError, match="blk.2.ffn_up.weight"):
        convert_gguf(tmp_path / "broken.gguf", out, progress=lambda *args: None)
    with pytest.raises(ModelStoreError, match="model.layers.2.mlp.up_proj.weight"):
        float_directory(tmp_path / "broken.gguf", out, progress=lambda *args: None)


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
    assert isinstance(engine.runner, PagedRunner) and set(engine.runner.info.eos_token_ids) == {1, 106}
    ids = tokenizer("The capital of France is")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 2
    tokens, finished = _run_alone(engine, ids, 8)
    assert tokenizer.decode(tokens[0]) == " the capital of the country of France."
