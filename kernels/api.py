"""Fused Triton kernels for the multi-teacher losses (installed as ``fastmt.kernels``).

``mt_kl_loss`` and ``mt_hidden_loss`` take exactly the arguments of their references in
``fastmt.losses`` and return the same values. They run the Triton kernels on CUDA tensors, and on
CPU tensors when ``TRITON_INTERPRET=1`` (Triton's interpreter, which is how they are tested here).
Anywhere else (or without Triton installed) they run the reference and say so once in the log.
Both are ``torch.library`` custom ops with fake implementations and registered autograd, so a step
calling them compiles under ``torch.compile(fullgraph=True)`` without a graph break.

Differences from the reference, by design: labels are not range-checked on the host (a host sync)
but clamped inside the kernel; float64 inputs are computed in float32 (gradients still come back
in float64).
"""

from __future__ import annotations

import logging
import os

import torch

import fastmt.kernels.lm_chunks as _lm_chunks
import fastmt.kernels.lm_common as _lm_common
import fastmt.kernels.lm_tiled as _lm_tiled
from fastmt import losses as _ref
from fastmt.kernels.lm_topk import lm_topk_linear_kl_loss

__all__ = ["mt_kl_loss", "mt_hidden_loss", "lm_linear_kl_loss", "mt_linear_kl_loss", "lm_topk_linear_kl_loss",
           "hidden_products", "available", "SCHEMES"]

SCHEMES = _ref.SCHEMES
log = logging.getLogger("fastmt")

try:  # Triton is optional: without it the reference serves
    import fastmt.kernels.hidden_mse as _hidden
    import fastmt.kernels.kl as _kl

    _IMPORT_ERROR: str | None = None
except ImportError as e:
    _kl = _hidden = None
    _IMPORT_ERROR = str(e)

_warned = False


def available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernels run for tensors on ``device`` (CUDA, or any device under the interpreter)."""
    if _kl is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return device is not None and torch.device(device).type == "cuda"


def _use_kernels(device: torch.device) -> bool:
    global _warned
    if available(device):
        return True
    if not _warned:
        why = f"Triton is not importable ({_IMPORT_ERROR})" if _kl is None else f"tensors are on {device}, not CUDA"
        log.warning("fastmt.kernels: %s; running the reference losses instead, and the causal-LM loss "
                    "over vocabulary tiles in torch (set TRITON_INTERPRET=1 to run the kernels in Triton's "
                    "CPU interpreter)", why)
        _warned = True
    return False


def mt_kl_loss(student_logits, teacher_logits, weights=None, temperature=1.0, labels=None, ignore_index=-100,
               teacher_lse=None):
    """Fused ``fastmt.losses.mt_kl_loss``: same arguments, same value, float32 loss.

    ``teacher_lse``, optional: the teachers' log-sum-exps for these rows, ``[2, T, N]`` float32 as
    ``fastmt.losses.teacher_lse(teacher_logits, temperature)`` gives them (a teacher cache computes
    them once per example); the kernel then skips computing them. The gradient is made in the
    forward pass when ``student_logits`` requires one."""
    tau, w = _ref.check_kl_args(student_logits, teacher_logits, weights, temperature, labels, ignore_index)
    if teacher_lse is not None:
        _ref.check_teacher_lse(teacher_lse, teacher_logits)
    if not _use_kernels(student_logits.device):
        return _ref.mt_kl_loss(student_logits, teacher_logits, weights, temperature, labels, ignore_index)
    w_tensor = w.detach() if isinstance(w, torch.Tensor) else None
    with_grad = torch.is_grad_enabled() and student_logits.requires_grad
    loss, _, _ = _kl.mt_kl_op(student_logits, teacher_logits.detach(), w_tensor, labels,
                              teacher_lse.detach() if teacher_lse is not None else None,
                              w if isinstance(w, str) else None, tau,
                              int(ignore_index), with_grad)
    return loss


def hidden_products(dtype: torch.dtype, device: torch.device | str) -> str:
    """Where the hidden loss's GEMMs run for inputs of ``dtype`` on ``device``: "cublas" for float32
    on a GPU without TF32 (the reference: cuBLAS's float32 GEMMs beat exact-float32 Triton tiles on
    FMA units, so the fused loss is never slower than the reference there), else the Triton plan's
    mode ("half", "tf32", or "ieee" in the CPU interpreter), or "reference" where no kernel runs."""
    device = torch.device(device)
    if not available(device):
        return "reference"
    plan = _hidden.dot_plan(dtype, device.type)
    return "cublas" if device.type == "cuda" and plan.mode == "ieee" else plan.mode


def mt_hidden_loss(student_hidden, teacher_hidden, proj_weight, proj_bias, mask=None, weights=None):
    """Fused ``fastmt.losses.mt_hidden_loss``: same arguments, same value, float32 loss. Float32 on a
    GPU without TF32 runs the reference's cuBLAS GEMMs (``hidden_products``)."""
    _ref.check_hidden_args(student_hidden, teacher_hidden, proj_weight, proj_bias, mask, weights)
    if not _use_kernels(student_hidden.device) or hidden_products(student_hidden.dtype, student_hidden.device) == "cublas":
        return _ref.mt_hidden_loss(student_hidden, teacher_hidden, proj_weight, proj_bias, mask, weights)
    return _hidden.mt_hidden_op(student_hidden, teacher_hidden.detach(), proj_weight, proj_bias,
                                mask.detach() if mask is not None else None,
                                weights.detach() if weights is not None else None)


