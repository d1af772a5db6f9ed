"""Ember's C kernels (`shard/kernels/`, loaded by `shard/native.py`): the paged decode attention against
the torch path, the bf16 KV cache (`--kv-cache-dtype`) they read, the matmuls, the fused step, and the
interface itself (struct layouts checked at load, status codes named, the path per kind of layer)."""

from __future__ import annotations

import ctypes
import logging
import random

import pytest
import torch
from tiny import step_logits

from ember.shard import attention, native
from ember.shard.attention import AttentionMetadata
from ember.shard.runner import default_kv_dtype, load_runner

PROMPTS = [[5, 17, 42, 99, 3, 250, 8, 8, 1, 40, 41, 42, 43, 44, 45, 46, 47, 48], [7, 8, 9], [300]]


@pytest.fixture()
def kernels():
    built = native.kernels()
    if built is None:
        pytest.skip("no C compiler on this machine: the torch paths serve alone")
    yield built
    native.reset_for_tests(False)


def _torch_path():
    """Run the torch fallback in this process (the kernels are looked up at every call)."""
    native.reset_for_tests(None)


def _case(lens, heads, kv_heads, dim, block_size, dtype, seed=0):
    """A shuffled block pool holding each sequence's context, and a decode step's metadata over it."""
    gen = torch.Generator().manual_seed(seed)
    tables, needed = [], [-(-n // block_size) for n in lens]
    pool = list(range(sum(needed) + 3))
    random.Random(seed).shuffle(pool)
    for n in needed:
        tables.append(pool[:n])
        pool = pool[n:]
    slots = (sum(needed) + 3) * block_size
    k = torch.randn(slots, kv_heads, dim, generator=gen).to(dtype)
    v = torch.randn(slots, kv_heads, dim, generator=gen).to(dtype)
    q = torch.randn(len(lens), heads, dim, generator=gen)
    meta = AttentionMetadata.build([n - 1 for n in lens], [1] * len(lens), tables, block_size, torch.device("cpu"))
    return q, k, v, meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "dim,heads,kv_heads", [(64, 9, 3), (64, 4, 4), (64, 4, 2), (64, 8, 2), (16, 4, 2), (24, 6, 6), (128, 8, 2)]
)
@pytest.mark.parametrize("window", [None, 5, 40])
def test_paged_decode_matches_the_gathering_torch_path(kernels, dtype, dim, heads, kv_heads, window):
    lens = [1, 2, 15, 16, 17, 33, 70]
    q, k, v, meta = _case(lens, heads, kv_heads, dim, 16, dtype)
    got = kernels.paged_decode(q, k, v, meta.gather_blocks, meta.context_lens, 16, window, dim**-0.5)
    # The reference: the torch path over the same cache, widened to float32 (exactly what bf16 stores).
    _torch_path()
    ref = attention._decode(q, (k.float(), v.float()), meta, window).view(len(lens), heads, dim)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


@pytest.fixture()
def amx_decode(kernels):
    """The kernels with decode attention on AMX tiles (skipped where there are none); restored after."""
    if not kernels.use_amx_attention(True):
        pytest.skip("no AMX bf16 tiles here (CPU, compiler or kernel): decode attention stays on AVX-512")
    yield kernels
    kernels.use_amx_attention(True)


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 1), (16, 2)])
@pytest.mark.parametrize("block_size", [16, 32, 8])
@pytest.mark.parametrize("window", [None, 5, 40])
def test_amx_decode_attention_keeps_float32s_numbers(amx_decode, heads, kv_heads, block_size, window):
    """Decode attention over a bf16 cache on AMX tiles (queries and probabilities split into two bf16
    parts each) against the AVX-512 float32 path: within 2e-5 (seen: 7e-6), at contexts that end inside a
    key tile, within one, and across many; with windows; up to 8 query heads per KV head (16 take the
    AVX-512 path, as do blocks of 8 slots). Bf16 queries alone would be off by ~1e-3."""
    lens = [1, 2, 15, 16, 17, 33, 70, 300]
    q, k, v, meta = _case(lens, heads, kv_heads, 64, block_size, torch.bfloat16, seed=3)

    def run() -> torch.Tensor:
        return amx_decode.paged_decode(q, k, v, meta.gather_blocks, meta.context_lens, block_size, window, 0.125)

    tiles = run()
    assert not amx_decode.use_amx_attention(False)
    avx512 = run()
    torch.testing.assert_close(tiles, avx512, atol=2e-5, rtol=1e-4)


