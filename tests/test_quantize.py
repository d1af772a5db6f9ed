"""Weight-only int8 / int4 quantization of the decoder's linear layers on CPU (`--quantize`), on torch's
kernels: this module runs without Ember's C kernels, so it also covers the torch paths that serve
where no C compiler is found. Ember's int4 kernel is tested in test_native.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import step_logits

from ember.shard.attention import AttentionMetadata
from ember.shard.layers import INT4_GROUP, PACKED_MAX_ROWS, ColumnParallelLinear, PackedWeight, _linear, pack_weight
from ember.shard.models.llama import PACKED_HEAD_MAX_ROWS, RESCORED_CANDIDATES
from ember.shard.runner import Sequence, load_runner

PROMPTS = [[5, 17, 42, 99, 3, 250], [7, 8, 9]]
CONTINUATION = (11, 12, 13)
BF16_U = 2.0**-8  # bf16's unit roundoff: 8 significant bits, rounding to nearest moves x by at most 2^-8·|x|
CPU = torch.device("cpu")
QUANTIZE_KINDS = ("int8", "int4")  # torch's kernels; w4a8 (Ember's) is in test_native.py


@pytest.fixture(scope="module", autouse=True)
def torch_kernels_only():
    from ember.shard import native

    native.reset_for_tests(None)
    yield
    native.reset_for_tests(False)


def _q4_1_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """A weight made of Q4_1 blocks w = d·q + m whose every quantity is exact in bf16.

    d = c·2^-8 (c in 1..7) and m = k·d (k in -12..3), so w, d and the kernel's zero point m + 8·d are
    small multiples of 2^-8 with at most 7 significant bits: nothing rounds anywhere.
    """
    g = torch.Generator().manual_seed(seed)
    groups = in_features // INT4_GROUP
    q = torch.randint(0, 16, (out_features, groups, INT4_GROUP), generator=g)
    q[..., 0], q[..., 1] = 0, 15  # the block's minimum and maximum are present
    q = q[..., torch.randperm(INT4_GROUP, generator=g)]
    d = torch.randint(1, 8, (out_features, groups, 1), generator=g).float() * 2.0**-8
    m = torch.randint(-12, 4, (out_features, groups, 1), generator=g).float() * d
    w = (q * d + m).view(out_features, in_features)
    assert torch.equal(w.bfloat16().float(), w)
    return w


# --- PackedWeight ---------------------------------------------------------------------------------


def test_int4_finds_q4_1_blocks_again_exactly():
    w = _q4_1_weight(64, 256)
    packed = PackedWeight.quantize(w, "int4")
    assert packed.kind == "int4" and packed.shape == (64, 256)
    deq = packed.dequantize()
    assert deq.dtype == torch.float32 and deq.shape == w.shape
    assert torch.equal(deq, w)
    # 4 bits + bf16 scale/zero, and the bf16 copy that steps of many rows multiply with
    assert packed.nbytes <= w.numel() // 2 + 64 * (256 // INT4_GROUP) * 2 * 2 + w.numel() * 2


def test_int4_error_is_within_half_a_step_of_each_group():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 192, generator=g) * 0.05
    w[:8] += 0.3  # groups far from zero: the bf16 zero point's rounding counts there
    w[8:16, :INT4_GROUP] = 0.02  # a constant group: its range is 0
    packed = PackedWeight.quantize(w, "int4")
    deq = packed.dequantize()
    groups = w.view(96, -1, INT4_GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    step = (high - low) / 15
    zero = low + 8 * step
    # quantization (half a step) + bf16 rounding of the scale (times |q - 8| <= 8) and of the zero
    # point + bf16 rounding of the dequantized value.
    bound = step / 2 + BF16_U * (8 * step + zero.abs() + groups.abs()) + 1e-7
    err = (deq.view_as(groups) - groups).abs()
    assert (err <= bound).all(), (err - bound).max()
    assert torch.equal(deq[8:16, :INT4_GROUP], w[8:16, :INT4_GROUP].bfloat16().float())  # its zero point
    # The bound is not vacuous: a mean error of a quarter step is what rounding to 16 levels gives.
    assert err[16:].mean() < 0.35 * step[16:].mean()
    assert err[16:].mean() > 0.1 * step[16:].mean()


def test_int8_error_is_within_half_a_step_of_each_row():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 80, generator=g) * torch.logspace(-3, 0, 48)[:, None]  # rows of very different scales
    w[5] = 0.0
    packed = PackedWeight.quantize(w, "int8")
    assert packed.data.dtype == torch.int8 and packed.data.shape == (48, 80)
    deq = packed.dequantize()
    step = w.abs().amax(1, keepdim=True) / 127
    bound = step / 2 + BF16_U * (127 * step + w.abs()) + 1e-12
    err = (deq - w).abs()
    assert (err <= bound).all(), (err - bound).max()
    assert torch.equal(deq[5], torch.zeros(80))
    # What the kernel computes is exactly q · bf16(scale), rounded to bf16.
    expected = (packed.data.float() * packed.scales.float()[:, None]).bfloat16().float()
    assert torch.equal(deq, expected)


@pytest.mark.parametrize("kind", QUANTIZE_KINDS)
@pytest.mark.parametrize("lead", [(7,), (2, 5), (PACKED_MAX_ROWS + 3,)])
def test_linear_matches_the_dequantized_matmul(kind, lead):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 128, generator=g) * 0.1
    packed = PackedWeight.quantize(w, kind)
    x = torch.randn(*lead, 128, generator=g)
    out = packed.linear(x)
    assert out.shape == (*lead, 64) and out.dtype == torch.bfloat16
    xb, deq = x.bfloat16().float(), packed.dequantize()  # the kernel sees bf16 activations
    ref = xb @ deq.T
    # dequantize() rounds each weight to bf16, and so does the kernel its output: 2u·Σ|x||w| at most
    err = (out.float() - ref).abs()
    bound = 2 * BF16_U * (xb.abs() @ deq.abs().T) + 1e-5
    assert (err <= bound).all(), (err - bound).max()
    assert err.max() > 0  # (the comparison is not trivially exact)
    # and the whole thing is still the float32 product, within the quantization's noise (rms: 0.8% / 8%)
    exact = x @ w.T
    rms = (out.float() - exact).pow(2).mean().sqrt()
    assert rms < {"int8": 0.015, "int4": 0.12}[kind] * exact.std()


@pytest.mark.parametrize("kind", QUANTIZE_KINDS)
def test_steps_of_many_rows_use_the_bf16_copy(kind, monkeypatch):
    """Few rows: the packed kernel (reads fewer bytes); many: oneDNN's bf16 GEMM on the same weight."""
    g = torch.Generator().manual_seed(5)
    packed = PackedWeight.quantize(torch.randn(64, 128, generator=g) * 0.1, kind)
    assert packed.dense.dtype == torch.bfloat16 and packed.dense.shape == (64, 128)
    calls = []
    real = packed._packed_mm
    monkeypatch.setattr(packed, "_packed_mm", lambda x: calls.append(x.shape[0]) or real(x))
    x = torch.randn(PACKED_MAX_ROWS + 1, 128, generator=g)
    many = packed.linear(x)
    assert calls == []
    plain = torch.nn.functional.linear(x.bfloat16(), packed.dequantize().bfloat16())
    torch.testing.assert_close(many, plain, atol=1e-2, rtol=1e-2)  # the same bf16 products
    calls.clear()  # (dequantize() reads the weight back through the packed kernel)
    few = torch.cat([packed.linear(part) for part in x.split(PACKED_MAX_ROWS)])
    assert calls == [PACKED_MAX_ROWS, 1]
    # The two paths differ only by bf16 rounding of the same products.
    assert (few.float() - many.float()).abs().max() < 0.02 * many.float().abs().max()


