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


def write_tiny_gguf(path: Path, quant: str | None = None, seed: int = 0, vocab_multiple: int = 1) -> None:
    """A 2-layer llama GGUF with tied embeddings, F32 tensors and a ChatML-style tokenizer; with `quant`
    (`Q4_0`, `Q8_0`, ...: a type the `gguf` package quantizes) its matrices in that type, norms in F32.
    `vocab_multiple`: unused control tokens pad the vocabulary to a multiple of it."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w"]
    tokens = specials + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in merges]
    extra = [f"<|unused{i}|>" for i in range(-len(tokens) % vocab_multiple)]
    tokens += extra
    vocab, hidden, layers, heads, kv_heads, inter = len(tokens), 32, 2, 4, 2, 64
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

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    def matrix(name: str, rows: int, cols: int) -> None:
        values = weight(rows, cols)
        if quant is None:
            writer.add_tensor(name, values)
            return
        qtype = gguf.GGMLQuantizationType[quant]
        if quant in QUANTIZABLE:
            blocks = gguf.quants.quantize(values, qtype)
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
