"""Data-parallel training across processes: the process group and its few collectives.

A process learns its place from the environment that ``torchrun``
(``torch.distributed.run``) sets: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` (under SLURM, ``srun`` starts one ``torchrun``
per node, or a job script exports the same five names per task). Without them the
world is one process and every helper here is a no-op, so the single-process path
is unchanged.

The backend is NCCL on CUDA and gloo on the CPU. Every collective waits at most
``train.dist_timeout_s`` seconds: a rank that dies leaves the others with an
error after that time instead of a hang (under ``torchrun`` the elastic agent
ends them sooner, as soon as it sees the dead rank).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fcn_pipeline.errors import ConfigError

# Set by torchrun in every worker it starts; their absence means "not launched yet".
LAUNCHED_ENV = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "WORLD_SIZE")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                message = f"environment variable {name}={value!r} is not an integer"
                raise ConfigError(message) from None
    return default


def world_from_env() -> World:
    """The world that the launcher (torchrun) describes; one process without one."""
    size = _env_int(("WORLD_SIZE",), 1)
    rank = _env_int(("RANK",), 0)
    local_rank = _env_int(("LOCAL_RANK",), 0)
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"rank {rank} is outside a world of size {size} (RANK, WORLD_SIZE)")
    return World(rank, size, local_rank)


def under_launcher() -> bool:
    """Whether a launcher (torchrun, a job script) started this process as one rank of
    several, so it must not launch torchrun itself."""
    return any(name in os.environ for name in LAUNCHED_ENV)


def backend_for(device: torch.device) -> str:
    """NCCL on CUDA, gloo on the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextmanager
def process_group(device: torch.device, timeout_s: float) -> Iterator[World]:
    """Join the process group of the environment's world for the block (nothing for
    one process); on CUDA each process takes GPU ``LOCAL_RANK``. Yields the world."""
    world = world_from_env()
    if not world.distributed or dist.is_initialized():
        yield world
        return
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(
        backend_for(device),
        timeout=datetime.timedelta(seconds=timeout_s),
        rank=world.rank,
        world_size=world.size,
    )
    try:
        yield world
    finally:
        dist.destroy_process_group()


def active() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all ranks (``tensor`` itself for one
    process). Integer tensors (confusion histograms) sum exactly."""
    if not active():
        return tensor
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
    summed = tensor.to(device).clone()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed.to(tensor.device)


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable Python object; ``value`` itself for
    one process). Used for what only rank 0 reads, such as the resume checkpoint."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def merge_from_all(part: dict) -> dict:
    """The union of every rank's ``part`` dict, on every rank (``part`` for one process);
    for small results such as the few predictions kept for overlays."""
    if not active():
        return part
    parts: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {key: value for each in parts for key, value in (each or {}).items()}


def world_of_group() -> World:
    """The world of the running process group (one process when none runs)."""
    if not active():
        return World()
    return World(dist.get_rank(), dist.get_world_size(), _env_int(("LOCAL_RANK",), 0))


def rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps ``seed`` (a one-process run is unchanged); other ranks get their own
    stream, so their dropout, flips and loss-sampling masks differ, reproducibly."""
    return seed + rank * 2**40


def wrap_for_ranks(model: nn.Module, device: torch.device, world: World) -> nn.Module:
    """``model`` in DistributedDataParallel (gradients averaged over ranks) when there
    are several processes; ``model`` itself for one."""
    if not world.distributed:
        return model
    device_ids = [device.index if device.index is not None else world.local_rank]
    return DistributedDataParallel(model, device_ids=device_ids if device.type == "cuda" else None)


__all__ = [
    "World",
    "active",
    "all_reduce_sum",
    "backend_for",
    "barrier",
    "broadcast_from_main",
    "merge_from_all",
    "process_group",
    "rank_seed",
    "under_launcher",
    "world_from_env",
    "world_of_group",
    "wrap_for_ranks",
]