def test_unfit_reason():
    fit = PackedWeight.unfit_reason
    assert fit("int4", (64, 128), CPU) is None
    assert fit("int8", (64, 128), CPU) is None
    assert fit("int8", (7, 9), CPU) is None  # int8 takes any shape
    assert "16" in fit("int4", (72, 128), CPU)  # N % 16
    assert "32" in fit("int4", (64, 144), CPU)  # K % 32
    assert "awq" in fit("awq", (64, 128), CPU)
    assert "CPU" in fit("int4", (64, 128), torch.device("meta"))
    assert "CPU" in fit("int8", (64, 128), torch.device("cuda", 0))  # only .type is read: no GPU needed
    with pytest.raises(ValueError, match="divisible"):
        PackedWeight.quantize(torch.randn(64, 48), "int4")


def test_pack_weight_replaces_the_parameter_or_keeps_it_with_a_reason():
    bias = torch.randn(64)
    layer = ColumnParallelLinear(torch.randn(64, 128) * 0.1, bias)
    x = torch.randn(3, 128)
    ref = layer(x)
    assert pack_weight(layer, "int4") is None
    assert isinstance(layer.weight, PackedWeight)
    assert "weight" not in dict(layer.named_parameters())
    out = layer(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, layer.weight.linear(x).float() + bias)  # the float32 bias is added after
    assert (out - ref).pow(2).mean().sqrt() < 0.12 * ref.std()
    odd = ColumnParallelLinear(torch.randn(40, 128))
    assert "divisible" in pack_weight(odd, "int4")
    assert isinstance(odd.weight, torch.nn.Parameter) and odd.weight.dtype == torch.float32


