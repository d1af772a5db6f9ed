"""Tensor-parallel process group of one shard, and the two collectives the layers use.

At world size 1 nothing is initialised: the group is trivial and the collectives
return their input, so a single-rank shard pays nothing for being TP-ready.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist

log = logging.getLogger(__name__)


@dataclass
class Group:
    """This rank's place in the tensor-parallel group (`pg` is None at world size 1)."""

    rank: int = 0
    world_size: int = 1
    pg: object | None = None

    @property
    def is_trivial(self) -> bool:
        return self.world_size == 1


TRIVIAL_GROUP = Group()


def init_distributed(
    rank: int,
    world_size: int,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
    device: torch.device | str = "cpu",
    timeout_s: float = 120.0,
) -> Group:
    """Join the TP group: gloo on CPU, nccl on CUDA; no torch.distributed at world size 1."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if world_size == 1:
        return Group(rank=0, world_size=1, pg=None)
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    log.info("rank %d/%d joined the %s process group", rank, world_size, backend)
    return Group(rank=rank, world_size=world_size, pg=torch_dist.group.WORLD)


def all_reduce(t: torch.Tensor, group: Group, op: str = "sum") -> torch.Tensor:
    """Sum (or min/max) `t` in place across ranks; a no-op at world size 1."""
    if group.is_trivial:
        return t
    reduce_op = {"sum": torch_dist.ReduceOp.SUM, "min": torch_dist.ReduceOp.MIN, "max": torch_dist.ReduceOp.MAX}[op]
    torch_dist.all_reduce(t, op=reduce_op, group=group.pg)
    return t


def all_gather(t: torch.Tensor, group: Group, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `t` along `dim` (same shape on every rank); identity at world size 1."""
    if group.is_trivial:
        return t
    parts = [torch.empty_like(t) for _ in range(group.world_size)]
    torch_dist.all_gather(parts, t.contiguous(), group=group.pg)
    return torch.cat(parts, dim=dim)
