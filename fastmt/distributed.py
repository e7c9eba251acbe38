"""Data-parallel distillation: ``torchrun --nproc_per_node N -m fastmt distill ...``.

Every process holds the frozen teachers and a replica of the student (DistributedDataParallel);
each global batch of ``--batch-size`` rows is split into equal contiguous shards, one per process,
so the averaged gradients equal those of one process seeing the whole batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastmt.errors import UsageError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env(device: torch.device) -> World:
    """The process group torchrun describes in the environment (one process when there is none)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    w = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return w


def local_device(device: torch.device, world: World) -> torch.device:
    return torch.device("cuda", world.local_rank) if device.type == "cuda" and world.size > 1 else device


def check_batch(batch_size: int, world: World) -> None:
    if batch_size % world.size:
        raise UsageError(f"--batch-size {batch_size}: must split evenly over {world.size} processes")


def shard(inputs: dict, labels: torch.Tensor, world: World):
    """This process's rows of a global batch."""
    if world.size == 1:
        return inputs, labels
    n = labels.shape[0]
    per = -(-n // world.size)
    rows = slice(world.rank * per, min(n, (world.rank + 1) * per))
    return {k: {name: t[rows] for name, t in v.items()} for k, v in inputs.items()}, labels[rows]


def mean_over_world(t: torch.Tensor, world: World) -> torch.Tensor:
    if world.size == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / world.size


def max_over_world(t: torch.Tensor, world: World) -> torch.Tensor:
    if world.size == 1:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
