"""Data-parallel distillation: ``torchrun --nproc_per_node N -m fastmt distill ...``.

Every process holds the frozen teachers and a replica of the student (DistributedDataParallel);
each global batch is split into contiguous shards, one per process, as evenly as it goes (sizes
differ by at most one row). The last batch of an epoch may be smaller than ``--batch-size``, uneven
over the processes, or smaller than the number of processes; a process then has no row of its own.

Each process's losses are means over its own rows; ``Shard.row_weight`` (and ``token_weight`` for a
mean over tokens) turn them into that process's share of the global batch's mean, times the number
of processes, so that DistributedDataParallel's average of the gradients is exactly the gradient of
the global mean, and the mean over processes of any logged term is that term over the global batch.
A process without rows runs one placeholder row (the batch's first) with weight 0: it contributes
zero, not the NaN of a mean over no rows, and still takes part in the gradient exchange.
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


def shard_bounds(n: int, world: World) -> tuple[int, int]:
    """First and one-past-last row of this process's shard of ``n`` rows: contiguous, and sized
    ``n // size`` or one more (the first ``n % size`` processes take the extra rows)."""
    base, extra = divmod(n, world.size)
    start = world.rank * base + min(world.rank, extra)
    return start, start + base + (world.rank < extra)


@dataclass(frozen=True)
class Shard:
    """One process's part of a global batch.

    ``inputs``/``labels`` hold its rows, or, when it has none (``rows == 0``), one placeholder row
    that must be weighted 0. ``batch_inputs`` is the whole batch (on the host).
    """

    inputs: dict
    labels: torch.Tensor
    rows: int  # this process's rows
    start: int  # where they start in the global batch
    total: int  # rows in the global batch
    size: int  # processes
    batch_inputs: dict

    def row_weight(self) -> float:
        """The factor that turns a mean over this shard's rows into ``size`` times its share of
        the mean over the global batch (1 with one process)."""
        return self.size * self.rows / self.total if self.total else 0.0

    def token_weight(self, key: str) -> float:
        """The same for a mean over the real tokens of ``key``'s inputs (its attention mask)."""
        mask = self.batch_inputs[key]["attention_mask"]
        total = int(mask.sum())
        mine = int(mask[self.start:self.start + self.rows].sum())
        return self.size * mine / total if total else 0.0


def shard(inputs: dict, labels: torch.Tensor, world: World) -> Shard:
    """This process's rows of a global batch (every row when there is one process)."""
    n = labels.shape[0]
    if world.size == 1:
        return Shard(inputs, labels, n, 0, n, 1, inputs)
    start, stop = shard_bounds(n, world)
    rows = slice(start, stop) if stop > start else slice(0, 1)  # none: a placeholder row, weighted 0
    mine = {k: {name: t[rows] for name, t in v.items()} for k, v in inputs.items()}
    return Shard(mine, labels[rows], stop - start, start, n, world.size, inputs)


def mean_over_world(t: torch.Tensor, world: World) -> torch.Tensor:
    """The mean over processes (for terms already weighted by ``Shard.row_weight``, the global value)."""
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