def lm_linear_kl_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, weights="paper",
                      temperature=1.0, ignore_index=-100, direction="forward", chunk_bytes=None, backend=None):
    """Fused ``fastmt.losses.lm_linear_kl_loss``: same arguments and value (float32), without forming
    the student's or any teacher's ``N x V`` logits. The teachers come stacked (``[T,N,Dt]``,
    ``[T,V,Dt]``; ``lm_common.stack_teachers`` pads different widths) or as lists.

    ``backend``: ``chunks`` (the default where the Triton kernels run: chunks of rows, cuBLAS GEMMs
    and the KL row kernel, ``fastmt.kernels.lm_chunks``), ``triton`` (vocabulary tiles in Triton,
    ``fastmt.kernels.lm_kl``: less memory, more products) or ``torch`` (vocabulary tiles in torch,
    ``fastmt.kernels.lm_tiled``: the default where Triton cannot run). ``chunk_bytes``: the most one
    chunk's blocks may take (default 1 GiB for ``chunks``, 256 MiB for the gradient block of ``triton``)."""
    _ref.check_direction(direction)
    hts, _ = _ref.check_lm_linear_args(student_hidden, student_weight, teacher_hidden, teacher_weight, targets)
    tau = _ref.check_temperature(temperature)
    if isinstance(weights, torch.Tensor):
        _ref.check_tensor(weights, "weights", student_hidden, "student_hidden")
        _ref.check_shape(weights, "weights", ("T", "N"), {"T": (len(hts), "teacher_hidden"),
                                                          "N": (student_hidden.shape[0], "student_hidden")})
    elif weights is not None:
        weights = _ref.check_scheme(weights, "weights")
    if backend is None:
        # Where the Triton kernels cannot run, the same algorithm in torch over vocabulary tiles (still no
        # [N, V] logits), said once like the other losses' fallback.
        backend = "chunks" if _use_kernels(student_hidden.device) else "torch"
    elif backend not in LM_BACKENDS:
        raise ValueError(f"backend={backend!r}: choose from {', '.join(LM_BACKENDS)}")
    elif backend != "torch" and not available(student_hidden.device):
        raise ValueError(f"backend={backend!r} needs the Triton kernels, which do not run on "
                         f"{student_hidden.device} here (CUDA, or TRITON_INTERPRET=1); use backend='torch'")
    if chunk_bytes is None:
        chunk_bytes = _lm_chunks.CHUNK_BYTES if backend == "chunks" else _lm_common.CHUNK_BYTES
    return _lm_tiled.lm_linear_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, weights,
                                  tau, ignore_index, direction == "reverse", int(chunk_bytes), backend)


LM_BACKENDS = ("chunks", "triton", "torch")


def mt_linear_kl_loss(hidden, weight, teacher_logits, labels, weighting="paper", temperature=1.0, direction="forward",
                      ignore_index=-100, *, teacher_hidden=None, teacher_weight=None, chunk_bytes=None, backend=None):
    """``fastmt.losses.mt_token_kl_loss(hidden @ weight.T, teacher_logits, labels, ...)`` without forming
    ``hidden @ weight.T``: the student's logits exist one chunk of rows at a time (float32, 1 GiB by
    default), with gradients for ``hidden`` and ``weight``. The teachers come as their logits ``[T, N,
    V]``, or, with ``teacher_logits=None``, as their last hidden states and output matrices
    (``teacher_hidden``, ``teacher_weight``: then no teacher's logits are formed either; this is
    ``lm_linear_kl_loss``)."""
    if teacher_logits is None:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("pass the teachers' logits, or teacher_hidden and teacher_weight (their last hidden "
                             "states and output matrices)")
        return lm_linear_kl_loss(hidden, weight, teacher_hidden, teacher_weight, labels, weighting, temperature,
                                 ignore_index, direction, chunk_bytes, backend)
    if teacher_hidden is not None or teacher_weight is not None:
        raise ValueError("pass the teachers' logits or teacher_hidden and teacher_weight, not both")
    _ref.check_direction(direction)
    tau = _ref.check_temperature(temperature)
    _ref.check_mt_linear_args(hidden, weight, teacher_logits, labels)
    if isinstance(weighting, torch.Tensor):
        _ref.check_tensor(weighting, "weighting", hidden, "hidden")
        dims = {"T": (teacher_logits.shape[0], "teacher_logits"), "N": (hidden.shape[0], "hidden")}
        _ref.check_shape(weighting, "weighting", ("T", "N"), dims)
    elif weighting is not None:
        weighting = _ref.check_scheme(weighting, "weighting")
    if backend not in (None, "chunks", "torch"):
        raise ValueError(f"backend={backend!r}: with the teachers' logits, choose from chunks, torch")
    kernels = backend != "torch" and _use_kernels(hidden.device)
    return _lm_tiled.lm_linear_kl(hidden, weight, teacher_logits, teacher_logits.new_empty((0,)), labels, weighting,
                                  tau, ignore_index, direction == "reverse",
                                  _lm_chunks.CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes),
                                  "logits" if kernels else "logits-torch")