# --- the tiny Llama -------------------------------------------------------------------------------


def _logits(runner, prompts=PROMPTS, continuation=CONTINUATION):
    return step_logits(runner, prompts, continuation)


def _hidden(runner, prompt):
    """Final-normed hidden states of a prompt (no cache), [T, H]."""
    meta = AttentionMetadata.build([0], [len(prompt)], None, runner.block_size, CPU)
    with torch.inference_mode():
        return runner.model(torch.tensor(prompt), meta, None)


@pytest.fixture(scope="module")
def exact_runner(tiny_llama_dir):
    return load_runner(tiny_llama_dir, dtype="float32")


@pytest.fixture(scope="module", params=QUANTIZE_KINDS)
def quantized(request, tiny_llama_dir):
    return request.param, load_runner(tiny_llama_dir, dtype="float32", quantize=request.param)


def test_quantized_runner_packs_the_linear_layers_only(quantized):
    kind, runner = quantized
    model = runner.model
    for layer in model.layers:
        for module in (layer.attn.qkv, layer.attn.o_proj, layer.mlp.gate_up, layer.mlp.down):
            assert isinstance(module.weight, PackedWeight) and module.weight.kind == kind
        assert layer.input_norm.weight.dtype == torch.float32
        assert layer.post_norm.weight.dtype == torch.float32
    assert model.embed.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.float32  # exact rows for the rescored candidates
    assert model.fast_head.dtype == torch.bfloat16
    if kind == "int4":  # the tiny vocabulary (560) is a multiple of 16: the head gets its int4 copy
        assert PackedWeight.unfit_reason("int4", tuple(model.lm_head.weight.shape), CPU) is None
        assert model.packed_head is not None and model.packed_head.kind == "int4"
    else:  # int8 keeps one head path: logits never depend on how many rows share the step
        assert model.packed_head is None
    assert runner.cache.k[0].dtype == torch.bfloat16  # --kv-cache-dtype auto: bf16 under bf16 matmuls
    assert runner.info.dtype == "float32"


def test_quantized_logits_stay_close_to_float32(quantized, exact_runner, tiny_llama_dir):
    """Every logit, the int4 head's approximations included (the tiny random model is a hard case:
    errors seen are about 0.33 std for int8, 0.8 for int4)."""
    kind, runner = quantized
    reference = _logits(exact_runner)
    bound = {"int8": 0.5, "int4": 1.2}[kind]
    # The bound tells quantization from a broken layer: a zeroed weight moves the logits by 4+ std.
    broken = load_runner(tiny_llama_dir, dtype="float32")
    broken.model.layers[0].attn.o_proj.weight.data.zero_()
    assert min((b - r).abs().max() / r.std() for b, r in zip(_logits(broken), reference)) > 2 * bound
    for ref, got in zip(reference, _logits(runner)):
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert (got - ref).abs().max() < bound * ref.std()
        if kind == "int8":
            assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_quantized_runner_computes_with_its_dequantized_weights(quantized, tiny_llama_dir):
    """Against a float32 runner holding `dequantize()`d weights only bf16's rounding remains: the packed
    layout, the qkv / gate_up splits and the zero points are right (seen: 0.03 std at most)."""
    _, runner = quantized
    twin = load_runner(tiny_llama_dir, dtype="float32")
    for mine, theirs in zip(twin.model.layers, runner.model.layers):
        for name in ("attn.qkv", "attn.o_proj", "mlp.gate_up", "mlp.down"):
            mine.get_submodule(name).weight.data = theirs.get_submodule(name).weight.dequantize()
    for ref, got in zip(_logits(twin), _logits(runner)):
        best = ref.topk(4, dim=-1).indices  # well inside the rescored candidates
        assert (got.gather(1, best) - ref.gather(1, best)).abs().max() < 0.08 * ref.std()
        assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_best_candidates_carry_float32_head_logits(quantized):
    _, runner = quantized
    seq = Sequence(0, list(PROMPTS[0]))
    step_logits = runner.step([seq]).logits[0]
    runner.free(seq)
    hidden = _hidden(runner, PROMPTS[0])[-1:]
    full = F.linear(hidden, runner.model.lm_head.weight)[0]
    with torch.inference_mode():
        head = runner.model.packed_head  # one row: the int4 head under int4, bf16 under int8
        approx = (head.linear(hidden) if head else _linear(hidden, runner.model.fast_head)).float()[0]
    best = approx.topk(RESCORED_CANDIDATES).indices
    torch.testing.assert_close(step_logits[best], full[best], atol=1e-5, rtol=1e-5)
    assert step_logits.argmax() == full.argmax()


