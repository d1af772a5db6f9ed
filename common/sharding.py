"""Whether a model can be split over N tensor-parallel ranks (pure Python: the launcher checks before spawning)."""

from __future__ import annotations

# Model types with Ember's own tensor-parallel model code; others take the generic path (one rank).
# `gemma3` is Gemma 3's multimodal checkpoint (its text model's config nested in `text_config`): the text
# model is served, the vision tower left unread.
PAGED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "gemma3_text", "gemma3"})


def text_config(config: dict) -> dict:
    """The text model's config: `text_config` where a multimodal config nests it (Gemma 3), else `config`."""
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) else config


def sharding_problem(config: dict, world_size: int) -> str | None:
    """Why `config` cannot run on `world_size` ranks, naming the numbers; None when it can."""
    if world_size == 1:
        return None
    model_type = config.get("model_type", "")
    if model_type not in PAGED_MODEL_TYPES:
        return (
            f"model_type {model_type!r} runs on the generic transformers path, which supports one shard "
            f"only (tensor parallel size 1), but --num-shard is {world_size}"
        )
    text = text_config(config)
    heads = text.get("num_attention_heads")
    kv_heads = text.get("num_key_value_heads") or heads
    if heads is not None and heads % world_size:
        return (
            f"num_attention_heads={heads} is not divisible by --num-shard {world_size} "
            f"(num_key_value_heads={kv_heads}); choose a --num-shard that divides both"
        )
    if kv_heads is not None and kv_heads % world_size:
        return (
            f"num_key_value_heads={kv_heads} is not divisible by --num-shard {world_size} "
            f"(num_attention_heads={heads}); choose a --num-shard that divides both"
        )
    return None