def test_amx_decode_attention_in_a_model_keeps_float32s_logits(amx_decode, tiny_model_factory):
    """A model with 64-wide heads and a bf16 cache, prompt rows and decode steps with decode attention on
    AMX tiles against the AVX-512 path: float32 layers give the same logits to 1e-4 std; the fused w4a8
    step, whose int8 activations can round a 1e-6 difference a step apart (seen: 0.015 std on one row),
    to 0.05 std with the same greedy tokens."""
    model_dir = tiny_model_factory("llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    settings = [({"kv_cache_dtype": "bfloat16"}, 1e-4)]
    if amx_decode.q4:
        settings.append(({"quantize": "w4a8"}, 0.05))
    for setting, bound in settings:
        runner = load_runner(model_dir, dtype="float32", **setting)
        assert runner.kv_dtype == torch.bfloat16 and (runner.model.fused is not None) == ("quantize" in setting)
        amx_decode.use_amx_attention(True)
        tiles = step_logits(runner, PROMPTS, continuation=[11, 12, 13])
        amx_decode.use_amx_attention(False)
        avx512 = step_logits(runner, PROMPTS, continuation=[11, 12, 13])
        for a, b in zip(tiles, avx512):
            assert (a - b).abs().max() < bound * b.std()
            assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_queries_may_be_a_strided_view(kernels):
    """The model hands q as a slice of the fused q/k rotary output: rows are not contiguous."""
    q, k, v, meta = _case([5, 30], 4, 2, 16, 4, torch.float32)
    fused = torch.cat([q, torch.randn(2, 2, 16)], dim=1)  # [B, heads + kv_heads, D]
    view = fused[:, :4]
    assert not view.is_contiguous()
    got = kernels.paged_decode(view, k, v, meta.gather_blocks, meta.context_lens, 4, None, 0.25)
    want = kernels.paged_decode(q.contiguous(), k, v, meta.gather_blocks, meta.context_lens, 4, None, 0.25)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_large_scores_do_not_overflow(kernels):
    """Softmax subtracts each row's maximum: scores in the hundreds stay finite, as in SDPA."""
    q, k, v, meta = _case([40, 3], 4, 2, 16, 16, torch.float32, seed=3)
    q = q * 200
    got = kernels.paged_decode(q, k, v, meta.gather_blocks, meta.context_lens, 16, None, 0.25)
    assert torch.isfinite(got).all()
    _torch_path()
    ref = attention._decode(q, (k, v), meta, None).view_as(got)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
def test_runner_with_kernels_matches_torch_path(kernels, tiny_model_factory, kv_dtype):
    """Whole tiny models (Llama; Mistral's sliding window) step the same on both paths, over several decodes."""
    for variant in ("llama", "mistral"):
        model_dir = tiny_model_factory(variant)
        runs = []
        for use_kernels in (True, False):
            native.reset_for_tests(kernels if use_kernels else None)
            runner = load_runner(model_dir, dtype="float32", kv_cache_dtype=kv_dtype)
            runs.append(step_logits(runner, PROMPTS, continuation=range(11, 35)))
        for got, ref in zip(*runs):
            if kv_dtype == "float32":
                torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
            else:  # float32 rounding differences may flip a bf16 rounding of a cached key: one bf16 ulp
                assert (got - ref).abs().max() < 0.01 * ref.std()


def test_kv_cache_dtype_default_and_override(tiny_llama_dir):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_kv_dtype(torch.float32, torch.bfloat16, cpu) == torch.bfloat16
    assert default_kv_dtype(torch.float32, torch.float32, cpu) == torch.float32
    assert default_kv_dtype(torch.bfloat16, torch.bfloat16, cuda) == torch.bfloat16
    assert default_kv_dtype(torch.float32, torch.bfloat16, cuda) == torch.float32
    assert load_runner(tiny_llama_dir, dtype="float32").cache.k[0].dtype == torch.float32
    mixed = load_runner(tiny_llama_dir, dtype="float32", matmul_dtype="bfloat16")
    assert mixed.cache.k[0].dtype == torch.bfloat16
    assert mixed.kv_dtype == torch.bfloat16 and mixed.info.dtype == "float32"
    kept = load_runner(tiny_llama_dir, dtype="float32", matmul_dtype="bfloat16", kv_cache_dtype="float32")
    assert kept.cache.k[0].dtype == torch.float32
    # Half the bytes per block: twice the tokens in one budget.
    assert mixed._bytes_per_block() * 2 == kept._bytes_per_block()


def test_bf16_kv_cache_stays_close_to_float32(tiny_llama_dir):
    exact = step_logits(load_runner(tiny_llama_dir, dtype="float32"), PROMPTS, continuation=range(11, 19))
    narrow = step_logits(
        load_runner(tiny_llama_dir, dtype="float32", kv_cache_dtype="bfloat16"), PROMPTS, continuation=range(11, 19)
    )
    for ref, got in zip(exact, narrow):
        assert (got - ref).abs().max() < 0.05 * ref.std()


def test_no_compiler_falls_back_to_torch(monkeypatch, tmp_path, caplog, tiny_llama_dir):
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    native.reset_for_tests(False)
    try:
        with caplog.at_level(logging.WARNING, logger="ember.shard.native"):
            assert native.kernels() is None
        assert "no C compiler" in caplog.text
        runner = load_runner(tiny_llama_dir, dtype="float32")
        logits = step_logits(runner, PROMPTS)
        assert all(torch.isfinite(x).all() for x in logits)
    finally:
        native.reset_for_tests(False)


def test_switched_off_by_env(monkeypatch):
    monkeypatch.setenv("EMBER_NATIVE", "0")
    native.reset_for_tests(False)
    try:
        assert native.kernels() is None
    finally:
        native.reset_for_tests(False)


def test_build_is_cached_per_source_and_cpu(kernels, tmp_path):
    path = native.library_path(tmp_path)
    assert path.parent == tmp_path / "kernels" and not path.exists()
    assert native.build(path) == path and path.is_file()
    assert native.library_path(tmp_path) == path  # same source, flags and CPU: same file
    assert list(path.parent.iterdir()) == [path]  # no temporary left behind


def test_launcher_flag_reaches_the_shard_command_line(tmp_path):
    from ember.launcher.args import parse_args
    from ember.launcher.main import shard_spec
    from ember.store import ResolvedModel

    cpu = {"CUDA_VISIBLE_DEVICES": ""}
    model = ResolvedModel(path=tmp_path, model_id="m", sha=None, source="dir")
    argv = shard_spec(parse_args([], cpu), model, 0).argv  # the registry's default, passed explicitly
    assert argv[argv.index("--kv-cache-dtype") + 1] == "auto"
    argv = shard_spec(parse_args(["--kv-cache-dtype", "bfloat16"], cpu), model, 0).argv
    assert argv[argv.index("--kv-cache-dtype") + 1] == "bfloat16"
    argv = shard_spec(parse_args([], dict(cpu, KV_CACHE_DTYPE="float32")), model, 0).argv
    assert argv[argv.index("--kv-cache-dtype") + 1] == "float32"


# --- elementwise kernels ----------------------------------------------------------------------------


def test_rms_norm_with_and_without_the_residual_add(kernels):
    from ember.shard.layers import RMSNorm

    gen = torch.Generator().manual_seed(1)
    x, res = torch.randn(7, 576, generator=gen) * 3, torch.randn(7, 576, generator=gen)
    norm = RMSNorm(torch.rand(576, generator=gen) + 0.5, 1e-5)
    out, summed = kernels.rms_norm(x, norm.weight, norm.eps)
    assert summed is x
    torch.testing.assert_close(out, norm(x), atol=1e-5, rtol=1e-5)
    out, summed = kernels.rms_norm(x, norm.weight, norm.eps, res)
    torch.testing.assert_close(summed, x + res, atol=0, rtol=0)
    torch.testing.assert_close(out, norm(x + res), atol=1e-5, rtol=1e-5)
    big = torch.randn(300, 576, generator=gen)  # several threads' worth of rows
    torch.testing.assert_close(kernels.rms_norm(big, norm.weight, norm.eps)[0], norm(big), atol=1e-5, rtol=1e-5)


def test_silu_mul_over_the_whole_range(kernels):
    gate = torch.cat([torch.linspace(-120, 120, 2001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.0, -88.0])])
    up = torch.linspace(-3, 3, gate.numel())
    gate_up = torch.cat([gate, up]).view(1, -1)
    want = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(kernels.silu_mul(gate_up)[0], want, atol=1e-6, rtol=1e-5)
    rows = torch.randn(64, 2 * 1536)
    ref = torch.nn.functional.silu(rows[:, :1536]) * rows[:, 1536:]
    torch.testing.assert_close(kernels.silu_mul(rows), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("rot", [64, 32])
def test_rotary_in_place_matches_apply_rotary(kernels, rot):
    from ember.shard.layers import RotaryEmbedding, apply_rotary

    heads, kv_heads, dim, total = 9, 3, 64, 5
    rotary = RotaryEmbedding(
        1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot)), torch.float32, torch.device("cpu")
    )
    cos, sin = rotary.cos_sin(torch.tensor([0, 1, 7, 300, 4095]), 4095)
    qkv = torch.randn(total, (heads + 2 * kv_heads) * dim)
    width = (heads + kv_heads) * dim
    want = apply_rotary(qkv[:, :width].reshape(total, heads + kv_heads, dim), cos, sin)
    v_before = qkv[:, width:].clone()
    kernels.rotary_(qkv, heads + kv_heads, dim, cos, sin)
    torch.testing.assert_close(qkv[:, :width].view(total, heads + kv_heads, dim), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(qkv[:, width:], v_before)  # the value heads are left alone


# --- int4 weights x int8 activations ----------------------------------------------------------------


def _q4_codes(n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen)
    # d and m as the packing keeps them (float16, GGUF's precision): the packing is then exact.
    scale = (torch.rand(n, k // 32, generator=gen) * 0.01 + 1e-3).half().float()
    low = (-torch.rand(n, k // 32, generator=gen) * 0.05).half().float()
    return codes, scale, low


@pytest.fixture()
def q4(kernels):
    if not kernels.q4:
        pytest.skip("this CPU has neither AVX2 nor AVX-512 VNNI: --quantize w4a8 is refused here")
    return kernels


def test_q4_packing_is_exact(q4):
    codes, scale, low = _q4_codes(48, 96)
    weight = native.Q4Weight.pack(codes, scale, low)
    assert weight.packed.dtype == torch.uint8 and weight.packed.numel() == 48 * 96 // 2
    assert torch.equal(weight.codes(), codes.to(torch.uint8))
    want = (codes.view(48, 3, 32) * scale[..., None] + low[..., None]).view(48, 96)
    torch.testing.assert_close(weight.dequantize(), want, atol=0, rtol=0)


@pytest.mark.parametrize("rows", [1, 2, 7, 15, 16, 17, 40])
@pytest.mark.parametrize("n", [64, 48])  # pairs of 16-feature tiles; an odd count takes single tiles
def test_q4_linear_matches_the_dequantized_matmul(q4, rows, n):
    """The only error left is int8 rounding of the activations: per group of 32, |x - dx·xq| <= dx/2."""
    k = 160
    codes, scale, low = _q4_codes(n, k, seed=rows)
    weight = native.Q4Weight.pack(codes, scale, low)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(7)) * 2
    got = q4.q4_linear(x, weight)
    deq = weight.dequantize()
    ref = x.double() @ deq.double().t()
    step = x.view(rows, k // 32, 32).abs().amax(-1) / 127  # dx per row and group
    bound = (step.double().repeat_interleave(32, dim=1) / 2) @ deq.abs().double().t()  # sum of |w|·dx/2
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert ((got.double() - ref).abs() <= bound + 1e-4).all()
    assert (got.double() - ref).abs().max() < 0.02 * ref.abs().max()


def test_q4_rows_never_depend_on_their_neighbours(q4):
    """Activations are quantized per row: a sequence's numbers are the same alone or in any batch."""
    codes, scale, low = _q4_codes(32, 64, seed=2)
    weight = native.Q4Weight.pack(codes, scale, low)
    x = torch.randn(21, 64)
    x[5] *= 1000  # an outlier row must not coarsen the others' quantization
    together = q4.q4_linear(x, weight)
    for i in (0, 5, 20):
        assert torch.equal(q4.q4_linear(x[i : i + 1].clone(), weight)[0], together[i])


@pytest.mark.parametrize("bits", [4, 5, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_q4_weights_of_every_width_pack_exactly_and_multiply_as_dequantized(q4, bits, symmetric):
    """4-, 5- and 8-bit codes, with a minimum per group or none stored (m = -2^(bits-1)·d: Q4_0, Q5_0, Q8_0):
    the packing is exact, a row looked up is the dequantized row, and the kernel equals the same codes
    held 8 bits wide with m stored, to the bit (the same integer sums, the same float steps)."""
    n, k = 48, 96
    gen = torch.Generator().manual_seed(bits * 2 + symmetric)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen)
    scale = (torch.rand(n, k // 32, generator=gen) * 0.01 + 1e-3).half().float()
    low = -(2 ** (bits - 1)) * scale if symmetric else (-torch.rand(n, k // 32, generator=gen) * 0.05).half().float()
    weight = native.Q4Weight.pack(codes, scale, low, bits=bits)
    assert (weight.m is None) == symmetric
    stored = (n * k * bits // 8) + n * (k // 32) * 2 * (1 if symmetric else 2)
    assert weight.nbytes == stored  # 5-bit: 0.625 + 0.0625 (+ m) bytes per weight
    assert torch.equal(weight.codes(), codes.to(torch.uint8))
    want = (codes.view(n, k // 32, 32) * scale[..., None] + low[..., None]).view(n, k)
    assert torch.equal(weight.dequantize(), want)
    ids = torch.tensor([0, 17, 47, 5])
    assert torch.equal(weight.rows(ids), want[ids])
    wide = native.Q4Weight.pack(codes, scale, low, bits=8)
    wide.m = weight.lows if wide.m is None else wide.m
    x = torch.randn(20, k, generator=gen)
    for rows in (1, 3, 20):
        assert torch.equal(q4.q4_linear(x[:rows].clone(), weight), q4.q4_linear(x[:rows].clone(), wide))


@pytest.fixture()
def amx(q4):
    """The kernels with AMX tiles available (skipped elsewhere); the automatic row count is restored after."""
    if not q4.use_amx(native.AMX_MIN_ROWS):
        pytest.skip("no AMX int8 tiles here (CPU, compiler or kernel): w4a8 stays on vpdpbusd")
    yield q4
    q4.use_amx(native.AMX_MIN_ROWS)


@pytest.mark.parametrize("bits", [4, 5, 8])
@pytest.mark.parametrize("n,k", [(48, 160), (64, 1280)])  # an odd tile count; more groups than one unpacking
def test_amx_tiles_give_the_vpdpbusd_paths_bits(amx, bits, n, k):
    """The same integer sums and the same float steps in the same order: equal to the bit at any row count,
    so a step's size may choose the path without changing any sequence's numbers."""
    gen = torch.Generator().manual_seed(bits + n)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen)
    scale = (torch.rand(n, k // 32, generator=gen) * 0.01 + 1e-3).half().float()
    low = (-torch.rand(n, k // 32, generator=gen) * 0.05).half().float()
    weight = native.Q4Weight.pack(codes, scale, low, bits=bits)
    x = torch.randn(300, k, generator=gen) * 3
    x[7] *= 1000
    for rows in (1, 11, 12, 16, 17, 31, 300):
        assert amx.use_amx(1) == 1
        tiles = amx.q4_linear(x[:rows].clone(), weight)
        assert amx.use_amx(0) == 0
        plain = amx.q4_linear(x[:rows].clone(), weight)
        assert torch.equal(tiles, plain), f"{rows} rows"
    assert (tiles - plain).abs().max() == 0 and plain.abs().max() > 0


def test_fused_steps_on_amx_tiles_give_the_same_logits(amx, tiny_llama_dir):
    """decode_layers' projections of a 22-row prefill on AMX tiles: the logits of the vpdpbusd path."""
    runner = load_runner(tiny_llama_dir, dtype="float32", quantize="w4a8")
    assert runner.model.fused is not None
    amx.use_amx(1)
    tiles = _fused_run(runner, prefill_fused=True, decode_fused=True)
    amx.use_amx(0)
    plain = _fused_run(runner, prefill_fused=True, decode_fused=True)
    for got, want in zip(tiles, plain):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_w4a8_runner_uses_ember_kernel_without_dense_copies(q4, tiny_llama_dir):
    runner = load_runner(tiny_llama_dir, dtype="float32", quantize="w4a8")
    weight = runner.model.layers[0].mlp.gate_up.weight
    assert weight.q4 is not None and weight.dense is None and weight.data is None
    assert runner.model.packed_head is None and runner.model.fast_head is None  # 8-bit head: see below
    assert runner.model.q8_head is not None
    n, k = weight.shape
    assert weight.nbytes == n * k // 2 + n * (k // 32) * 4  # 0.625 bytes per weight: codes, float16 d and m
    exact = step_logits(load_runner(tiny_llama_dir, dtype="float32"), PROMPTS)
    # A float32 twin holding the dequantized weights: what remains is the activations' int8 rounding.
    twin = load_runner(tiny_llama_dir, dtype="float32")
    for mine, theirs in zip(twin.model.layers, runner.model.layers):
        for name in ("attn.qkv", "attn.o_proj", "mlp.gate_up", "mlp.down"):
            mine.get_submodule(name).weight.data = theirs.get_submodule(name).weight.dequantize()
    for ref, got, far in zip(step_logits(twin, PROMPTS), step_logits(runner, PROMPTS), exact):
        # (seen: 0.3 std on this random model, which amplifies errors; the weights' own int4 rounding
        # costs 0.7-0.9 std against float32, as on torch's int4 path: test_quantize.py)
        assert (got - ref).abs().max() < 0.45 * ref.std()
        assert (got - far).abs().max() < 1.2 * far.std()


def _fused_run(runner, prefill_fused: bool, decode_fused: bool, newcomer: list[int] | None = None):
    """Prefill PROMPTS, decode 24 fixed tokens (a newcomer joins at step 6: a mixed step), switching the
    fused path per kind of step; returns each step's logits."""
    from ember.shard.runner import Sequence

    fused = runner.model.fused
    seqs = [Sequence(i, list(p)) for i, p in enumerate(PROMPTS)]
    runner.model.fused = fused if prefill_fused else None
    steps = [runner.step(seqs).logits]
    for n, token in enumerate(range(11, 35)):
        for s in seqs:
            s.token_ids.append(token)
        if n == 6 and newcomer is not None:
            seqs.append(Sequence(len(seqs), list(newcomer)))
            runner.model.fused = fused if prefill_fused else None
        else:
            runner.model.fused = fused if decode_fused else None
        steps.append(runner.step(seqs).logits[: len(PROMPTS)])
    for s in seqs:
        runner.free(s)
    runner.model.fused = fused
    return steps


# The settings whose decoder layers run in one C call: w4a8 (VNNI) and bf16 weights (AVX-512 BF16).
FUSED_SETTINGS = {"w4a8": {"quantize": "w4a8"}, "bf16": {"matmul_dtype": "bfloat16"}}


def _counted(monkeypatch, kernels, name: str) -> list:
    """A list that grows by one at every call of `kernels.<name>` from now on (the call still runs)."""
    calls = []
    original = getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def _chunk_logits(runner, context: list[int], chunk: list[int]) -> torch.Tensor:
    """The prompt logits of `chunk` in a step of its own over `context`, cached by the step before."""
    from ember.shard.runner import Sequence

    seq = Sequence(0, context + chunk)
    runner.step([seq], num_new=[len(context)])
    out = runner.step([seq], want_prompt_logits=True).prompt_logits[0]
    runner.free(seq)
    return out


@pytest.fixture()
def chunk_prefill(kernels):
    if not kernels.prefill_chunks:
        pytest.skip("no chunk kernel here (neither AMX bf16 tiles nor AVX2 / AVX-512): chunks take SDPA")
    return kernels


def _chunk_reference(q, keys, values, cached, window, scale, bf16_queries):
    """Float64 attention of a chunk (positions cached ..) over keys/values [len, KVH, D], causal: what the
    kernel computes before its own roundings (on AMX tiles: queries and probabilities to bf16)."""
    rows, heads, dim = q.shape
    groups = heads // keys.shape[1]
    qd, kd, vd = (q.to(torch.bfloat16) if bf16_queries else q).double(), keys.double(), values.double()
    out = torch.empty(rows, heads, dim, dtype=torch.float64)
    for r in range(rows):
        pos = cached + r
        lo = max(0, pos + 1 - window) if window else 0
        for h in range(heads):
            p = torch.softmax((kd[lo : pos + 1, h // groups] @ qd[r, h]) * scale, 0)
            out[r, h] = p @ vd[lo : pos + 1, h // groups]
    return out


@pytest.mark.parametrize(
    "cached,rows,heads,kv_heads,dim,block_size,window",
    [
        (1300, 64, 9, 3, 64, 16, None),  # SmolLM2's heads, a chat turn over its history
        (0, 5, 9, 3, 64, 16, None),  # a fresh chunk: fewer rows than a tile
        (13, 37, 9, 3, 64, 16, None),  # unaligned: the context ends inside a block and a key tile
        (31, 1, 4, 1, 64, 16, None),  # one row, four query heads on one KV head
        (300, 40, 8, 8, 32, 8, None),  # no GQA, 32-wide heads, blocks of 8
        (40, 50, 4, 2, 128, 16, None),  # 128-wide heads: two passes of output tiles
        (37, 70, 4, 1, 96, 32, 50),  # 96-wide heads, a sliding window inside the chunk
        (500, 40, 9, 3, 64, 16, 100),  # a window that drops most of the context
        (600, 300, 9, 3, 64, 16, None),  # more keys than one online-softmax chunk, many tiles
    ],
)
def test_chunk_prefill_attends_like_float64(chunk_prefill, cached, rows, heads, kv_heads, dim, block_size, window):
    """Ember's kernel for a chunk over its cached context, read through a shuffled block table, against
    float64 attention: on AMX tiles within bf16's rounding of the probabilities (seen: at most 0.003 on unit
    values), on FMAs within float32's (seen: 3e-6). A wrong mask, window, head or block lookup is off by the
    size of the values."""
    gen = torch.Generator().manual_seed(cached + rows)
    length = cached + rows
    blocks = -(-length // block_size) + 3
    table = torch.randperm(blocks, generator=gen)[: -(-length // block_size)]
    k = torch.randn(blocks * block_size, kv_heads, dim, generator=gen).to(torch.bfloat16)
    v = torch.randn(blocks * block_size, kv_heads, dim, generator=gen).to(torch.bfloat16)
    q = torch.randn(rows, heads, dim, generator=gen) * 2
    slots = table[torch.arange(length) // block_size] * block_size + torch.arange(length) % block_size
    scale = dim**-0.5
    got = chunk_prefill.paged_prefill(q, k, v, table, cached, block_size, window, scale)
    amx = chunk_prefill.prefill_amx
    want = _chunk_reference(q, k[slots], v[slots], cached, window, scale, bf16_queries=amx)
    assert got.shape == (rows, heads * dim) and got.dtype == torch.float32
    assert (got.view(rows, heads, dim).double() - want).abs().max() < (0.01 if amx else 2e-5)


def test_chunk_prefill_takes_strided_queries_and_refuses_wide_heads(chunk_prefill):
    """Queries as the fused qkv projection leaves them (a view, rows wider than the heads) give the same
    numbers as a contiguous copy; heads wider than 128 stay on SDPA (prefill_fits), and the kernel names
    why if called anyway."""
    k = torch.randn(64, 2, 64).to(torch.bfloat16)
    v = torch.randn(64, 2, 64).to(torch.bfloat16)
    qkv = torch.randn(20, 8 * 64)
    q = qkv[:, : 4 * 64].view(20, 4, 64)
    table = torch.arange(4)
    strided = chunk_prefill.paged_prefill(q, k, v, table, 30, 16, None, 0.125)
    assert torch.equal(strided, chunk_prefill.paged_prefill(q.contiguous(), k, v, table, 30, 16, None, 0.125))
    assert not chunk_prefill.prefill_fits(torch.bfloat16, 256) and not chunk_prefill.prefill_fits(torch.float32, 64)
    wide = torch.randn(64, 1, 256).to(torch.bfloat16)
    with pytest.raises(native.NativeError, match="EMBER_E_HEAD_DIM"):
        chunk_prefill.paged_prefill(torch.randn(4, 1, 256), wide, wide, table, 30, 16, None, 0.0625)


def test_chunk_prefill_in_a_model_step_stays_close_to_bf16_sdpa(chunk_prefill, tiny_model_factory, monkeypatch):
    """A prompt chunk over a cached context through the modules: Ember's kernel against torch's bf16 SDPA
    on the same cache (the path it replaces): the same numbers up to bf16 roundings."""

    wide_heads = tiny_model_factory("llama", num_attention_heads=2, num_key_value_heads=1)  # 32-wide heads
    runner = load_runner(wide_heads, dtype="float32", kv_cache_dtype="bfloat16")
    calls = _counted(monkeypatch, chunk_prefill, "paged_prefill")
    context = [(7 * i) % 300 + 5 for i in range(150)]
    chunk = [(11 * i) % 300 + 5 for i in range(90)]

    kernel = _chunk_logits(runner, context, chunk)
    assert len(calls) == 2  # one call per layer of the second step
    monkeypatch.setattr(native.Kernels, "prefill_fits", lambda *a: False)
    sdpa = _chunk_logits(runner, context, chunk)
    assert len(calls) == 2
    assert (kernel - sdpa).abs().max() < 0.05 * sdpa.std()  # (seen: 0.01 std)
    assert (kernel.argmax(-1) == sdpa.argmax(-1)).float().mean() > 0.95


@pytest.fixture(params=list(FUSED_SETTINGS))
def fused_setting(request, kernels):
    """(load_runner keywords, kernels) of a fused setting this CPU runs."""
    if request.param == "w4a8" and not kernels.q4:
        pytest.skip("this CPU has neither AVX2 nor AVX-512 VNNI: --quantize w4a8 is refused here")
    if request.param == "bf16" and not kernels.bf16:
        pytest.skip("this CPU has no AVX-512 BF16: bf16 weights take oneDNN, op by op")
    return FUSED_SETTINGS[request.param], kernels


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
def test_fused_decode_layers_match_the_per_op_kernels(fused_setting, tiny_model_factory, kv_dtype, monkeypatch):
    """Decode steps run every layer in one C call: the same numbers as the modules calling the
    kernels op by op (Llama; Mistral's sliding window, crossed here), bit for bit."""
    setting, q4 = fused_setting
    for variant in ("llama", "mistral"):
        runner = load_runner(tiny_model_factory(variant), dtype="float32", kv_cache_dtype=kv_dtype, **setting)
        assert runner.model.fused is not None
        calls = _counted(monkeypatch, q4, "decode_layers")
        got = _fused_run(runner, prefill_fused=False, decode_fused=True)
        assert len(calls) == 24  # every decode step
        ref = _fused_run(runner, prefill_fused=False, decode_fused=False)
        assert len(calls) == 24
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, atol=0, rtol=0)
        monkeypatch.undo()


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
def test_fused_prefill_and_mixed_steps_stay_close_to_sdpa(fused_setting, tiny_model_factory, kv_dtype, monkeypatch):
    """Short prompts (alone and joining a running batch) go through the fused call too, attending row by
    row over the cache instead of SDPA: the same numbers up to float32 summation order (and, with a bf16
    cache, the prompt's own keys read back rounded, as decode steps read them)."""
    setting, q4 = fused_setting
    runner = load_runner(tiny_model_factory("mistral"), dtype="float32", kv_cache_dtype=kv_dtype, **setting)
    calls = _counted(monkeypatch, q4, "decode_layers")
    newcomer = [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28]
    got = _fused_run(runner, prefill_fused=True, decode_fused=True, newcomer=newcomer)
    assert len(calls) == 25  # the prefill, 23 decodes and the mixed step
    ref = _fused_run(runner, prefill_fused=False, decode_fused=False, newcomer=newcomer)
    assert len(calls) == 25
    for g, r in zip(got, ref):
        if kv_dtype == "float32":
            torch.testing.assert_close(g, r, atol=2e-4, rtol=2e-4)
        else:  # (seen: 0.06 std; a bf16 cache against a float32 one costs up to 0.05 std by itself, above)
            assert (g - r).abs().max() < 0.12 * r.std()


def test_long_prompt_chunks_take_sdpa(q4, tiny_llama_dir, monkeypatch):
    from ember.shard.models import llama

    runner = load_runner(tiny_llama_dir, dtype="float32", quantize="w4a8")
    calls = _counted(monkeypatch, q4, "decode_layers")
    monkeypatch.setattr(llama, "FUSED_MAX_NEW_TOKENS", 10)
    step_logits(runner, PROMPTS, continuation=[11])  # an 18-token prompt in the first step
    assert len(calls) == 1  # only the decode step


def test_chunks_over_a_long_cached_context_in_a_bf16_cache_leave_the_fused_step(
    fused_setting, tiny_llama_dir, monkeypatch
):
    """A prompt chunk attending over many cached keys (a prefix from the cache, earlier chunks) leaves the
    row-by-row fused call for the modules, attending in bf16 over the bf16 cache (Ember's AMX kernel, or
    SDPA): close to the fused numbers."""
    from ember.shard.models import llama

    setting, q4 = fused_setting
    runner = load_runner(tiny_llama_dir, dtype="float32", kv_cache_dtype="bfloat16", **setting)
    calls = _counted(monkeypatch, q4, "decode_layers")
    context = [(7 * i) % 300 + 5 for i in range(200)]
    chunk = [(11 * i) % 300 + 5 for i in range(180)]

    # the context's step: 200 x 200 pairs, below the bound, fused; the chunk's: 180 x 380 pairs
    sdpa = _chunk_logits(runner, context, chunk)
    assert len(calls) == 1
    monkeypatch.setattr(llama, "FUSED_MAX_ATTENTION_PAIRS", 10**9)
    fused = _chunk_logits(runner, context, chunk)
    assert len(calls) == 3
    assert (sdpa - fused).abs().max() < 0.2 * fused.std()  # (seen: 0.12 std; bf16 queries besides a bf16 cache)
    assert (sdpa.argmax(-1) == fused.argmax(-1)).float().mean() > 0.9


def test_fused_step_attends_chunks_over_a_context_on_its_chunk_kernel(chunk_prefill, tiny_model_factory, monkeypatch):
    """Under w4a8, a step with a long prompt chunk over a cached context stays in the fused call, which
    attends the chunk on the chunk kernel (AMX tiles or FMAs) and the other rows (a running sequence's
    token, a short chunk) by themselves: the logits of the modules, whose attention runs the same kernel
    per layer."""
    from ember.shard.models import llama
    from ember.shard.runner import Sequence

    if not chunk_prefill.q4:
        pytest.skip("this CPU has neither AVX2 nor AVX-512 VNNI: no fused w4a8 step")
    model_dir = tiny_model_factory("llama", num_attention_heads=2, num_key_value_heads=1)  # 32-wide heads
    runner = load_runner(model_dir, dtype="float32", quantize="w4a8")
    calls = _counted(monkeypatch, chunk_prefill, "decode_layers")
    chunks = _counted(monkeypatch, chunk_prefill, "paged_prefill")
    context = [(7 * i) % 300 + 5 for i in range(150)]

    def mixed_logits(fused: bool) -> torch.Tensor:
        """A running sequence's token, a 90-token chunk over 150 cached and a 20-token chunk over 150, in
        one step (chunks of other lengths and positions than the tiles'), fused or through the modules;
        the steps before it fused."""
        running = Sequence(0, [5, 6, 7, 8])
        long, short = Sequence(1, context + list(range(20, 110))), Sequence(2, context + list(range(30, 50)))
        runner.step([running])
        runner.step([long, short], num_new=[len(context), len(context)])
        running.token_ids.append(9)
        monkeypatch.setattr(llama, "FUSED_MAX_NEW_TOKENS", 2048 if fused else 0)
        out = runner.step([running, long, short], want_prompt_logits=True)
        monkeypatch.setattr(llama, "FUSED_MAX_NEW_TOKENS", 2048)
        for seq in (running, long, short):
            runner.free(seq)
        return torch.cat([out.logits, *out.prompt_logits[1:]])

    fused = mixed_logits(True)
    assert len(calls) == 3 and not chunks  # every step fused; no per-layer kernel call
    modules = mixed_logits(False)
    assert len(calls) == 5 and len(chunks) == 4  # the modules: both chunks, one call per layer each
    assert (fused - modules).abs().max() < 1e-4 * modules.std()  # (seen: equal)


def test_fused_decode_is_built_only_where_it_fits(q4, tiny_model_factory):
    """Qwen2's qkv bias keeps the per-layer modules (the fused kernel has no bias); int4 never fuses. The
    model says why."""
    qwen2 = load_runner(tiny_model_factory("qwen2"), dtype="float32", quantize="w4a8").model
    assert qwen2.fused is None and "biases" in qwen2.fused_why
    int4 = load_runner(tiny_model_factory("llama"), dtype="float32", quantize="int4").model
    assert int4.fused is None and "int4 on torch's kernel" in int4.fused_why


@pytest.mark.slow
def test_smollm2_w4a8_stays_close_to_float32(q4, smollm2_dir, smol_tokenizer):
    """Teacher-forced over a paragraph: w4a8 picks float32's top token almost everywhere (seen: 96-97 %,
    KL 0.003 nats; int4 on torch's kernel: 99 %, 0.0006). A broken layout or scale falls far below."""
    import torch.nn.functional as F

    from ember.shard.runner import Sequence

    text = open(__file__.replace("tests/test_native.py", "README.md")).read()[:2500]
    ids = smol_tokenizer(text)["input_ids"][:300]
    outs = []
    for kw in ({}, {"quantize": "w4a8"}):
        runner = load_runner(smollm2_dir, dtype="float32", **kw)
        outs.append(runner.step([Sequence(0, list(ids))], want_prompt_logits=True).prompt_logits[0].float())
    ref, got = outs
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    kl = F.kl_div(F.log_softmax(got, -1), F.log_softmax(ref, -1), log_target=True, reduction="batchmean").item()
    print(f"SmolLM2 w4a8 vs float32 over {len(ids)} tokens: top-1 agreement {agree:.3f}, KL {kl:.4f}")
    assert agree > 0.93 and kl < 0.015


def test_w4a8_refused_without_the_kernel(tiny_llama_dir):
    native.reset_for_tests(None)
    try:
        with pytest.raises(ValueError, match="w4a8.*C compiler"):
            load_runner(tiny_llama_dir, dtype="float32", quantize="w4a8")
    finally:
        native.reset_for_tests(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_store_writes_what_index_copy_writes(kernels, dtype):
    """Strided rows (views of the fused qkv output) into chosen slots; bf16 rounds exactly as torch."""
    qkv = torch.randn(5, (4 + 2 * 2) * 16)
    qkv[0, 64:80] = torch.tensor(
        [
            1.00390625,
            1.01171875,
            -3.0078125,
            float("inf"),
            float("-inf"),
            0.0,
            -0.0,
            1e-40,
            3.4e38,
            -1e-45,
            2.0,
            7.5,
            1.0 + 2**-9,
            1.0 + 3 * 2**-9,
            0.1,
            -0.1,
        ]
    )
    k, v = qkv[:, 64:96].view(5, 2, 16), qkv[:, 96:].view(5, 2, 16)
    slots = torch.tensor([9, 0, 4, 17, 3])
    got = (torch.zeros(20, 2, 16, dtype=dtype), torch.zeros(20, 2, 16, dtype=dtype))
    want = (torch.zeros(20, 2, 16, dtype=dtype), torch.zeros(20, 2, 16, dtype=dtype))
    assert kernels.kv_store(k, v, slots, *got)
    want[0].index_copy_(0, slots, k.to(dtype))
    want[1].index_copy_(0, slots, v.to(dtype))
    assert torch.equal(
        got[0].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
        want[0].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
    )
    assert torch.equal(got[1], want[1])
    assert not kernels.kv_store(k.double(), v.double(), slots, *got)  # layouts it does not take: caller's path


def test_portable_build_without_avx512(kernels, tmp_path):
    """On CPUs without AVX2 the same source builds plain C loops (and no w4a8): still the right numbers."""
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("the portable build's -march is x86-64's")
    flags = [f if not f.startswith("-march=") else "-march=x86-64-v2" for f in native.FLAGS]
    portable = native.load(native.build(tmp_path / "portable.so", flags))
    assert not portable.q4
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, meta = _case([1, 17, 40], 6, 2, 64, 16, dtype, seed=5)
        got = portable.paged_decode(q, k, v, meta.gather_blocks, meta.context_lens, 16, None, 0.125)
        want = kernels.paged_decode(q, k, v, meta.gather_blocks, meta.context_lens, 16, None, 0.125)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    x = torch.randn(3, 64, 2 * 96)
    torch.testing.assert_close(portable.silu_mul(x), kernels.silu_mul(x), atol=1e-6, rtol=1e-6)


def test_the_avx2_build_multiplies_to_the_same_bits(q4, tmp_path):
    """Built for AVX2 alone (x86-64-v3: no AVX-512), the int8 kernel sums the same integers with vpmaddubsw
    and takes the same float steps: w4a8's outputs equal this machine's build (on an AVX-512 VNNI or AMX
    CPU: the vpdpbusd and tile paths) to the bit, for 4-, 5- and 8-bit codes and any row count."""
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("x86-64-v3 is an x86-64 level")
    flags = [f if not f.startswith("-march=") else "-march=x86-64-v3" for f in native.FLAGS]
    avx2 = native.load(native.build(tmp_path / "avx2.so", flags))
    assert avx2.q4_isa == "AVX2" and avx2.amx_min_rows == 0
    n, k = 96, 192
    for bits in (4, 5, 8):
        gen = torch.Generator().manual_seed(bits)
        codes = torch.randint(0, 2**bits, (n, k), generator=gen)
        scale = (torch.rand(n, k // 32, generator=gen) * 0.01 + 1e-3).half().float()
        low = (-torch.rand(n, k // 32, generator=gen) * 0.05).half().float()
        weight = native.Q4Weight.pack(codes, scale, low, bits=bits)
        x = torch.randn(37, k, generator=gen) * 3
        x[4] *= 1000  # a large row: the int8 scale per group differs from its neighbours'
        for rows in (1, 3, 4, 5, 16, 37):
            got, want = avx2.q4_linear(x[:rows].clone(), weight), q4.q4_linear(x[:rows].clone(), weight)
            assert torch.equal(got, want), (bits, rows)


@pytest.mark.parametrize("vocab", [1, 15, 49152, 1000 + 7])
def test_argmax_lse_matches_torch(kernels, vocab):
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(5, vocab, generator=gen) * 8
    x[1, : vocab // 2] = float("-inf")  # a grammar mask
    if vocab > 3:
        x[2, 3] = x[2, vocab - 1] = x[2].max() + 1  # a tie: the first index wins, as torch's argmax
    ids, lse = kernels.argmax_lse(x)
    assert torch.equal(ids, x.argmax(-1))
    torch.testing.assert_close(lse, torch.logsumexp(x, -1), atol=1e-5, rtol=1e-6)


def test_argmax_lse_of_a_masked_row_keeps_finite_logprobs(kernels):
    x = torch.full((1, 40), float("-inf"))
    x[0, 33] = -5.0
    ids, lse = kernels.argmax_lse(x)
    assert ids.item() == 33 and lse.item() == -5.0  # the only allowed token: probability 1


@pytest.mark.parametrize("k", [1, 16, 40])
def test_topk_indices_is_the_set_torch_picks(kernels, k):
    x = torch.randn(7, 49152, generator=torch.Generator().manual_seed(k))
    x[3] = torch.arange(49152, dtype=torch.float32)  # ascending: every value beats the floor
    x[4, 100] = float("nan")
    got = kernels.topk_indices(x, k)
    want = x.nan_to_num(nan=float("-inf")).topk(k, dim=-1).indices
    assert got.shape == (7, k)
    for g, w in zip(got.sort(-1).values, want.sort(-1).values):
        assert torch.equal(g, w)
    with pytest.raises(native.NativeError, match=r"k must be in 1 \.\. min\(256, vocab\)") as err:
        kernels.topk_indices(x, 257)
    assert (err.value.entry, err.value.status, err.value.name) == ("topk_rows", -7, "EMBER_E_TOPK")


def test_greedy_sampler_fast_path_matches_log_softmax(kernels):
    """All-greedy batches without alternatives take argmax_lse: the same tokens and logprobs."""
    from ember.proto import generate_pb2 as pb
    from ember.shard.sampling import BatchSampler, SamplingParams

    params = SamplingParams.from_pb(
        pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0)
    )
    x = torch.randn(6, 3000, generator=torch.Generator().manual_seed(1)) * 5
    fast = BatchSampler([params] * 6, "cpu", 3000)(x, [[1]] * 6, [1] * 6)
    _torch_path()
    slow = BatchSampler([params] * 6, "cpu", 3000)(x, [[1]] * 6, [1] * 6)
    assert fast.next_ids == slow.next_ids == x.argmax(-1).tolist()
    torch.testing.assert_close(torch.tensor(fast.logprobs), torch.tensor(slow.logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rows", [1, 5, 33])
def test_q8_codes_round_trip_and_multiply(q4, rows):
    """8-bit codes (the w4a8 LM head): exact packing, and the kernel off the dequantized matmul by no
    more than the activations' int8 rounding."""
    n, k = 48, 96
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(rows))
    packed = native.Q4Weight.quantize8(weight)
    assert packed.bits == 8 and packed.packed.numel() == n * k
    deq = packed.dequantize()
    assert (deq - weight).abs().max() <= (
        weight.view(n, 3, 32).amax(-1) - weight.view(n, 3, 32).amin(-1)
    ).max() / 510 + 1e-6
    codes = packed.codes()
    assert torch.equal(
        native.Q4Weight.pack(codes, *[t.permute(0, 2, 1).reshape(n, 3) for t in (packed.d, packed.m)], bits=8).packed,
        packed.packed,
    )
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(7))
    got = q4.q4_linear(x, packed)
    ref = x.double() @ deq.double().t()
    step = x.view(rows, k // 32, 32).abs().amax(-1) / 127
    bound = (step.double().repeat_interleave(32, dim=1) / 2) @ deq.abs().double().t()
    assert ((got.double() - ref).abs() <= bound + 1e-4).all()


def test_w4a8_head_is_int8_and_greedy_choices_stay_exact(q4, tiny_llama_dir):
    """The w4a8 LM head multiplies 8-bit codes; each row's 16 best candidates are rescored in float32,
    so the top logits are float32's and only the far tail carries the head's rounding."""
    runner = load_runner(tiny_llama_dir, dtype="float32", quantize="w4a8")
    model = runner.model
    assert model.q8_head is not None and model.fast_head is None and model.packed_head is None
    hidden = torch.randn(6, model.spec.hidden_size, generator=torch.Generator().manual_seed(3))
    got = model.logits(hidden)
    exact = hidden @ model.lm_head.weight.t()
    assert torch.equal(got.argmax(-1), exact.argmax(-1))
    best = exact.topk(4, dim=-1).indices
    torch.testing.assert_close(got.gather(1, best), exact.gather(1, best), atol=1e-5, rtol=1e-5)
    assert (got - exact).abs().max() < 0.05 * exact.std()


# --- the interface: struct layouts, status codes, the path per kind of layer --------------------------


def test_struct_mirrors_match_the_library(kernels):
    for mirror in native.MIRRORS:
        native.check_layout(kernels.lib, mirror)  # raises on any difference
    assert ctypes.sizeof(native.DecodeLayer) == kernels.lib.ember_layout(b"ember_decode_layer", None)
    assert native.DecodeStep.threads.offset == kernels.lib.ember_layout(b"ember_decode_step", b"threads")


def test_a_struct_mismatch_is_refused_with_a_clear_error(kernels, monkeypatch, caplog):
    class Short(ctypes.Structure):  # a field missing: a different size
        c_type = "ember_decode_step"
        _fields_ = native.DecodeStep._fields_[:-1]

    with pytest.raises(
        native.NativeError,
        match=r"ember_decode_step is \d+ bytes in the library but \d+ in "
        r"native.Short",
    ):
        native.check_layout(kernels.lib, Short)

    class Swapped(ctypes.Structure):  # same size, two fields in the other order
        c_type = "ember_decode_layer"
        _fields_ = [native.DecodeLayer._fields_[1], native.DecodeLayer._fields_[0], *native.DecodeLayer._fields_[2:]]

    with pytest.raises(native.NativeError, match="ember_decode_layer has fields .* in the library but"):
        native.check_layout(kernels.lib, Swapped)

    class Unknown(ctypes.Structure):
        c_type = "ember_nothing"
        _fields_ = [("x", ctypes.c_int)]

    with pytest.raises(native.NativeError, match="declares no struct ember_nothing"):
        native.check_layout(kernels.lib, Unknown)

    # Loading refuses the library, and the shard keeps its torch paths, saying why.
    monkeypatch.setattr(native, "MIRRORS", (native.LinearWeights, native.DecodeLayer, Short))
    with pytest.raises(native.NativeError, match="bytes in the library"):
        native.load(kernels.path)
    native.reset_for_tests(False)
    with caplog.at_level(logging.WARNING, logger="ember.shard.native"):
        assert native.kernels() is None
    assert "CPU kernels unavailable" in caplog.text and "ember_decode_step" in caplog.text
    assert "ember_decode_step" in native.unavailable_reason()


def test_status_codes_name_the_check_that_failed(kernels):
    names = {status: kernels.lib.ember_status_name(status) for status in range(0, -11, -1)}
    assert all(names.values()) and len(set(names.values())) == len(names)  # every code named, once
    assert kernels.lib.ember_status_name(-99) is None
    err = kernels.error("q4_linear", -4, "x (1, 32)")
    assert isinstance(err, native.NativeError) and isinstance(err, RuntimeError)
    assert str(err) == "q4_linear failed: codes must be 4, 5 or 8 bits wide (EMBER_E_BITS) [x (1, 32)]"
    assert (err.entry, err.status, err.name) == ("q4_linear", -4, "EMBER_E_BITS")
    assert "does not name" in str(kernels.error("q4_linear", -99))


def test_kernels_raise_the_named_error(q4):
    import dataclasses

    weight = native.Q4Weight.pack(*_q4_codes(16, 32))
    with pytest.raises(native.NativeError, match=r"codes must be 4, 5 or 8 bits wide \(EMBER_E_BITS\)"):
        q4.q4_linear(torch.randn(2, 32), dataclasses.replace(weight, bits=6))
    # decode_layers through its struct: widths the int8 groups cannot split are refused before any work.
    step = native.DecodeStep(num_layers=0, hidden=48, heads=1, kv_heads=1, head_dim=64, inter=64)
    with pytest.raises(native.NativeError, match="multiples of 32 \\(EMBER_E_LAYER_WIDTHS\\)") as err:
        q4.decode_layers(step)
    assert err.value.entry == "decode_layers"


def test_every_entry_point_is_declared_and_typed(kernels):
    for name, params in native.ENTRY_POINTS.items():
        fn = getattr(kernels, f"_{name}")
        assert fn.argtypes == [kind for _, kind in params] and fn.restype is ctypes.c_int
    assert not hasattr(kernels.lib, "ember_native_version")  # gone: nothing read it


def test_the_cache_key_covers_every_source_and_header(tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "kernels"
    shutil.copytree(native.KERNELS_DIR, copy)
    monkeypatch.setattr(native, "KERNELS_DIR", copy)
    assert [p.name for p in native.sources()] == sorted(p.name for p in copy.glob("*.c"))
    before = native.library_path(tmp_path)
    (copy / "ember.h").write_text((copy / "ember.h").read_text() + "\n/* changed */\n")
    assert native.library_path(tmp_path) != before


def _paths(runner) -> dict[str, tuple[str, str]]:
    paths = runner.model.kernel_paths(runner.cache.k[0].dtype)
    assert [kind for kind, _, _ in paths] == [
        "decoder linears",
        "fused step",
        "attention",
        "norm, rotary, silu*mul",
        "lm head",
    ]
    return {kind: (path, why) for kind, path, why in paths}


def test_paths_under_float32(kernels, tiny_llama_dir, caplog):
    with caplog.at_level(logging.INFO, logger="ember.shard.models.llama"):
        runner = load_runner(tiny_llama_dir, dtype="float32")
    paths = _paths(runner)
    for kind, (path, why) in paths.items():  # logged at load, one line per kind
        assert f"{kind}: {path} (why: {why})" in caplog.text
    from ember.shard.layers import OneDNNWeight

    if OneDNNWeight.usable(torch.device("cpu"), torch.float32):
        assert paths["decoder linears"][0] == "oneDNN, float32 weights in its blocked layout"
    assert paths["fused step"][0].startswith("none") and "w4a8 or bf16" in paths["fused step"][1]
    assert paths["attention"][0].startswith("decode: Ember's paged kernel")
    assert paths["norm, rotary, silu*mul"][0].startswith("Ember's C kernels")
    assert paths["lm head"] == ("torch F.linear, float32 weights", "matmuls in the model's dtype")


def test_paths_without_the_kernels(tiny_llama_dir):
    native.reset_for_tests(None)
    try:
        paths = _paths(load_runner(tiny_llama_dir, dtype="float32"))
    finally:
        native.reset_for_tests(False)
    assert "unavailable" in paths["fused step"][1]
    assert paths["attention"][0] == "decode: blocks gathered, torch SDPA; prefill: torch SDPA"
    assert paths["norm, rotary, silu*mul"][0] == "torch ops"


def test_paths_under_bf16_matmuls(kernels, tiny_llama_dir):
    if not kernels.bf16 or not kernels.q4:
        pytest.skip("this CPU has no AVX-512 BF16 (and VNNI): bf16 weights take oneDNN, op by op")
    paths = _paths(load_runner(tiny_llama_dir, dtype="float32", matmul_dtype="bfloat16"))
    assert paths["decoder linears"][0] == "bf16 weights on Ember's AVX-512 BF16 kernel (float32 sums)"
    assert paths["fused step"][0].startswith("2 layers in one C call (decode_layers, bf16 weights)")
    assert "KV cache in bfloat16" in paths["attention"][1]
    assert paths["lm head"][0] == (
        "bf16 weights on Ember's AVX-512 BF16 kernel (float32 sums); each row's top 16 (topk_rows) rescored in float32"
    )


def test_paths_under_w4a8(q4, tiny_llama_dir):
    paths = _paths(load_runner(tiny_llama_dir, dtype="float32", quantize="w4a8"))
    isa = q4.q4_isa
    assert isa in ("AVX-512 VNNI", "AVX2")
    assert paths["decoder linears"] == (
        f"w4a8: int4 codes x int8 activations on Ember's int8 kernel ({isa})",
        f"--quantize w4a8 on a CPU with {isa}",
    )
    assert paths["fused step"][0].startswith("2 layers in one C call (decode_layers, w4a8)")
    head = f"8-bit codes per 32 inputs on Ember's int8 kernel ({isa}); each row's top 16"
    assert paths["lm head"][0].startswith(head)
    assert paths["lm head"][0].endswith("rescored in float32")


def test_on_an_amx_cpu_bf16_weights_keep_onednn(kernels, tiny_llama_dir, monkeypatch):
    """Where the CPU has AMX, oneDNN's AMX tiles are the fastest bf16 path: the weights keep its layout, decode
    steps run op by op, and the load log says why."""
    from ember.shard.layers import OneDNNWeight
    from ember.shard.runner import load_runner

    if not kernels.bf16:
        pytest.skip("this CPU has no AVX-512 BF16: bf16 weights take oneDNN anyway")
    native.prefer_bf16_kernel(None)
    monkeypatch.setattr(native, "cpu_has_amx", lambda: True)
    assert "AMX" in native.bf16_kernel_problem()
    runner = load_runner(tiny_llama_dir, dtype="float32", matmul_dtype="bfloat16")
    assert isinstance(runner.model.layers[0].attn.qkv.weight, OneDNNWeight)
    assert runner.model.fused is None
    paths = {kind: (path, why) for kind, path, why in runner.model.kernel_paths(torch.bfloat16)}
    assert "oneDNN" in paths["decoder linears"][0] and "AMX" in paths["decoder linears"][1]
    monkeypatch.setattr(native, "cpu_has_amx", lambda: False)
    assert native.bf16_kernel_problem() is None
    runner = load_runner(tiny_llama_dir, dtype="float32", matmul_dtype="bfloat16")
    assert isinstance(runner.model.layers[0].attn.qkv.weight, native.BF16Weight)
