"""Safetensors reader that gives each tensor-parallel rank only its slice.

A rank never materialises the whole model: `get_sharded` reads this rank's rows
or columns through `safe_open(...).get_slice`, so memory per rank shrinks with N.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from ember.sharding import PAGED_MODEL_TYPES, sharding_problem

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
        if config_file.exists():
            check_tp_divisible(json.loads(config_file.read_text()), world_size)
        self._files = _tensor_files(self.path)
        self._handles: dict[Path, object] = {}

    def has(self, name: str) -> bool:
        return name in self._files

    def _handle(self, name: str):
        if name not in self._files:
            raise KeyError(f"tensor {name!r} not found in {self.path}")
        file = self._files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file]

    def _finish(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            t = t.to(self.dtype)
        return t.to(self.device).contiguous()

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor (for norms and anything replicated on every rank)."""
        return self._finish(self._handle(name).get_tensor(name))

    def shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())

    def get_sharded(self, name: str, dim: int, allow_padding: bool = False) -> torch.Tensor:
        """This rank's contiguous 1/world_size part along `dim`, read without loading the rest.

        With `allow_padding` (vocabularies) a size that does not divide is split in
        ceil(size/N) parts and the last rank's part is zero-padded to that size.
        """
        sl = self._handle(name).get_slice(name)
        shape = list(sl.get_shape())
        dim = dim % len(shape)
        size = shape[dim]
        if size % self.world_size and not allow_padding:
            raise TensorParallelError(
                f"{name}: dimension {dim} of size {size} is not divisible by world size {self.world_size}"
            )
        part = math.ceil(size / self.world_size)
        start = min(self.rank * part, size)
        stop = min(start + part, size)
        index = tuple(slice(start, stop) if d == dim else slice(None) for d in range(len(shape)))
        t = sl[index]
        if stop - start < part:
            pad_shape = list(t.shape)
            pad_shape[dim] = part - (stop - start)
            t = torch.cat([t, torch.zeros(pad_shape, dtype=t.dtype)], dim=dim)
        return self._finish(t)
