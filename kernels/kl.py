"""Fused multi-teacher softmax-KL: ``fastmt.losses.mt_kl_loss`` as two Triton kernels.

Forward, one program per row: a single pass streams the row's student logits and all T teachers'
logits (a ``[T_PAD, BLOCK_C]`` tile) once, keeping online log-sum-exps (tempered for the KL,
untempered for the teacher weights; one and the same at temperature 1) and the running
``sum_c p_t (t - s) / tau``, so any row width works without materialising probabilities. The
per-example teacher weights (paper / softmax / uniform) come out of the same pass. It writes the row's
loss and a few float32 statistics per row (maxima, log-sum-exps, each teacher's coefficient).

Backward, one program per row: streams the row again and writes ``d loss / d student_logits`` with
the upstream gradient (a device scalar) folded into the store: no separate scaling pass, no host read,
and no ``[N, C]`` buffer held between forward and backward.

Bytes per row: forward reads (1 + T) x C logits; backward reads them again and writes C.

Loads are 16 bytes wide where the rows allow it (``ALIGNED``): when every row of the student, the
teachers and the gradient starts at the same offset from a 16-byte boundary (contiguous rows of one
width, 16-byte-aligned bases, teacher blocks a multiple of 16 bytes apart), each row is cut into a
short unaligned head, whole unmasked ``BLOCK_C`` blocks that start on a 16-byte boundary, and a
tail; only head and tail are masked element by element.
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
def _row_split(row, stride, C, ALIGNED: tl.constexpr, VEC: tl.constexpr, BLOCK_C: tl.constexpr):
    """``(lead, n_main)``: the row's first ``lead`` elements precede a 16-byte boundary, then come
    ``n_main`` elements of whole blocks; the rest is the tail. Without ``ALIGNED``: ``(0, 0)``."""
    if ALIGNED:
        lead = tl.minimum((VEC - (row * stride) % VEC) % VEC, C)
        n_main = (C - lead) // BLOCK_C * BLOCK_C
    else:
        lead = row * 0
        n_main = row * 0
    return lead, n_main


@triton.jit
def _edge_cols(e0, lead, n_main, n_edge, ALIGNED: tl.constexpr, BLOCK_C: tl.constexpr):
    """Columns of one block of the head-and-tail elements, and which of them exist."""
    j = e0 + tl.arange(0, BLOCK_C)
    if ALIGNED:
        cols = tl.where(j < lead, j, j + n_main)
    else:
        cols = j
    return cols, j < n_edge


@triton.jit
def _stats_update(s, t, inv_tau, m_s, d_s, m_t, d_t, a_t, m_u, d_u,
                  SCHEME: tl.constexpr, TAU_ONE: tl.constexpr):
    """Fold one block of a row (``s`` ``[BLOCK_C]``, ``t`` ``[T_PAD, BLOCK_C]``, float32, -inf where
    absent) into the running statistics."""
    if TAU_ONE:
        ts = t
    else:
        s = s * inv_tau
        ts = t * inv_tau
    m_new = tl.maximum(m_s, tl.max(s, axis=0))
    d_s = d_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
    ds_shift = m_new - m_s  # >= 0
    m_s = m_new

    # Logits are kept relative to their running maxima (t/tau - m_t, s/tau - m_s) and the KL sum is
    # accumulated as sum e * ((t/tau - m_t) - (s/tau - m_s)): with large logits, forming t - s and then
    # subtracting the log-sum-exps would lose the float32 digits the answer is made of.
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

    if (SCHEME == 1 or SCHEME == 2) and not TAU_ONE:  # at temperature 1 these are m_t, d_t
        mu_new = tl.maximum(m_u, tl.max(t, axis=1))
        d_u = d_u * tl.exp(m_u - mu_new) + tl.sum(tl.exp(t - mu_new[:, None]), axis=1)
        m_u = mu_new
    return m_s, d_s, m_t, d_t, a_t, m_u, d_u


@triton.jit
def _mt_kl_fwd_kernel(
    s_ptr,  # [N, C] student logits
    t_ptr,  # [T, N, C] teacher logits
    w_ptr,  # [T, N] teacher weights (read when HAS_W)
    y_ptr,  # [N] labels (read when HAS_LABELS)
    nvalid_ptr,  # [] float32: rows that count in the mean
    loss_ptr,  # [N] float32: each row's share of the loss
    stats_ptr,  # [2 + 3T, N] float32: m_s, log d_s, m_t[T], log d_t[T], coef[T] (for backward)
    T,
    N,
    C,
    stride_sn,
    stride_ti,
    stride_tn,
    stride_wi,
    inv_tau,  # 1 / temperature
    tau,
    ignore_index,
    SCHEME: tl.constexpr,  # 0 tensor/none, 1 paper, 2 softmax, 3 uniform
    HAS_W: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    TAU_ONE: tl.constexpr,  # temperature == 1: no scaling, one log-sum-exp per teacher
    ALIGNED: tl.constexpr,  # rows share their offset from a 16-byte boundary (see the module doc)
    VEC: tl.constexpr,  # elements in 16 bytes
    T_PAD: tl.constexpr,  # next power of two >= T
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_t = tl.arange(0, T_PAD)
    t_ok = offs_t < T
    t_off = offs_t.to(tl.int64) * stride_ti + row * stride_tn  # [T_PAD]
    s_row = s_ptr + row * stride_sn
    t_rows = t_ptr + t_off

    valid = True
    y = 0
    if HAS_LABELS:
        y = tl.load(y_ptr + row).to(tl.int64)
        valid = y != ignore_index
        # Not range-checked on the host (that would sync): clamp so a bad label cannot read out of bounds.
        y = tl.minimum(tl.maximum(tl.where(valid, y, 0), 0), C - 1)

    m_s = tl.full((), _NEG, tl.float32)
    d_s = tl.zeros((), tl.float32)
    m_t = tl.full((T_PAD,), _NEG, tl.float32)
    d_t = tl.zeros((T_PAD,), tl.float32)
    a_t = tl.zeros((T_PAD,), tl.float32)
    m_u = tl.full((T_PAD,), _NEG, tl.float32)
    d_u = tl.zeros((T_PAD,), tl.float32)

    lead, n_main = _row_split(row, stride_sn, C, ALIGNED, VEC, BLOCK_C)
    if ALIGNED:  # whole blocks from a 16-byte boundary: unmasked along the row, 16-byte loads
        s_al = s_ptr + tl.multiple_of(row * stride_sn + lead, VEC)
        t_al = t_ptr + tl.multiple_of(t_off + lead, VEC)
        for c0 in range(0, n_main, BLOCK_C):
            offs = c0 + tl.arange(0, BLOCK_C)
            s = tl.load(s_al + offs).to(tl.float32)
            t = tl.load(t_al[:, None] + offs[None, :], mask=t_ok[:, None], other=float("-inf")).to(tl.float32)
            m_s, d_s, m_t, d_t, a_t, m_u, d_u = _stats_update(s, t, inv_tau, m_s, d_s, m_t, d_t, a_t, m_u, d_u,
                                                              SCHEME, TAU_ONE)
    n_edge = C - n_main
    for e0 in range(0, n_edge, BLOCK_C):  # head and tail (the whole row without ALIGNED), masked
        cols, ok = _edge_cols(e0, lead, n_main, n_edge, ALIGNED, BLOCK_C)
        s = tl.load(s_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
        t = tl.load(t_rows[:, None] + cols[None, :], mask=t_ok[:, None] & ok[None, :], other=float("-inf")).to(tl.float32)
        m_s, d_s, m_t, d_t, a_t, m_u, d_u = _stats_update(s, t, inv_tau, m_s, d_s, m_t, d_t, a_t, m_u, d_u,
                                                          SCHEME, TAU_ONE)
    if TAU_ONE:
        m_u = m_t
        d_u = d_t

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

    # ---- what backward needs: d loss / d s_c = sum_i coef_i * (q_c - p_ic), coef_i = w_i tau / n_valid
    coef = w * tl.where(valid, tau / n_valid, 0.0)
    tl.store(stats_ptr + row, m_s)
    tl.store(stats_ptr + N + row, log_ds)
    lanes = stats_ptr + (2 + offs_t.to(tl.int64)) * N + row
    tl.store(lanes, m_t, mask=t_ok)
    tl.store(lanes + T * N, log_dt, mask=t_ok)
    tl.store(lanes + 2 * T * N, coef, mask=t_ok)


@triton.jit
def _grad_block(s, t, inv_tau, m_s, log_ds, m_t, log_dt, coef, coef_sum, TAU_ONE: tl.constexpr):
    """``sum_i coef_i (q_c - p_ic)`` for one block (float32)."""
    if not TAU_ONE:
        s = s * inv_tau
        t = t * inv_tau
    q = tl.exp((s - m_s) - log_ds)
    p = tl.exp((t - m_t[:, None]) - log_dt[:, None])
    wp = tl.sum(tl.where(coef[:, None] != 0, coef[:, None] * p, 0.0), axis=0)
    return coef_sum * q - wp


@triton.jit
def _mt_kl_bwd_kernel(
    s_ptr,  # [N, C] student logits
    t_ptr,  # [T, N, C] teacher logits
    stats_ptr,  # [2 + 3T, N] float32, from the forward
    up_ptr,  # [] the upstream gradient d out / d loss
    grad_ptr,  # [N, C] d out / d student logits, student dtype
    T,
    N,
    C,
    stride_sn,
    stride_ti,
    stride_tn,
    stride_gn,
    inv_tau,
    TAU_ONE: tl.constexpr,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
    T_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_t = tl.arange(0, T_PAD)
    t_ok = offs_t < T
    t_off = offs_t.to(tl.int64) * stride_ti + row * stride_tn
    m_s = tl.load(stats_ptr + row)
    log_ds = tl.load(stats_ptr + N + row)
    lanes = stats_ptr + (2 + offs_t.to(tl.int64)) * N + row
    m_t = tl.load(lanes, mask=t_ok, other=0.0)
    log_dt = tl.load(lanes + T * N, mask=t_ok, other=0.0)
    # The upstream gradient is folded into the coefficients: one pass, whatever its value.
    coef = tl.load(lanes + 2 * T * N, mask=t_ok, other=0.0) * tl.load(up_ptr).to(tl.float32)
    coef_sum = tl.sum(coef, axis=0)

    lead, n_main = _row_split(row, stride_sn, C, ALIGNED, VEC, BLOCK_C)
    if ALIGNED:
        s_al = s_ptr + tl.multiple_of(row * stride_sn + lead, VEC)
        t_al = t_ptr + tl.multiple_of(t_off + lead, VEC)
        g_al = grad_ptr + tl.multiple_of(row * stride_gn + lead, VEC)
        for c0 in range(0, n_main, BLOCK_C):
            offs = c0 + tl.arange(0, BLOCK_C)
            s = tl.load(s_al + offs).to(tl.float32)
            t = tl.load(t_al[:, None] + offs[None, :], mask=t_ok[:, None], other=float("-inf")).to(tl.float32)
            g = _grad_block(s, t, inv_tau, m_s, log_ds, m_t, log_dt, coef, coef_sum, TAU_ONE)
            tl.store(g_al + offs, g.to(grad_ptr.dtype.element_ty))
    n_edge = C - n_main
    s_row = s_ptr + row * stride_sn
    t_rows = t_ptr + t_off
    g_row = grad_ptr + row * stride_gn
    for e0 in range(0, n_edge, BLOCK_C):
        cols, ok = _edge_cols(e0, lead, n_main, n_edge, ALIGNED, BLOCK_C)
        s = tl.load(s_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
        t = tl.load(t_rows[:, None] + cols[None, :], mask=t_ok[:, None] & ok[None, :], other=float("-inf")).to(tl.float32)
        g = _grad_block(s, t, inv_tau, m_s, log_ds, m_t, log_dt, coef, coef_sum, TAU_ONE)
        tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------------
# Classification sizes (C <= SMALL_C, few rows): one program, all rows, a block of rows at a time.


@triton.jit
def _mt_kl_small_fwd_kernel(
    s_ptr, t_ptr, w_ptr, y_ptr,  # as in _mt_kl_fwd_kernel
    loss_ptr,  # [] float32: the loss itself
    stats_ptr,  # [2 + 3T, N] float32, as in _mt_kl_fwd_kernel
    T, N, C, stride_sn, stride_ti, stride_tn, stride_wi, inv_tau, tau, ignore_index,
    SCHEME: tl.constexpr, HAS_W: tl.constexpr, HAS_LABELS: tl.constexpr, TAU_ONE: tl.constexpr,
    T_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The whole loss in one launch: counts the rows that count, then takes ``ROWS`` rows at a time
    as a ``[T_PAD, ROWS, BLOCK_C]`` tile (a whole row per block: no online rescaling)."""
    offs_t = tl.arange(0, T_PAD)
    t_ok = offs_t < T
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    lane = offs_t.to(tl.int64)

    if HAS_LABELS:
        count = tl.zeros((ROWS,), tl.float32)
        for r0 in range(0, N, ROWS):
            rr = r0 + tl.arange(0, ROWS)
            y = tl.load(y_ptr + rr, mask=rr < N, other=ignore_index)
            count += tl.where(y != ignore_index, 1.0, 0.0)
        n_valid = tl.maximum(tl.sum(count, axis=0), 1.0)
    else:
        n_valid = tl.maximum(tl.zeros((), tl.float32) + N, 1.0)

    total = tl.zeros((ROWS,), tl.float32)
    for r0 in range(0, N, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        r_ok = rows < N
        rows64 = rows.to(tl.int64)
        s = tl.load(s_ptr + rows64[:, None] * stride_sn + cols[None, :], mask=r_ok[:, None] & c_ok[None, :],
                    other=float("-inf")).to(tl.float32)  # [ROWS, BLOCK_C]
        t_ptrs = t_ptr + lane[:, None, None] * stride_ti + rows64[None, :, None] * stride_tn + cols[None, None, :]
        t = tl.load(t_ptrs, mask=t_ok[:, None, None] & r_ok[None, :, None] & c_ok[None, None, :],
                    other=float("-inf")).to(tl.float32)  # [T_PAD, ROWS, BLOCK_C]
        if TAU_ONE:
            ss = s
            ts = t
        else:
            ss = s * inv_tau
            ts = t * inv_tau
        m_s = tl.maximum(tl.max(ss, axis=1), _NEG)  # [ROWS]
        zs = ss - m_s[:, None]
        log_ds = tl.log(tl.sum(tl.exp(zs), axis=1))
        m_t = tl.maximum(tl.max(ts, axis=2), _NEG)  # [T_PAD, ROWS]
        zt = ts - m_t[:, :, None]
        e = tl.exp(zt)
        d_t = tl.sum(e, axis=2)
        # p_t = 0 (a -inf teacher logit) contributes nothing, even where s is -inf too.
        a_t = tl.sum(tl.where(e > 0, e * (zt - zs[None, :, :]), 0.0), axis=2)
        lane_ok = t_ok[:, None] & r_ok[None, :]
        d_safe = tl.where(lane_ok, d_t, 1.0)
        log_dt = tl.where(lane_ok, tl.log(d_safe), 0.0)
        kl = tl.where(lane_ok, a_t / d_safe - log_dt + log_ds[None, :], 0.0)  # [T_PAD, ROWS]

        valid = r_ok
        y = tl.zeros((ROWS,), tl.int64)
        if HAS_LABELS:
            y = tl.load(y_ptr + rows, mask=r_ok, other=ignore_index).to(tl.int64)
            valid = r_ok & (y != ignore_index)
            y = tl.minimum(tl.maximum(tl.where(valid, y, 0), 0), C - 1)
        if HAS_W:
            w = tl.load(w_ptr + lane[:, None] * stride_wi + rows64[None, :], mask=lane_ok, other=0.0).to(tl.float32)
        elif SCHEME == 1 or SCHEME == 2:
            if TAU_ONE:
                m_u = m_t
                log_du = log_dt
            else:
                m_u = tl.maximum(tl.max(t, axis=2), _NEG)
                log_du = tl.where(lane_ok, tl.log(tl.where(lane_ok, tl.sum(tl.exp(t - m_u[:, :, None]), axis=2), 1.0)), 0.0)
            t_y = tl.load(t_ptr + lane[:, None] * stride_ti + rows64[None, :] * stride_tn + y[None, :], mask=lane_ok,
                          other=0.0).to(tl.float32)
            ce = tl.where(lane_ok, (m_u - t_y) + log_du, 0.0)
            if SCHEME == 1:
                w = 1.0 / (1.0 + ce)
            else:
                z = tl.where(t_ok[:, None], -ce, float("-inf"))
                ez = tl.exp(z - tl.max(z, axis=0)[None, :])
                w = ez / tl.sum(ez, axis=0)[None, :]
        else:
            w = tl.full((T_PAD, ROWS), 1.0, tl.float32)
        w = tl.where(t_ok[:, None] & valid[None, :], w, 0.0)
        total += tl.where(valid, tl.sum(tl.where(w != 0, w * kl, 0.0), axis=0), 0.0)

        coef = w * tl.where(valid, tau / n_valid, 0.0)[None, :]
        tl.store(stats_ptr + rows64, m_s, mask=r_ok)
        tl.store(stats_ptr + N + rows64, log_ds, mask=r_ok)
        lanes = stats_ptr + (2 + lane[:, None]) * N + rows64[None, :]
        tl.store(lanes, m_t, mask=lane_ok)
        tl.store(lanes + T * N, log_dt, mask=lane_ok)
        tl.store(lanes + 2 * T * N, coef, mask=lane_ok)
    tl.store(loss_ptr, tl.sum(total, axis=0) * (tau * tau / n_valid))


@triton.jit
def _mt_kl_small_bwd_kernel(
    s_ptr, t_ptr, stats_ptr, up_ptr, grad_ptr,  # as in _mt_kl_bwd_kernel
    T, N, C, stride_sn, stride_ti, stride_tn, stride_gn, inv_tau,
    TAU_ONE: tl.constexpr, T_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_t = tl.arange(0, T_PAD)
    t_ok = offs_t < T
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    lane = offs_t.to(tl.int64)
    up = tl.load(up_ptr).to(tl.float32)
    for r0 in range(0, N, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        r_ok = rows < N
        rows64 = rows.to(tl.int64)
        lane_ok = t_ok[:, None] & r_ok[None, :]
        m_s = tl.load(stats_ptr + rows64, mask=r_ok, other=0.0)
        log_ds = tl.load(stats_ptr + N + rows64, mask=r_ok, other=0.0)
        lanes = stats_ptr + (2 + lane[:, None]) * N + rows64[None, :]
        m_t = tl.load(lanes, mask=lane_ok, other=0.0)
        log_dt = tl.load(lanes + T * N, mask=lane_ok, other=0.0)
        coef = tl.load(lanes + 2 * T * N, mask=lane_ok, other=0.0) * up  # [T_PAD, ROWS]
        s = tl.load(s_ptr + rows64[:, None] * stride_sn + cols[None, :], mask=r_ok[:, None] & c_ok[None, :],
                    other=float("-inf")).to(tl.float32)
        t_ptrs = t_ptr + lane[:, None, None] * stride_ti + rows64[None, :, None] * stride_tn + cols[None, None, :]
        t = tl.load(t_ptrs, mask=lane_ok[:, :, None] & c_ok[None, None, :], other=float("-inf")).to(tl.float32)
        if not TAU_ONE:
            s = s * inv_tau
            t = t * inv_tau
        q = tl.exp((s - m_s[:, None]) - log_ds[:, None])  # [ROWS, BLOCK_C]
        p = tl.exp((t - m_t[:, :, None]) - log_dt[:, :, None])  # [T_PAD, ROWS, BLOCK_C]
        wp = tl.sum(tl.where(coef[:, :, None] != 0, coef[:, :, None] * p, 0.0), axis=0)
        g = tl.sum(coef, axis=0)[:, None] * q - wp
        tl.store(grad_ptr + rows64[:, None] * stride_gn + cols[None, :], g.to(grad_ptr.dtype.element_ty),
                 mask=r_ok[:, None] & c_ok[None, :])


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


def _options(t_pad: int) -> dict[str, Any]:
    # Left to itself, ptxas 12.8 keeps some specializations at 64-80 registers a thread and spills 4-32
    # bytes around the class loop (T=8 on sm_80; C=1000 or fp64 rows on sm_90), at its default
    # register-usage level and at level 10 alike. An explicit cap lets it use what it needs: 128
    # registers up to 4 teachers (four blocks of 4 warps per SM), 168 for 8 teachers' tile of 8192
    # (at 128 one fp32 build spilled 4 bytes). None of ``python -m fastmt.kernels.aot``'s builds
    # spills. Options the user gives Triton through PTXAS_OPTIONS still apply.
    from triton import knobs

    ptx = " ".join(filter(None, [knobs.nvidia.ptxas_options, "--register-usage-level 10"]))
    return {"ptx_options": ptx, "maxnreg": 128 if t_pad <= 4 else 168}


def kl_config(c: int, num_t: int, itemsize: int = 2) -> tuple[int, int, int]:
    """(T_PAD, BLOCK_C, num_warps) for ``num_t`` teachers over ``c`` classes of ``itemsize`` bytes."""
    t_pad = max(2, triton.next_power_of_2(num_t))
    # The teacher tile held per program: 4096 elements (2048 for float64, loaded as twice the
    # registers) up to 4 teachers, at 4 warps, so that a block of the student row gives every thread
    # at least 16 bytes (8 half-precision elements: one 128-bit load or store). With two copies of the
    # loop body (aligned blocks, masked head and tail), tiles of 8192 reached 255 registers and spilled
    # (``python -m fastmt.kernels.aot``); 8 teachers take 8192 over 8 warps.
    tile = 4096 if itemsize <= 4 else 2048
    num_warps = 4
    if t_pad >= 8:
        tile, num_warps = 2 * tile, 8 if t_pad == 8 else 16
    block_c = max(16, min(triton.next_power_of_2(c), tile // t_pad))
    return t_pad, block_c, num_warps


# Classification sizes go to the one-program kernels: at most 64 classes and 16k student logits
# (8192 rows of 2 classes, 256 of 64).
SMALL_C = 64
SMALL_ELEMS = 1 << 14


def small_config(n: int, c: int, num_t: int, itemsize: int = 4) -> tuple[int, int, int, int] | None:
    """(T_PAD, ROWS, BLOCK_C, num_warps) of the one-launch kernels for these sizes, or None (row kernels)."""
    block_c = max(2, triton.next_power_of_2(c))
    if c > SMALL_C or num_t > 8 or n * block_c > SMALL_ELEMS:
        return None
    t_pad = max(2, triton.next_power_of_2(num_t))
    # Every intermediate of a whole [T_PAD, ROWS, BLOCK_C] block is live at once: 2048 elements over
    # 8 warps (1024 for float64) build without spills; 4096 over 4 warps spilled up to 1.1 kB.
    tile = 2048 if itemsize <= 4 else 1024
    rows = max(2, min(triton.next_power_of_2(n), tile // (t_pad * block_c)))
    return t_pad, rows, block_c, 8


def _aligned(tensors: list[torch.Tensor], row_stride: int, teacher_stride: int, vec: int) -> bool:
    """Whether every row of these tensors starts the same number of elements past a 16-byte boundary
    (host-side metadata only: pointers, strides)."""
    return (all(x.data_ptr() % 16 == 0 for x in tensors) and teacher_stride % vec == 0
            and all(x.stride(-2) == row_stride and x.stride(-1) == 1 for x in tensors if x.dim() >= 2))


def _common(s: torch.Tensor, t: torch.Tensor, temperature: float):
    n, c = s.shape
    num_t = t.shape[0]
    vec = max(1, 16 // s.element_size())
    t_pad, block_c, num_warps = kl_config(c, num_t, max(s.element_size(), t.element_size()))
    return n, c, num_t, vec, t_pad, block_c, num_warps, float(temperature) == 1.0


def kl_launch(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weights: torch.Tensor | None,
    scheme: str | None,
    temperature: float,
    labels: torch.Tensor | None,
    ignore_index: int,
) -> tuple[Launch | None, torch.Tensor, torch.Tensor]:
    """The forward launch for these inputs and its outputs ``(loss, stats)``, allocated but not yet
    written: ``loss`` is per row (``[N]``, to be summed) from the row kernel, the loss itself (``[]``)
    from the one-launch kernel of classification sizes (``small_config``). Nothing runs on the inputs'
    data, so meta tensors give the exact launch without a device. With no rows there is nothing to
    launch: ``(None, zero loss, empty stats)``.
    """
    s = student_logits.contiguous()
    t = teacher_logits.contiguous()
    n, c, num_t, vec, t_pad, block_c, num_warps, tau_one = _common(s, t, temperature)
    stats = torch.empty((2 + 3 * num_t, n), dtype=torch.float32, device=s.device)
    if n == 0:
        return None, s.new_zeros((), dtype=torch.float32), stats
    w = weights.contiguous() if weights is not None else None
    labels = labels.contiguous() if labels is not None else None
    code = _SCHEME_CODE.get(scheme, 0) if w is None else 0
    small = small_config(n, c, num_t, max(s.element_size(), t.element_size()))
    if small is not None:  # one launch: the row count, every row, the loss itself
        t_pad_s, rows, block_cs, warps_s = small
        loss = torch.empty((), dtype=torch.float32, device=s.device)
        args = (s, t, w if w is not None else s, labels if labels is not None else s, loss, stats,
                num_t, n, c, s.stride(0), t.stride(0), t.stride(1), w.stride(0) if w is not None else 0,
                1.0 / temperature, float(temperature), ignore_index)
        constexprs = dict(SCHEME=code, HAS_W=w is not None, HAS_LABELS=labels is not None, TAU_ONE=tau_one,
                          T_PAD=t_pad_s, ROWS=rows, BLOCK_C=block_cs)
        return Launch(_mt_kl_small_fwd_kernel, (1,), args, constexprs, warps_s, _options(t_pad_s)), loss, stats
    row_loss = torch.empty(n, dtype=torch.float32, device=s.device)
    if labels is not None:
        n_valid = (labels != ignore_index).sum().to(torch.float32)
    else:
        n_valid = torch.full((), float(n), dtype=torch.float32, device=s.device)
    args = (
        s, t, w if w is not None else s, labels if labels is not None else s, n_valid, row_loss, stats,
        num_t, n, c, s.stride(0), t.stride(0), t.stride(1), w.stride(0) if w is not None else 0,
        1.0 / temperature, float(temperature), ignore_index,
    )
    constexprs = dict(
        SCHEME=code,
        HAS_W=w is not None, HAS_LABELS=labels is not None, TAU_ONE=tau_one,
        ALIGNED=_aligned([s, t], s.stride(0), t.stride(0), vec), VEC=vec, T_PAD=t_pad, BLOCK_C=block_c,
    )
    launch = Launch(_mt_kl_fwd_kernel, (n,), args, constexprs, num_warps, _options(t_pad))
    return launch, row_loss, stats


def kl_bwd_launch(grad_loss: torch.Tensor, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  stats: torch.Tensor, temperature: float) -> tuple[Launch | None, torch.Tensor]:
    """The backward launch and the gradient it writes (``d out / d student_logits``, student dtype)."""
    s = student_logits.contiguous()
    t = teacher_logits.contiguous()
    n, c, num_t, vec, t_pad, block_c, num_warps, tau_one = _common(s, t, temperature)
    grad = torch.empty_like(s)
    if n == 0:
        return None, grad
    up = grad_loss.reshape(()).to(torch.float32)
    small = small_config(n, c, num_t, max(s.element_size(), t.element_size()))
    if small is not None:
        t_pad_s, rows, block_cs, warps_s = small
        args = (s, t, stats, up, grad, num_t, n, c, s.stride(0), t.stride(0), t.stride(1), grad.stride(0),
                1.0 / temperature)
        constexprs = dict(TAU_ONE=tau_one, T_PAD=t_pad_s, ROWS=rows, BLOCK_C=block_cs)
        return Launch(_mt_kl_small_bwd_kernel, (1,), args, constexprs, warps_s, _options(t_pad_s)), grad
    args = (s, t, stats, up, grad, num_t, n, c, s.stride(0), t.stride(0), t.stride(1), grad.stride(0),
            1.0 / temperature)
    constexprs = dict(TAU_ONE=tau_one, ALIGNED=_aligned([s, t, grad], s.stride(0), t.stride(0), vec), VEC=vec,
                      T_PAD=t_pad, BLOCK_C=block_c)
    return Launch(_mt_kl_bwd_kernel, (n,), args, constexprs, num_warps, _options(t_pad)), grad


def kl_forward(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weights: torch.Tensor | None,
    scheme: str | None,
    temperature: float,
    labels: torch.Tensor | None,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel: (loss, a float32 scalar; the statistics backward reads)."""
    launch, row_loss, stats = kl_launch(student_logits, teacher_logits, weights, scheme, temperature, labels,
                                        ignore_index)
    if launch is None:
        return row_loss, stats
    launch()
    return (row_loss if row_loss.dim() == 0 else row_loss.sum()), stats


def kl_backward(grad_loss, student_logits, teacher_logits, stats, temperature) -> torch.Tensor:
    """Run the backward kernel: ``grad_loss * d loss / d student_logits``."""
    launch, grad = kl_bwd_launch(grad_loss, student_logits, teacher_logits, stats, temperature)
    if launch is not None:
        launch()
    return grad


# ---------------------------------------------------------------------------------------------------
# torch.library ops: opaque to torch.compile (no graph break), differentiable through register_autograd.


@torch.library.custom_op("fastmt::mt_kl_forward", mutates_args=())
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
    n = student_logits.shape[0]
    return (student_logits.new_empty((), dtype=torch.float32),
            student_logits.new_empty((2 + 3 * teacher_logits.shape[0], n), dtype=torch.float32))


@torch.library.custom_op("fastmt::mt_kl_backward", mutates_args=())
def mt_kl_bwd_op(grad_loss: torch.Tensor, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 stats: torch.Tensor, temperature: float) -> torch.Tensor:
    return kl_backward(grad_loss, student_logits, teacher_logits, stats, temperature)


@mt_kl_bwd_op.register_fake
def _(grad_loss, student_logits, teacher_logits, stats, temperature):
    return student_logits.new_empty(student_logits.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], output[1])
    ctx.temperature = inputs[5]


def _backward(ctx, grad_loss, grad_stats):
    s, t, stats = ctx.saved_tensors
    return mt_kl_bwd_op(grad_loss, s, t, stats, ctx.temperature), None, None, None, None, None, None


mt_kl_op.register_autograd(_backward, setup_context=_setup)


def scheme_code(weights) -> int:
    return _SCHEME_CODE[weights] if isinstance(weights, str) else 0


assert set(_SCHEME_CODE) == set(SCHEMES)