def _greedy(runner, prompts, n_tokens):
    seqs = [Sequence(i, list(p)) for i, p in enumerate(prompts)]
    for _ in range(n_tokens):
        logits = runner.step(seqs).logits
        for s, token in zip(seqs, logits.argmax(-1).tolist()):
            s.token_ids.append(token)
    for s in seqs:
        runner.free(s)
    return [s.token_ids[len(p) :] for s, p in zip(seqs, prompts)]


def test_quantized_greedy_is_batch_invariant(quantized):
    _, runner = quantized
    batched = _greedy(runner, PROMPTS, 8)
    alone = [_greedy(runner, [p], 8)[0] for p in PROMPTS]
    assert batched == alone


def test_head_paths_by_rows(quantized, monkeypatch):
    """<= PACKED_HEAD_MAX_ROWS rows project with the int4 head, more with bf16; both rescore in float32."""
    kind, runner = quantized
    if kind != "int4":  # int8 has one head path: the bf16 copy for any rows
        assert runner.model.packed_head is None
        return
    model = runner.model
    hidden = _hidden(runner, list(range(3, 3 + PACKED_HEAD_MAX_ROWS + 4)))  # [12, H]
    full = F.linear(hidden, model.lm_head.weight)
    calls = []
    real = model.packed_head.linear
    monkeypatch.setattr(model.packed_head, "linear", lambda x: calls.append(x.shape[0]) or real(x))
    with torch.inference_mode():
        for rows, approx_of in (
            (1, real),
            (PACKED_HEAD_MAX_ROWS, real),
            (PACKED_HEAD_MAX_ROWS + 1, lambda h: _linear(h, model.fast_head)),
        ):
            h = hidden[:rows]
            calls.clear()
            logits = model.logits(h)
            assert calls == ([rows] if rows <= PACKED_HEAD_MAX_ROWS else [])
            approx = approx_of(h).float()
            best = approx.topk(RESCORED_CANDIDATES, dim=-1).indices
            rescored = torch.zeros_like(approx, dtype=torch.bool).scatter_(1, best, True)
            # the rescored candidates carry float32 logits, the others the fast path's
            torch.testing.assert_close(logits[rescored], full[:rows][rescored], atol=1e-5, rtol=1e-5)
            assert torch.equal(logits[~rescored], approx[~rescored])
            assert (logits.argmax(-1) == full[:rows].argmax(-1)).all()


def test_head_without_an_int4_shape_keeps_bf16_only(tiny_model_factory):
    model_dir = tiny_model_factory("llama", vocab_size=568)  # 568 = 35·16 + 8
    runner = load_runner(model_dir, dtype="float32", quantize="int8")
    assert PackedWeight.unfit_reason("int4", (568, 64), CPU) is not None
    assert runner.model.packed_head is None and runner.model.fast_head is not None
    logits = runner.step([Sequence(0, [5, 6, 7])]).logits
    assert logits.shape == (1, 568) and torch.isfinite(logits).all()


def test_load_runner_refuses_what_it_cannot_quantize(tiny_llama_dir, tiny_gpt2_dir):
    with pytest.raises(ValueError, match="CPU"):
        load_runner(tiny_llama_dir, dtype="float32", device="meta", quantize="int4")
    with pytest.raises(ValueError, match="generic path"):
        load_runner(tiny_gpt2_dir, quantize="int8")


