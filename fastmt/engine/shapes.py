"""The input shapes a compiled run can meet, counted before step 1.

A compiled step (``torch.compile(fullgraph=True, dynamic=False)``) makes one graph per input shape:
the rows of a batch times the padded width of each tokenizer's inputs. Dynamo stops making graphs
for a function after ``recompile_limit`` of them (8 by default), and under ``fullgraph=True`` that
stop is an error, raised in the middle of a run. The shapes are known from the data before training:
the rows this process takes per step (the last, partial batch of an epoch included; with several
processes, its share of each global batch) and, per tokenizer, the length buckets its examples pad
to. :func:`plan` counts them, raises Dynamo's limits to fit, and says so on one line; where there are
more than ``MAX_SHAPES`` (each graph costs a compile, a minute or more on a GPU), an automatic
``--compile`` is turned off and an explicit one is refused, before anything is compiled.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import torch._dynamo.config as dynamo_config

from fastmt.engine.distributed import World, shard_bounds
from fastmt.errors import UsageError

log = logging.getLogger("fastmt")

MAX_SHAPES = 64  # more graphs than this cost more compiling than a run is likely to win back


def step_rows(n: int, batch_size: int, world: World | None = None) -> list[int]:
    """The number of rows this process's step can take: a full batch and the last, partial one (a
    process with no row of a small last batch still runs one placeholder row)."""
    world = world or World()
    sizes = set()
    for total in {min(batch_size, n), n % batch_size} - {0}:
        start, stop = shard_bounds(total, world)
        sizes.add(max(stop - start, 1))
    return sorted(sizes)


def bucket_of(lengths, buckets: list[int]) -> np.ndarray:
    """Each example's padded width alone: the smallest bucket that holds it."""
    arr = np.array(sorted(set(int(b) for b in buckets)), dtype=np.int64)
    idx = np.searchsorted(arr, np.asarray(lengths, dtype=np.int64), side="left")
    return arr[idx.clip(0, len(arr) - 1)]


def width_tuples(widths: np.ndarray) -> list[tuple[int, ...]]:
    """The padded widths a batch can take, one per tokenizer, from each example's own ``[n, K]``.

    A batch pads each tokenizer's inputs to the bucket of its longest example there, so it takes
    ``(x_1, ..., x_K)`` only if, for every k, some example has width ``x_k`` in tokenizer k and at
    most ``x_j`` in every other one (the batch's longest in k, which no other tokenizer's width
    exceeds). Every such tuple is counted (a bound: batches are drawn, not chosen)."""
    if len(widths) == 0:
        return []
    distinct = np.unique(widths, axis=0)  # examples that differ in some width
    per_key = [sorted(set(distinct[:, k].tolist())) for k in range(widths.shape[1])]
    out = []
    for cand in itertools.product(*per_key):
        c = np.array(cand)
        fits = (distinct <= c).all(1)
        if all((fits & (distinct[:, k] == c[k])).any() for k in range(len(cand))):
            out.append(tuple(int(x) for x in cand))
    return out


@dataclass(frozen=True)
class ShapePlan:
    rows: list[int]  # rows per step
    widths: list[tuple[int, ...]]  # padded widths, one per tokenizer

    @property
    def count(self) -> int:
        """The most distinct input shapes a compiled function can see."""
        return len(self.rows) * len(self.widths)

    def describe(self) -> str:
        rows = ", ".join(map(str, self.rows))
        return (f"{len(self.rows)} batch size{'s' if len(self.rows) != 1 else ''} ({rows}) x "
                f"{len(self.widths)} padded width{'s' if len(self.widths) != 1 else ''}")


def shape_plan(encodings: dict, n: int, batch_size: int, buckets: list[int], world: World | None = None) -> ShapePlan:
    """The shapes of the steps over ``encodings`` (tokenizer key -> ``fastmt.data.dataset.Encoded``)."""
    if not encodings or n == 0:
        return ShapePlan(step_rows(n, batch_size, world), [])
    widths = np.stack([bucket_of(enc.packed()[3], buckets) for enc in encodings.values()], axis=1)
    return ShapePlan(step_rows(n, batch_size, world), width_tuples(widths))


def dynamo_limit() -> int:
    return int(getattr(dynamo_config, "recompile_limit", getattr(dynamo_config, "cache_size_limit", 8)))


def fit_dynamo_limits(shapes: int, functions: int) -> None:
    """Let each compiled function make ``shapes`` graphs, and all ``functions`` together as many."""
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), shapes))
    total = ("accumulated_recompile_limit" if hasattr(dynamo_config, "accumulated_recompile_limit")
             else "accumulated_cache_size_limit")
    if hasattr(dynamo_config, total):
        setattr(dynamo_config, total, max(getattr(dynamo_config, total), shapes * functions))


def plan(args, encodings: dict, n: int, world: World | None, buckets: list[int], auto: bool, functions: int) -> str:
    """Before step 1 of a compiled run: fit Dynamo's limits to the shapes it will meet, or turn
    compiling off (``auto``) / refuse (explicit ``--compile``) where there are too many. Returns the
    phrase for the run's path line (empty when nothing is compiled)."""
    if not args.compile:
        return ""
    sp = shape_plan(encodings, n, args.batch_size, buckets, world)
    if sp.count > MAX_SHAPES:
        why = (f"up to {sp.count} input shapes to compile ({sp.describe()}), more than {MAX_SHAPES}")
        if auto:
            args.compile = False
            if hasattr(args, "cuda_graphs"):
                args.cuda_graphs = False
            return f"compile off ({why})"
        raise UsageError(f"--compile: {why}; use a smaller --max-length, a --batch-size that divides the "
                         f"training set, or --no-compile")
    fit_dynamo_limits(sp.count, functions)
    return f"compiled shapes: up to {sp.count} ({sp.describe()}; Dynamo's limit {dynamo_limit()})"
