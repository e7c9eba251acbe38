"""What ``--kernels`` names: the module a step takes its losses from, and whether the fused one runs
on a device (which ``--kernels auto`` asks, through :func:`fastmt.config.auto.resolve`)."""

from __future__ import annotations

import fastmt.kernels as fused_losses
from fastmt import losses as reference_losses


def loss_module(kind: str):
    """The losses ``--kernels`` names: ``fastmt.losses`` (``reference``) or ``fastmt.kernels`` (``fused``)."""
    return reference_losses if kind == "reference" else fused_losses


def fused_available(device) -> bool:
    """Whether ``fastmt.kernels`` runs its Triton kernels for tensors on ``device`` (Triton importable;
    on a CPU only under ``TRITON_INTERPRET=1``)."""
    return fused_losses.available(device)