def test_load_runner_refuses_an_unknown_kind_and_a_conflicting_matmul_dtype(tiny_llama_dir):
    with pytest.raises(ValueError, match="awq"):
        load_runner(tiny_llama_dir, dtype="float32", quantize="awq")
    with pytest.raises(ValueError, match="matmul-dtype"):
        load_runner(tiny_llama_dir, dtype="float32", quantize="int8", matmul_dtype="float16")


# --- flags ----------------------------------------------------------------------------------------


def test_shard_cli_flag_and_env(monkeypatch):
    from ember.shard.cli import _parser

    base = ["serve", "--model-id", "m"]
    monkeypatch.delenv("QUANTIZE", raising=False)
    assert _parser().parse_args(base).quantize is None
    assert _parser().parse_args([*base, "--quantize", "int4"]).quantize == "int4"
    monkeypatch.setenv("QUANTIZE", "int8")
    assert _parser().parse_args(base).quantize == "int8"
    with pytest.raises(SystemExit):
        _parser().parse_args([*base, "--quantize", "awq"])


def test_launcher_flag_reaches_the_shard_command_line(tmp_path, capsys):
    from ember.launcher.args import parse_args
    from ember.launcher.main import shard_spec
    from ember.store import ResolvedModel

    cpu = {"CUDA_VISIBLE_DEVICES": ""}
    model = ResolvedModel(path=tmp_path, model_id="m", sha=None, source="dir")
    assert parse_args([], cpu).quantize is None
    assert "--quantize" not in shard_spec(parse_args([], cpu), model, 0).argv
    assert parse_args([], dict(cpu, QUANTIZE="int8")).quantize == "int8"
    args = parse_args(["--quantize", "int4"], dict(cpu, QUANTIZE="int8"))  # the command line wins
    assert args.quantize == "int4"
    argv = shard_spec(args, model, 0).argv
    assert argv[argv.index("--quantize") + 1] == "int4"
    with pytest.raises(SystemExit):
        parse_args(["--quantize", "awq"], cpu)
    assert "awq" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args([], dict(cpu, QUANTIZE="gptq"))
    assert "QUANTIZE" in capsys.readouterr().err


# --- SmolLM2 (converted from a Q4_1 GGUF) ---------------------------------------------------------


@pytest.mark.slow
def test_smollm2_int4_keeps_its_q4_1_weights_and_knows_paris(smollm2_dir):
    from transformers import AutoTokenizer

    from ember.shard.weights import Weights

    runner = load_runner(smollm2_dir, dtype="float32", quantize="int4")
    layer = runner.model.layers[3]
    f = Weights(smollm2_dir, torch.float32, "cpu")  # the GGUF's tensors, dequantized
    down = f.get("model.layers.3.mlp.down_proj.weight")
    qkv = torch.cat([f.get(f"model.layers.3.self_attn.{n}_proj.weight") for n in "qkv"])
    for original, packed in ((down, layer.mlp.down.weight), (qkv, layer.attn.qkv.weight)):
        groups = original.view(original.shape[0], -1, INT4_GROUP)
        low = groups.amin(-1, keepdim=True)
        step = (groups.amax(-1, keepdim=True) - low) / 15
        q = torch.round((groups - low) / step)
        assert torch.equal(q * step + low, groups)  # every block is a Q4_1 block, in float32
        deq = packed.dequantize()
        # What remains is bf16's rounding of d and of the zero point m + 8·d (GGUF stores them in fp16),
        # then of the dequantized value: exactly that, nothing else.
        expected = ((q - 8) * step.bfloat16().float() + (low + 8 * step).bfloat16().float()).bfloat16().float()
        assert torch.equal(deq, expected.view_as(original))
        err = (deq - original).abs()
        print(
            f"SmolLM2 layer 3 int4 vs Q4_1 {tuple(original.shape)}: max abs err {err.max():.3g} "
            f"(absmax {original.abs().max():.3g}), max {(err.view_as(groups) / step).max():.3f} of a step"
        )
        assert err.max() < 0.01 * original.abs().max()
        assert (err.view_as(groups) <= 0.1 * step + BF16_U * groups.abs()).all()

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    seq = Sequence(0, list(ids))
    eos = set(runner.info.eos_token_ids)
    for _ in range(24):
        token = int(runner.step([seq]).logits[0].argmax())
        if token in eos:
            break
        seq.token_ids.append(token)
    answer = tok.decode(seq.token_ids[len(ids) :])
    print("SmolLM2 int4 answer:", repr(answer))
    assert "Paris" in answer
