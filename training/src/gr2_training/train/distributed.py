"""torchrun support: process-group setup from the environment, data sharding, reductions.

``torchrun --nproc_per_node N gr2-train ...`` sets WORLD_SIZE, RANK and LOCAL_RANK; with
WORLD_SIZE > 1 each process joins a process group (gloo on CPU, nccl on CUDA), trains its
shard of every global batch, and only rank 0 writes checkpoints, metrics and progress.
Without those variables (or WORLD_SIZE = 1) everything runs in one process, no group.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. ``device`` is the torch device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (or ``cuda:N``) or ``auto`` (CUDA when available)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or auto, got {name!r}")
    return device


def init_distributed(device_name: str) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1; pick this process's device."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    device = resolve_device(device_name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local_rank, local_world, device)


def shutdown(info: DistInfo) -> None:
    """Leave the process group (if one was joined)."""
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in a single process)."""
    if info.distributed:
        dist.barrier()


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's share of a global batch: items rank, rank + W, rank + 2W, ...

    The shards of all ranks are disjoint and together are ``items``; with len(items) a
    multiple of W they have equal sizes (every rank runs the same number of examples).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    return list(items[rank::world_size])


def mean_over_ranks(values: Mapping[str, float], info: DistInfo) -> dict[str, float]:
    """Average scalar metrics over ranks (all ranks must call it together)."""
    if not info.distributed or not values:
        return dict(values)
    names = sorted(values)
    backend_device = info.device if info.device.type == "cuda" else torch.device("cpu")
    packed = torch.tensor([values[n] for n in names], dtype=torch.float64, device=backend_device)
    dist.all_reduce(packed)
    return {n: float(v) / info.world_size for n, v in zip(names, packed.tolist(), strict=True)}


def sum_over_ranks_(tensor: torch.Tensor, info: DistInfo) -> None:
    """Sum ``tensor`` over ranks, in place (all ranks must call it together)."""
    if info.distributed:
        dist.all_reduce(tensor)


def broadcast_(tensor: torch.Tensor, info: DistInfo) -> None:
    """Overwrite ``tensor`` with rank 0's copy (in place; no-op in a single process)."""
    if info.distributed:
        dist.broadcast(tensor, src=0)
