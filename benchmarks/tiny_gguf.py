"""A tiny llama GGUF written with the `gguf` package: for the store's and the shard's tests and the memory
benchmark (benchmarks/memory.py).

    write_tiny_gguf(path)                      # float32 tensors
    write_tiny_gguf(path, "Q4_1")              # its matrices in Q4_1, norms in F32
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
"""The block types the `gguf` package's own quantizer writes."""


K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
"""The super-block types written by this module's own encoders (`k_quantize`): the package only reads them."""


def random_blocks(
    type_name: str, rows: int, cols: int, rng: np.random.Generator, weight_std: float, scale_range: tuple[float, float]
) -> np.ndarray:
    """Blocks of `type_name` for a rows x cols tensor, uint8 [blocks, block bytes]: the `gguf` package's
    quantization of normal weights for the types it writes; random code bytes with finite float16 scales
    drawn from `scale_range` for the K types."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name in QUANTIZABLE:
        return gguf.quants.quantize(rng.normal(0, weight_std, (rows, cols)).astype(np.float32), qtype)
    elements, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // elements, block_bytes), dtype=np.uint8)
    scales = rng.uniform(*scale_range, (raw.shape[0], 2)).astype(np.float16).view(np.uint8)
    if type_name == "Q6_K":
        raw[:, 208:210] = scales[:, :2]  # d
    else:
        raw[:, 0:4] = scales  # d and dmin
    return raw


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _k_scales(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per super-block into its 12 bytes (llama.cpp's K-quant packing)."""
    out = np.zeros((scales.shape[0], 12), np.uint8)
    out[:, 0:4] = (scales[:, :4] & 63) | ((scales[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mins[:, :4] & 63) | ((mins[:, 4:] >> 4) << 6)
    out[:, 8:12] = (scales[:, 4:] & 15) | ((mins[:, 4:] & 15) << 4)
    return out


def k_quantize(values: np.ndarray, type_name: str) -> np.ndarray:
    """`values` [rows, cols] (cols a multiple of 256) as Q4_K, Q5_K or Q6_K blocks [rows, bytes]: a plain
    round-to-nearest encoder for tests (llama.cpp's searches for better scales), checked against the
    `gguf` package's own decoder by the tests."""
    rows, cols = values.shape
    w = values.astype(np.float32).reshape(-1, 256)
    n = w.shape[0]
    if type_name == "Q6_K":
        sub = w.reshape(n, 16, 16)
        step = np.abs(sub).max(-1) / 31  # per 16 inputs: q - 32 in -32..31
        d = np.maximum(step.max(-1), 1e-12) / 127
        d = d.astype(np.float16).astype(np.float32)
        sc = np.clip(np.round(step / d[:, None]), 1, 127).astype(np.int8)
        q = np.clip(np.round(sub / (d[:, None, None] * sc[..., None])), -32, 31).astype(np.int16) + 32
        q = q.reshape(n, 2, 4, 32).astype(np.uint8)  # [block, half, i, l]: input 128 h + 32 i + l
        low = q & 15  # byte l (+ 32) of a half: input 32 i + l's low bits, i = 0 (1) low nibble, 2 (3) high
        ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], -1)
        high = q >> 4
        qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
        blocks = np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), _f16_bytes(d)], -1)
        return blocks.reshape(rows, -1)
    top = 15 if type_name == "Q4_K" else 31
    sub = w.reshape(n, 8, 32)
    lows = np.maximum(-sub.min(-1), 0)  # w = d·sc·q - dmin·m, m ≥ 0
    steps = np.maximum((sub.max(-1) + lows) / top, 1e-12)
    d = (steps.max(-1) / 63).astype(np.float16).astype(np.float32)
    dmin = np.maximum(lows.max(-1) / 63, 1e-12).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(steps / d[:, None]), 1, 63).astype(np.uint8)
    mn = np.clip(np.round(lows / dmin[:, None]), 0, 63).astype(np.uint8)
    scale = d[:, None, None] * sc[..., None]
    q = np.clip(np.round((sub + (dmin[:, None] * mn)[..., None]) / scale), 0, top).astype(np.uint8)
    runs = q.reshape(n, 4, 2, 32)  # sub-blocks 2r (low nibbles) and 2r + 1 (high) of run r
    qs = ((runs[:, :, 0] & 15) | ((runs[:, :, 1] & 15) << 4)).reshape(n, 128)
    parts = [_f16_bytes(d), _f16_bytes(dmin), _k_scales(sc, mn)]
    if type_name == "Q5_K":  # bit j of byte l: the fifth bit of input l of sub-block j
        fifth = (q >> 4) & 1  # [block, sub-block, l]
        parts.append(sum(fifth[:, j, :] << j for j in range(8)).astype(np.uint8))
    blocks = np.concatenate([*parts, qs], -1)
    return blocks.reshape(rows, -1)


def write_tiny_gguf(
    path: Path, quant: str | None = None, seed: int = 0, vocab_multiple: int = 1, hidden: int = 32
) -> None:
    """A 2-layer llama GGUF with tied embeddings, F32 tensors and a ChatML-style tokenizer; with `quant`
    (`Q4_0`, `Q8_0`, ...: a type the `gguf` package quantizes, or one of `K_QUANTS`) its matrices in that
    type, norms in F32. `vocab_multiple`: unused control tokens pad the vocabulary to a multiple of it.
    `hidden`: the model width (256 for the K types: their blocks span 256 inputs)."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w"]
    tokens = specials + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in merges]
    extra = [f"<|unused{i}|>" for i in range(-len(tokens) % vocab_multiple)]
    tokens += extra
    vocab, layers, heads, kv_heads, inter = len(tokens), 2, 4, 2, 2 * hidden
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(inter)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(100000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials) - len(extra)) + [3] * len(extra))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)

    scale = 0.2 * (32 / hidden) ** 0.5  # each layer's gain about the same at any width

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def matrix(name: str, rows: int, cols: int) -> None:
        values = weight(rows, cols)
        if quant is None:
            writer.add_tensor(name, values)
            return
        qtype = gguf.GGMLQuantizationType[quant]
        if quant in QUANTIZABLE:
            blocks = gguf.quants.quantize(values, qtype)
        elif quant in K_QUANTS:
            blocks = k_quantize(values, quant)
        else:  # a type the package cannot write: random bytes of its size (for refusals only)
            elements, size = gguf.GGML_QUANT_SIZES[qtype]
            blocks = rng.integers(0, 256, (rows, cols // elements * size), dtype=np.uint8)
        writer.add_tensor(name, blocks, raw_dtype=qtype)

    matrix("token_embd.weight", vocab, hidden)
    for block in range(layers):
        prefix = f"blk.{block}."
        writer.add_tensor(prefix + "attn_norm.weight", 1 + weight(hidden))
        matrix(prefix + "attn_q.weight", heads * head_dim, hidden)
        matrix(prefix + "attn_k.weight", kv_heads * head_dim, hidden)
        matrix(prefix + "attn_v.weight", kv_heads * head_dim, hidden)
        matrix(prefix + "attn_output.weight", hidden, heads * head_dim)
        writer.add_tensor(prefix + "ffn_norm.weight", 1 + weight(hidden))
        matrix(prefix + "ffn_gate.weight", inter, hidden)
        matrix(prefix + "ffn_up.weight", inter, hidden)
        matrix(prefix + "ffn_down.weight", hidden, inter)
    writer.add_tensor("output_norm.weight", 1 + weight(hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
