"""Precision and compilation, as every task's step uses them: the dtypes ``--precision`` names,
the autocast context for one, and ``torch.compile`` with the options every compiled step shares."""

from __future__ import annotations

import contextlib
import os

import torch

from fastmt import choices

# The dtype of each --precision name (fastmt.choices.PRECISIONS), in its order.
PRECISIONS = dict(zip(choices.PRECISIONS, (torch.float32, torch.float16, torch.bfloat16), strict=True))


COMPILE_BACKEND_ENV = "FASTMT_COMPILE_BACKEND"  # e.g. "eager": Dynamo's tracing alone (tests, debugging)


def compile_fn(fn, mode: str | None = None):
    """``torch.compile(fn, fullgraph=True, dynamic=False)``: one graph per input shape, none broken.
    ``FASTMT_COMPILE_BACKEND`` picks another backend than Inductor (``eager`` or ``aot_eager`` trace
    and check the same graphs, without generating code)."""
    backend = os.environ.get(COMPILE_BACKEND_ENV) or "inductor"
    if backend != "inductor":
        mode = None  # modes are Inductor's
    return torch.compile(fn, fullgraph=True, dynamic=False, mode=mode, backend=backend)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])
