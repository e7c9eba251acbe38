"""Precision and compilation, as every task's step uses them: the dtypes ``--precision`` names,
the autocast context for one, and ``torch.compile`` with the options every compiled step shares."""

from __future__ import annotations

import contextlib
import os

import torch

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
