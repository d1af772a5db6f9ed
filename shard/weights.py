"""Weight readers that give each tensor-parallel rank only its slice.

A rank never materialises the whole model: `get_sharded` reads this rank's rows
or columns through `safe_open(...).get_slice`, so memory per rank shrinks with N.

A directory converted from a GGUF for Ember's own model code holds the GGUF itself
(`model.gguf`, a hard link) instead of safetensors (`ember.store`): `GGUFTensors` maps
its tensor names to Hugging Face's and, where the layers take them (`codes_sharded`),
hands over quantized tensors as the codes Ember's packed kernel multiplies
(`gguf_blocks`), sliced for the rank, with no float copy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ember.shard import gguf_blocks
from ember.sharding import PAGED_MODEL_TYPES, sharding_problem
from ember.store import GGUF_FILE

INDEX_FILE = "model.safetensors.index.json"


class TensorParallelError(ValueError):
    """The model cannot be split over the requested number of ranks."""


def check_tp_divisible(config: dict, world_size: int) -> None:
    """Refuse at start, naming the numbers, when heads or KV heads don't divide by world size."""
    problem = sharding_problem(config, world_size) if config.get("model_type") in PAGED_MODEL_TYPES else None
    if problem:
        raise TensorParallelError(problem)


def _tensor_files(path: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it (index json or all files)."""
    index = path / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    mapping: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                mapping[name] = file
    return mapping


class Weights:
    """Named tensors of one model directory, cast to `dtype` on `device`, sliced for `rank`."""

    def __init__(
        self,
        path: str | Path,
        dtype: torch.dtype,
        device: torch.device | str,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.path = Path(path)
        self.dtype = dtype
        self.device = torch.device(device)
        self.rank = rank
        self.world_size = world_size
        config_file = self.path / "config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        check_tp_divisible(config, world_size)
        self.gguf = GGUFTensors(self.path / GGUF_FILE, config) if (self.path / GGUF_FILE).is_file() else None
        self._files = {} if self.gguf is not None else _tensor_files(self.path)
        self._handles: dict[Path, object] = {}
        # Set by the loader when the layers take quantized tensors as codes (w4a8 on Ember's kernel).
        self.keep_codes = False

    def has(self, name: str) -> bool:
        return self.gguf.has(name) if self.gguf is not None else name in self._files

    def serves_codes(self, name: str) -> bool:
        """Whether `codes_sharded(name)` gives this tensor as codes: a quantized GGUF tensor, kept so."""
        return self.keep_codes and self.gguf is not None and self.gguf.quantized(name)

    def codes_sharded(self, name: str, dim: int, allow_padding: bool = False) -> gguf_blocks.Codes:
        """This rank's part of a quantized GGUF tensor along `dim`, as codes (see `get_sharded`)."""
        return self.gguf.codes(name, *self._part(name, dim, allow_padding))

    def _handle(self, name: str):
        if name not in self._files:
            raise KeyError(f"tensor {name!r} not found in {self.path}")
        file = self._files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file]

    def _finish(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        if t.is_floating_point():
            t = t.to(dtype or self.dtype)
        return t.to(self.device).contiguous()

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole tensor (for norms and anything replicated on every rank); floats in `dtype`
        (default: the model's)."""
        if self.gguf is not None:
            return self._finish(self.gguf.tensor(name), dtype)
        return self._finish(self._handle(name).get_tensor(name), dtype)

    def shape(self, name: str) -> list[int]:
        if self.gguf is not None:
            return self.gguf.shape(name)
        return list(self._handle(name).get_slice(name).get_shape())

    def _part(self, name: str, dim: int, allow_padding: bool) -> tuple[int, int, int, int]:
        """(dim, start, stop, part): this rank's range along `dim` and the size every rank's part has."""
        shape = self.shape(name)
        dim = dim % len(shape)
        size = shape[dim]
        if size % self.world_size and not allow_padding:
            raise TensorParallelError(
                f"{name}: dimension {dim} of size {size} is not divisible by world size {self.world_size}"
            )
        part = math.ceil(size / self.world_size)
        start = min(self.rank * part, size)
        return dim, start, min(start + part, size), part

    def get_sharded(self, name: str, dim: int, allow_padding: bool = False) -> torch.Tensor:
        """This rank's contiguous 1/world_size part along `dim`, read without loading the rest.

        With `allow_padding` (vocabularies) a size that does not divide is split in
        ceil(size/N) parts and the last rank's part is zero-padded to that size.
        """
        dim, start, stop, part = self._part(name, dim, allow_padding)
        if self.gguf is not None:
            t = self.gguf.tensor(name, dim, start, stop)
        else:
            sl = self._handle(name).get_slice(name)
            t = sl[tuple(slice(start, stop) if d == dim else slice(None) for d in range(len(sl.get_shape())))]
        if stop - start < part:
            pad_shape = list(t.shape)
            pad_shape[dim] = part - (stop - start)
            t = torch.cat([t, torch.zeros(pad_shape, dtype=t.dtype)], dim=dim)
        return self._finish(t)


# Hugging Face's names of a Llama-family decoder layer's tensors -> GGUF's (`blk.N.` + these).
_LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# Gemma 3's (the `gguf` package's gemma3 table): per-head query and key norms, and four norms per layer.
# Its `post_attention_layernorm` normalizes the attention's output (llama.cpp's `post_attention_norm`),
# where Llama's is the norm before the MLP (`ffn_norm`, Gemma's `pre_feedforward_layernorm`).
_GEMMA3_LAYER_TENSORS = {
    **{hf: gguf for hf, gguf in _LAYER_TENSORS.items() if hf != "post_attention_layernorm"},
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
_ARCH_LAYER_TENSORS = {"gemma3": _GEMMA3_LAYER_TENSORS}
_MODEL_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# llama.cpp stores these architectures' query and key rows interleaved per head for its rotary layout.
_PERMUTED_ARCHS = ("llama", "mistral")
# llama.cpp's converter stores these architectures' RMSNorm weights as 1 + w (Gemma's norms scale by 1 + w,
# llama.cpp's by the weight): every `*norm.weight`, the per-head query and key norms included. Read back
# as Hugging Face's w, as transformers' GGUF loader does.
_NORM_PLUS_ONE_ARCHS = ("gemma3",)


def _layer_tensors(arch: str) -> dict[str, str]:
    return _ARCH_LAYER_TENSORS.get(arch, _LAYER_TENSORS)


def gguf_name(name: str, arch: str = "llama") -> str | None:
    """GGUF's name of a Hugging Face tensor name of `arch`'s decoder (None: not one Ember reads)."""
    stem, dot, kind = name.rpartition(".")
    if not dot or kind not in ("weight", "bias"):
        return None
    if stem in _MODEL_TENSORS:
        return f"{_MODEL_TENSORS[stem]}.{kind}"
    layer_tensors = _layer_tensors(arch)
    parts = stem.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in layer_tensors:
        return f"blk.{parts[2]}.{layer_tensors[parts[3]]}.{kind}"
    return None


_HF_MODEL = {gguf: hf for hf, gguf in _MODEL_TENSORS.items()}


def hf_name(name: str, arch: str = "llama") -> str | None:
    """Hugging Face's name of a GGUF tensor name of `arch` (None: not one Ember reads)."""
    stem, dot, kind = name.rpartition(".")
    if not dot or kind not in ("weight", "bias"):
        return None
    if stem in _HF_MODEL:
        return f"{_HF_MODEL[stem]}.{kind}"
    hf_layer = {gguf: hf for hf, gguf in _layer_tensors(arch).items()}
    parts = stem.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in hf_layer:
        return f"model.layers.{parts[1]}.{hf_layer[parts[2]]}.{kind}"
    return None


class GGUFTensors:
    """A GGUF's tensors under Hugging Face's names (Llama family, Gemma 3), memory-mapped, each read when asked.

    Quantized tensors come out as codes (`codes`) or, where a layer wants floats, dequantized
    (`tensor`); query and key rows are put back in Hugging Face's order for architectures whose
    converter interleaved them, and Gemma's norm weights stored as 1 + w come out as w. A tensor type
    Ember cannot run is refused by name when the file is opened.
    """

    def __init__(self, path: Path, config: dict) -> None:
        from gguf import GGUFReader

        self.path = path
        self.reader = GGUFReader(path)
        arch = self.reader.get_field("general.architecture")
        self.arch = arch.contents() if arch is not None else ""
        self.tensors = {}
        for tensor in self.reader.tensors:
            self.tensors[tensor.name] = tensor
            problem = gguf_blocks.unsupported(tensor.tensor_type.name)
            if problem:
                raise gguf_blocks.UnsupportedQuant(f"{path}: tensor {tensor.name}: {problem}")
        heads = config.get("num_attention_heads", 0)
        self.heads = {"attn_q": heads, "attn_k": config.get("num_key_value_heads") or heads}

    def _tensor(self, name: str):
        found = gguf_name(name, self.arch)
        if found is None or found not in self.tensors:
            raise KeyError(f"tensor {name!r} not found in {self.path}")
        return self.tensors[found]

    def has(self, name: str) -> bool:
        found = gguf_name(name, self.arch)
        return found is not None and found in self.tensors

    def shape(self, name: str) -> list[int]:
        return [int(n) for n in reversed(self._tensor(name).shape)]  # GGUF lists the fastest dimension first

    def quantized(self, name: str) -> bool:
        return self.has(name) and self._tensor(name).tensor_type.name in gguf_blocks.LAYOUTS

    def _rows(self, name: str) -> torch.Tensor:
        """The tensor's rows as stored (uint8 blocks or floats), in Hugging Face's row order."""
        tensor = self._tensor(name)
        shape = self.shape(name)
        data = torch.from_numpy(np.array(tensor.data).reshape(shape[0], -1))  # a copy: the map is read-only
        kind = tensor.name.split(".")[-2]
        if self.arch in _PERMUTED_ARCHS and kind in self.heads and self.heads[kind]:
            data = data[_unpermute(shape[0], self.heads[kind])]
        return data

    def _blocks(self, name: str, dim: int, start: int, stop: int | None):
        """(type, raw blocks, shape) of the quantized tensor's rows or columns [start, stop) along `dim`."""
        type_name = self._tensor(name).tensor_type.name
        rows, cols = self.shape(name)
        stop = (rows if dim == 0 else cols) if stop is None else stop
        data = self._rows(name)
        elements, block_bytes, _ = gguf_blocks.LAYOUTS[type_name]
        if dim == 0:
            return type_name, data[start:stop].contiguous(), (stop - start, cols)
        if start % elements or stop % elements:
            raise TensorParallelError(
                f"{name}: columns {start}..{stop} of a {type_name} tensor do not fall on its "
                f"{elements}-input blocks; choose another --num-shard"
            )
        data = data[:, start // elements * block_bytes : stop // elements * block_bytes]
        return type_name, data.contiguous(), (rows, stop - start)

    def codes(self, name: str, dim: int = 0, start: int = 0, stop: int | None = None, part: int = 0):
        """The quantized tensor's rows or columns [start, stop) along `dim` as codes, zero rows padding
        it to `part` rows (a vocabulary split over ranks)."""
        type_name, data, shape = self._blocks(name, dim, start, stop)
        codes = gguf_blocks.decode(type_name, data, shape)
        if dim == 0 and part > shape[0]:
            codes = codes.padded(part)
        return codes

    def tensor(self, name: str, dim: int = 0, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The tensor (or its part along `dim`) as floats: its own dtype, or dequantized exactly."""
        if self.quantized(name):
            data = gguf_blocks.dequantize(*self._blocks(name, dim, start, stop))
        else:
            data = self._rows(name).reshape(self.shape(name))  # already a copy of the file's bytes
            data = data if stop is None else data.narrow(dim, start, stop - start).clone()
        if self.arch in _NORM_PLUS_ONE_ARCHS and name.endswith("norm.weight"):
            data = data.float() - 1.0  # exact for stored values in [0.5, 2] (Sterbenz)
        return data


def _unpermute(rows: int, heads: int) -> torch.Tensor:
    """Row order taking llama.cpp's interleaved query/key rows back to Hugging Face's: within each head,
    llama.cpp stores rotary pair halves side by side (row 2i + s holds Hugging Face's row s·d/2 + i)."""
    head_dim = rows // heads
    return torch.arange(rows).view(heads, head_dim // 2, 2).transpose(1, 2).reshape(-1)
