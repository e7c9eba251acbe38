"""Fused multi-teacher softmax-KL: ``fastmt.losses.mt_kl_loss`` as one Triton kernel.

One program per row. Pass 1 streams the row's student logits and all T teachers' logits (a
``[T_PAD, BLOCK_C]`` tile) once, keeping online log-sum-exps (tempered for the KL, untempered for
the teacher weights) and the running ``sum_c p_t (t - s) / tau``, so any row width works without
materialising probabilities. The per-example teacher weights (paper / softmax / uniform) come out
of the same pass. Pass 2 streams the row again and writes ``d loss / d student_logits``, so backward
is only a multiply by the upstream gradient.

Bytes moved per row: 2 x (1 + T) x C logits read, C gradient written.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from fastmt.losses import SCHEMES

# 0: a weight tensor (or none = 1); then one code per scheme name.
_SCHEME_CODE = {"paper": 1, "softmax": 2, "uniform": 3}
# Finite floor for running maxima: exp(-inf - floor) is 0, never NaN. A constexpr, because compiled
# (non-interpreted) kernels may only read module globals that are constexpr instances.
_NEG = tl.constexpr(-1.0e30)


@triton.jit
def _mt_kl_fwd_kernel(
    s_ptr,  # [N, C] student logits
    t_ptr,  # [T, N, C] teacher logits
    w_ptr,  # [T, N] teacher weights (read when HAS_W)
    y_ptr,  # [N] labels (read when HAS_LABELS)
    nvalid_ptr,  # [] float32: rows that count in the mean
    loss_ptr,  # [N] float32: each row's share of the loss
    grad_ptr,  # [N, C] d loss / d student logits, student dtype
    T,
    C,
    stride_sn,
    stride_ti,
    stride_tn,
    stride_wi,
    stride_gn,
    inv_tau,  # 1 / temperature
    tau,
    ignore_index,
    SCHEME: tl.constexpr,  # 0 tensor/none, 1 paper, 2 softmax, 3 uniform
    HAS_W: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    T_PAD: tl.constexpr,  # next power of two >= T
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_t = tl.arange(0, T_PAD)
    t_ok = offs_t < T
    s_row = s_ptr + row * stride_sn
    t_rows = t_ptr + offs_t.to(tl.int64)[:, None] * stride_ti + row * stride_tn  # [T_PAD, 1]
    g_row = grad_ptr + row * stride_gn

    valid = True
    y = 0
    if HAS_LABELS:
        y = tl.load(y_ptr + row).to(tl.int64)
        valid = y != ignore_index
        # Not range-checked on the host (that would sync): clamp so a bad label cannot read out of bounds.
        y = tl.minimum(tl.maximum(tl.where(valid, y, 0), 0), C - 1)

    # ---- pass 1: online log-sum-exps and sum_c p_t * (t - s) / tau
    # Logits are kept relative to their running maxima (t/tau - m_t, s/tau - m_s) and the KL sum is
    # accumulated as sum e * ((t/tau - m_t) - (s/tau - m_s)): with large logits, forming t - s and then
    # subtracting the log-sum-exps would lose the float32 digits the answer is made of.
    m_s = tl.full((), _NEG, tl.float32)
    d_s = tl.zeros((), tl.float32)
    m_t = tl.full((T_PAD,), _NEG, tl.float32)
    d_t = tl.zeros((T_PAD,), tl.float32)
    a_t = tl.zeros((T_PAD,), tl.float32)
    m_u = tl.full((T_PAD,), _NEG, tl.float32)
    d_u = tl.zeros((T_PAD,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs < C
        s = tl.load(s_row + offs, mask=c_ok, other=float("-inf")).to(tl.float32) * inv_tau
        t = tl.load(t_rows + offs[None, :], mask=t_ok[:, None] & c_ok[None, :], other=float("-inf")).to(tl.float32)
        ts = t * inv_tau

        m_new = tl.maximum(m_s, tl.max(s, axis=0))
        d_s = d_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
        ds_shift = m_new - m_s  # >= 0
        m_s = m_new

        mt_new = tl.maximum(m_t, tl.max(ts, axis=1))
        rescale = tl.exp(m_t - mt_new)
        e = tl.exp(ts - mt_new[:, None])
        # p_t = 0 (a -inf teacher logit) contributes nothing, even where s is -inf too.
        diff = tl.where(e > 0, (ts - mt_new[:, None]) - (s - m_s)[None, :], 0.0)
        # Re-express the sum so far against the new maxima (d_t = 0 before any finite logit).
        shift = tl.where(d_t > 0, (mt_new - m_t) - ds_shift, 0.0)
        a_t = (a_t - d_t * shift) * rescale + tl.sum(e * diff, axis=1)
        d_t = d_t * rescale + tl.sum(e, axis=1)
        m_t = mt_new

        if SCHEME == 1 or SCHEME == 2:
            mu_new = tl.maximum(m_u, tl.max(t, axis=1))
            d_u = d_u * tl.exp(m_u - mu_new) + tl.sum(tl.exp(t - mu_new[:, None]), axis=1)
            m_u = mu_new

    log_ds = tl.log(d_s)
    log_dt = tl.where(t_ok, tl.log(tl.where(t_ok, d_t, 1.0)), 0.0)
    kl = tl.where(t_ok, a_t / tl.where(t_ok, d_t, 1.0) - log_dt + log_ds, 0.0)  # [T_PAD]

    # ---- teacher weights for this row
    if HAS_W:
        w = tl.load(w_ptr + offs_t.to(tl.int64) * stride_wi + row, mask=t_ok, other=0.0).to(tl.float32)
    elif SCHEME == 1 or SCHEME == 2:
        t_y = tl.load(t_ptr + offs_t.to(tl.int64) * stride_ti + row * stride_tn + y, mask=t_ok, other=0.0)
        ce = tl.where(t_ok, (m_u - t_y.to(tl.float32)) + tl.log(d_u), 0.0)
        if SCHEME == 1:
            w = 1.0 / (1.0 + ce)
        else:
            z = tl.where(t_ok, -ce, float("-inf"))
            ez = tl.exp(z - tl.max(z, axis=0))
            w = ez / tl.sum(ez, axis=0)
    else:
        w = tl.full((T_PAD,), 1.0, tl.float32)
    w = tl.where(t_ok & valid, w, 0.0)

    n_valid = tl.maximum(tl.load(nvalid_ptr), 1.0)
    row_loss = tl.sum(tl.where(w != 0, w * kl, 0.0), axis=0) * (tau * tau / n_valid)
    tl.store(loss_ptr + row, tl.where(valid, row_loss, 0.0))

    # ---- pass 2: d loss / d s_c = tau / N * (sum_i w_i * q_c - sum_i w_i * p_ic)
    w_sum = tl.sum(w, axis=0)
    g_scale = tl.where(valid, tau / n_valid, 0.0)
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs < C
        s = tl.load(s_row + offs, mask=c_ok, other=float("-inf")).to(tl.float32) * inv_tau
        t = tl.load(t_rows + offs[None, :], mask=t_ok[:, None] & c_ok[None, :], other=float("-inf")).to(tl.float32)
        q = tl.exp((s - m_s) - log_ds)
        p = tl.exp((t * inv_tau - m_t[:, None]) - log_dt[:, None])
        wp = tl.sum(tl.where(w[:, None] != 0, w[:, None] * p, 0.0), axis=0)
        g = g_scale * (w_sum * q - wp)
        tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=c_ok)


class Launch(NamedTuple):
    """One kernel launch, fully decided from the inputs: the launchers run it, and the ahead-of-time
    build (``fastmt.kernels.aot``) specializes and compiles exactly these arguments, so the two cannot
    drift apart."""

    kernel: Any  # the @triton.jit function
    grid: tuple[int, ...]
    args: tuple  # positional, in the kernel's parameter order
    constexprs: dict[str, Any]
    num_warps: int
    options: dict[str, Any] | None = None  # further Triton compile options (ptx_options, ...)

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps, **(self.options or {}))


def _block_c(c: int, t_pad: int) -> int:
    return max(16, min(triton.next_power_of_2(c), max(1024, 8192 // t_pad)))


def _ptxas_options() -> str:
    # At its default register-usage level (5) ptxas 12.8 spills 4-32 bytes around the class loop in a
    # scattered few of this kernel's specializations (T=8, C=37 on sm_80; C=1000 with T=2..8 on sm_90),
    # at 56-168 registers and whatever the warps; level 10 keeps them in registers. Options the user
    # gives Triton through PTXAS_OPTIONS still apply.
    from triton import knobs

    return " ".join(filter(None, [knobs.nvidia.ptxas_options, "--register-usage-level 10"]))


def kl_config(c: int, num_t: int) -> tuple[int, int, int]:
    """(T_PAD, BLOCK_C, num_warps) for ``num_t`` teachers over ``c`` classes."""
    t_pad = max(2, triton.next_power_of_2(num_t))
    block_c = _block_c(c, t_pad)
    tile = t_pad * block_c  # elements of the teacher tile held per program
    # Warps that build without spills on sm_80 and sm_90 (``python -m fastmt.kernels.aot``): with 8
    # warps for tiles of 4096-8192, ptxas aimed at 64-80 registers a thread and spilled 8-24 bytes;
    # with 4, eight teachers' rows of 1024 classes spilled at 168 registers, which 8 warps hold.
    # Tiles over 8192 (more than 8 teachers) keep 16 warps and are not in that build's set.
    if tile > 8192:
        num_warps = 16
    elif t_pad >= 8 and tile > 4096:
        num_warps = 8
    else:
        num_warps = 4
    return t_pad, block_c, num_warps


def kl_launch(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weights: torch.Tensor | None,
    scheme: str | None,
    temperature: float,
    labels: torch.Tensor | None,
    ignore_index: int,
) -> tuple[Launch | None, torch.Tensor, torch.Tensor]:
    """The launch for these inputs and its outputs ``(row_loss, grad)``, allocated but not yet written.

    Nothing runs on the inputs' data, so meta tensors give the exact launch without a device. With
    no rows there is nothing to launch: ``(None, zero loss, empty grad)``.
    """
    s = student_logits.contiguous()
    t = teacher_logits.contiguous()
    n, c = s.shape
    num_t = t.shape[0]
    grad = torch.empty_like(s)
    if n == 0:
        return None, s.new_zeros((), dtype=torch.float32), grad
    if labels is not None:
        labels = labels.contiguous()
        n_valid = (labels != ignore_index).sum().to(torch.float32)
    else:
        n_valid = torch.full((), float(n), dtype=torch.float32, device=s.device)
    row_loss = torch.empty(n, dtype=torch.float32, device=s.device)
    w = weights.contiguous() if weights is not None else None
    t_pad, block_c, num_warps = kl_config(c, num_t)
    args = (
        s, t, w if w is not None else s, labels if labels is not None else s, n_valid, row_loss, grad,
        num_t, c, s.stride(0), t.stride(0), t.stride(1), w.stride(0) if w is not None else 0, grad.stride(0),
        1.0 / temperature, float(temperature), ignore_index,
    )
    constexprs = dict(
        SCHEME=_SCHEME_CODE.get(scheme, 0) if w is None else 0,
        HAS_W=w is not None, HAS_LABELS=labels is not None, T_PAD=t_pad, BLOCK_C=block_c,
    )
    return Launch(_mt_kl_fwd_kernel, (n,), args, constexprs, num_warps, {"ptx_options": _ptxas_options()}), row_loss, grad


def kl_forward(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weights: torch.Tensor | None,
    scheme: str | None,
    temperature: float,
    labels: torch.Tensor | None,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel: returns (loss float32 scalar, gradient w.r.t. student logits)."""
    launch, row_loss, grad = kl_launch(student_logits, teacher_logits, weights, scheme, temperature, labels,
                                       ignore_index)
    if launch is None:
        return row_loss, grad
    launch()
    return row_loss.sum(), grad


# ---------------------------------------------------------------------------------------------------
# torch.library op: opaque to torch.compile (no graph break), differentiable through register_autograd.


@torch.library.custom_op("fastmt::mt_kl_loss", mutates_args=())
def mt_kl_op(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weights: torch.Tensor | None,
    labels: torch.Tensor | None,
    scheme: int,
    temperature: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    name = {v: k for k, v in _SCHEME_CODE.items()}.get(scheme)
    return kl_forward(student_logits, teacher_logits, weights, name, temperature, labels, ignore_index)


@mt_kl_op.register_fake
def _(student_logits, teacher_logits, weights, labels, scheme, temperature, ignore_index):
    return student_logits.new_empty((), dtype=torch.float32), torch.empty_like(student_logits)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, grad_grad):
    (grad,) = ctx.saved_tensors
    return (grad * grad_loss.to(grad.dtype)), None, None, None, None, None, None


mt_kl_op.register_autograd(_backward, setup_context=_setup)


def scheme_code(weights) -> int:
    return _SCHEME_CODE[weights] if isinstance(weights, str) else 0


assert set(_SCHEME_CODE) == set(SCHEMES)
