"""Fused multi-teacher softmax-KL: ``fastmt.losses.mt_kl_loss`` in one pass over memory.

Row kernel (``_mt_kl_kernel``), persistent programs, each taking rows in turn. Per row:

1. the student's base-2 log-sum-exp, in one sweep of the row;
2. each teacher in turn (a loop over teachers, so three teachers cost three, not a padded four):
   its log-sum-exp and ``KL(p_i || q)`` in one online sweep against the student's log-probabilities
   (or, where a teacher cache already holds the teacher's log-sum-exps, only the KL sum), and the
   untempered log-sum-exp the per-example weights (paper / softmax) need;
3. the weights and the row's loss; in training, the gradient ``d loss / d s = sum_i coef_i (q - p_i)``
   in a second sweep, written in the forward while the row is still in L2: the launcher sizes the
   grid so that the rows in flight fit there. Backward (``_mt_kl_scale_kernel``) only scales that
   gradient by the upstream gradient, in place, and skips even that when the upstream gradient is 1.

Logits are scaled to base 2 by one multiply (``log2(e) / temperature``) folded into the FMA that
subtracts the running maximum, and exponentiated with ``exp2``. A block is a ``[ROWS, VEC]`` tile
with ``VEC`` consecutive columns (16 bytes) per thread, so the running maxima and sums are folded
within each thread; threads combine once per row, never in the column loops.

HBM traffic per row in training: (1 + T) x C logits read once, C gradient elements written once (the
sweeps after the first read from L2).

Loads are 16 bytes wide where the rows allow it (``ALIGNED``): when every row of the student, the
teachers and the gradient starts at the same offset from a 16-byte boundary (contiguous rows of one
width, 16-byte-aligned bases, teacher blocks a multiple of 16 bytes apart), each row is cut into a
short unaligned head, whole unmasked blocks that start on a 16-byte boundary, and a tail; only head
and tail are masked element by element.

Classification sizes (``_mt_kl_small_kernel``): one program computes the row count, every row's loss
and gradient, a block of rows at a time, in one launch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl
from triton import knobs

from fastmt.kernels.launch import Launch  # noqa: F401 (kl.Launch: the launchers' return type)
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
def _edge_cols(e0, lead, n_main, n_edge, idx, ALIGNED: tl.constexpr):
    """Columns of one block of the head-and-tail elements (``idx``: the block's element indices),
    and which of them exist."""
    j = e0 + idx
    if ALIGNED:
        cols = tl.where(j < lead, j, j + n_main)
    else:
        cols = j
    return cols, j < n_edge


# A block is a [ROWS, VEC] tile: VEC consecutive columns (16 bytes) per thread, so every statistic
# below is first folded within a thread (no shuffles, no barriers in the column loops) into per-lane
# running values of shape [ROWS], and the lanes are combined once per row.
#
# Logits are scaled to base 2 by one multiply, k = log2(e) / temperature, folded into the FMA that
# subtracts the running maximum: 2^(t k - m) = exp((t - max t) / temperature). Running maxima are
# kept on the raw logits (the scaled maximum is then exactly the scaled maximal element). A rescale
# between two maxima is always (r_old - r_new) k, never r_old k - m_new: a GPU build contracts the
# latter into one FMA that keeps the rounding error of m_new = r_new k, and at the floor _NEG
# (a lane that has seen only masked columns, |r k| ~ 1e30) that error is ~1e22, so 2^error overflowed
# and 0 * inf made the loss NaN on an H200 (rows shorter than one block); the interpreter never fuses.


@triton.jit
def _fold_student(s, k, r, d):
    """Fold a block of student logits into per-lane (raw maximum, sum of 2^(s k - r k))."""
    r_new = tl.maximum(r, tl.max(s, axis=1))
    m_new = r_new * k
    d = d * tl.exp2((r - r_new) * k) + tl.sum(tl.exp2(s * k - m_new[:, None]), axis=1)
    return r_new, d


@triton.jit
def _fold_teacher(t, lq, k, tau, r, d, a, u, NEED_U: tl.constexpr):
    """Fold a block of one teacher's logits (``lq``: the student's base-2 log-probabilities there)
    into per-lane running values: raw maximum ``r``, ``d = sum 2^z``, ``a = sum 2^z (z - lq)`` with
    ``z = t k - r k`` (base-2 log-probabilities up to the lane's normaliser), and, for the teacher
    weights at a temperature other than 1, the untempered ``u = sum 2^(temperature z)``."""
    r_new = tl.maximum(r, tl.max(t, axis=1))
    m_new = r_new * k
    delta = (r_new - r) * k  # >= 0: how far the lane's maximum moved, base 2
    rescale = tl.exp2(-delta)
    z = t * k - m_new[:, None]
    e = tl.exp2(z)
    # p = 0 (a -inf teacher logit) contributes nothing, even where the student's lq is -inf too.
    a = (a - delta * d) * rescale + tl.sum(tl.where(e > 0, e * (z - lq), 0.0), axis=1)
    d = d * rescale + tl.sum(e, axis=1)
    if NEED_U:
        u = u * tl.exp2(-tau * delta) + tl.sum(tl.exp2(tau * z), axis=1)
    return r_new, d, a, u


@triton.jit
def _fold_known(t, lq, k, L, a):
    """With the teacher's base-2 log-sum-exp ``L`` known: ``a += sum p (lp - lq)``, ``lp = t k - L``."""
    lp = t * k - L
    p = tl.exp2(lp)
    return a + tl.sum(tl.where(p > 0, p * (lp - lq), 0.0), axis=1)


@triton.jit
def _mt_kl_kernel(
    s_ptr,  # [N, C] student logits
    t_ptr,  # [T, N, C] teacher logits
    w_ptr,  # [T, N] teacher weights (read when HAS_W)
    y_ptr,  # [N] labels (read when HAS_LABELS)
    lse_ptr,  # [2, T, N] float32: the teachers' tempered and untempered log-sum-exps (read when HAS_LSE)
    nvalid_ptr,  # [] float32: rows that count in the mean
    loss_ptr,  # [N] float32: each row's share of the loss
    grad_ptr,  # [N, C] d loss / d student logits, student dtype (written when WRITE_GRAD)
    work_ptr,  # [N, 2, T_PAD] float32: per row, each teacher's log-sum-exp and gradient coefficient
    N,
    C,
    stride_sn,
    stride_ti,
    stride_tn,
    stride_wi,
    stride_gn,
    k,  # log2(e) / temperature
    tau,  # temperature
    ignore_index,
    T: tl.constexpr,
    SCHEME: tl.constexpr,  # 0 tensor/none, 1 paper, 2 softmax, 3 uniform
    HAS_W: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_LSE: tl.constexpr,  # the teachers' statistics come from the caller (a teacher cache)
    WRITE_GRAD: tl.constexpr,  # training: the gradient, made while the row is on chip or in L2
    TAU_ONE: tl.constexpr,  # temperature == 1: the weights' log-sum-exp is the KL's
    ALIGNED: tl.constexpr,  # rows share their offset from a 16-byte boundary (see the module doc)
    VEC: tl.constexpr,  # elements in 16 bytes
    T_PAD: tl.constexpr,  # next power of two >= T (per-row scalars only; no tile is padded)
    ROWS: tl.constexpr,  # a block is [ROWS, VEC]
):
    BLOCK_C: tl.constexpr = ROWS * VEC
    NEED_U: tl.constexpr = (SCHEME == 1 or SCHEME == 2) and not HAS_W and not TAU_ONE and not HAS_LSE
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    idx = tl.arange(0, ROWS)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    offs_t = tl.arange(0, T_PAD)
    t_ok = offs_t < T
    n_valid = tl.maximum(tl.load(nvalid_ptr), 1.0)
    sti = stride_ti + tl.zeros((), tl.int64)  # 64-bit teacher offsets, whatever the stride's type

    # Persistent programs: the launcher sizes the grid so the rows in flight fit in L2, where the
    # gradient sweep finds them again.
    for r in range(tl.program_id(0), N, tl.num_programs(0)):
        row = r + tl.zeros((), tl.int64)
        lead, n_main = _row_split(row, stride_sn, C, ALIGNED, VEC, BLOCK_C)
        n_edge = C - n_main
        s_row = s_ptr + row * stride_sn
        s_al = s_ptr + tl.multiple_of(row * stride_sn + lead, VEC)

        valid = True
        y = 0
        if HAS_LABELS:
            y = tl.load(y_ptr + row).to(tl.int64)
            valid = y != ignore_index
            # Not range-checked on the host (that would sync): clamp so a bad label cannot read out of bounds.
            y = tl.minimum(tl.maximum(tl.where(valid, y, 0), 0), C - 1)

        # ---- sweep 1a: the student's base-2 log-sum-exp
        rs = tl.full((ROWS,), _NEG, tl.float32)
        ds = tl.zeros((ROWS,), tl.float32)
        if ALIGNED:  # whole blocks from a 16-byte boundary: unmasked, 16-byte loads
            for c0 in range(0, n_main, BLOCK_C):
                rs, ds = _fold_student(tl.load(s_al + c0 + idx).to(tl.float32), k, rs, ds)
        for e0 in range(0, n_edge, BLOCK_C):  # head and tail (the whole row without ALIGNED), masked
            cols, ok = _edge_cols(e0, lead, n_main, n_edge, idx, ALIGNED)
            rs, ds = _fold_student(tl.load(s_row + cols, mask=ok, other=float("-inf")).to(tl.float32), k, rs, ds)
        r_max = tl.max(rs, axis=0)
        Ls = r_max * k + tl.log2(tl.sum(ds * tl.exp2((rs - r_max) * k), axis=0))

        # ---- sweep 1b: each teacher in turn (no padded lane), against the student's log-probabilities
        kl_t = tl.zeros((T_PAD,), tl.float32)  # KL(p_i || q), nats
        lse_t = tl.zeros((T_PAD,), tl.float32)  # tempered log-sum-exp, base 2
        ce_t = tl.zeros((T_PAD,), tl.float32)  # cross-entropy with the label, untempered, nats
        for i in range(T):
            t_row = t_ptr + i * sti + row * stride_tn
            t_al = t_ptr + tl.multiple_of(i * sti + row * stride_tn + lead, VEC)
            a = tl.zeros((ROWS,), tl.float32)
            if HAS_LSE:
                L = tl.load(lse_ptr + i * N + row) * LOG2E
                if ALIGNED:
                    for c0 in range(0, n_main, BLOCK_C):
                        lq = tl.load(s_al + c0 + idx).to(tl.float32) * k - Ls
                        a = _fold_known(tl.load(t_al + c0 + idx).to(tl.float32), lq, k, L, a)
                for e0 in range(0, n_edge, BLOCK_C):
                    cols, ok = _edge_cols(e0, lead, n_main, n_edge, idx, ALIGNED)
                    lq = tl.load(s_row + cols, mask=ok, other=float("-inf")).to(tl.float32) * k - Ls
                    t = tl.load(t_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
                    a = _fold_known(t, lq, k, L, a)
                kl_i = tl.sum(a, axis=0)
                ce_i = tl.load(lse_ptr + (T + i) * N + row)
            else:
                rt = tl.full((ROWS,), _NEG, tl.float32)
                d = tl.zeros((ROWS,), tl.float32)
                u = tl.zeros((ROWS,), tl.float32)
                if ALIGNED:
                    for c0 in range(0, n_main, BLOCK_C):
                        lq = tl.load(s_al + c0 + idx).to(tl.float32) * k - Ls
                        t = tl.load(t_al + c0 + idx).to(tl.float32)
                        rt, d, a, u = _fold_teacher(t, lq, k, tau, rt, d, a, u, NEED_U)
                for e0 in range(0, n_edge, BLOCK_C):
                    cols, ok = _edge_cols(e0, lead, n_main, n_edge, idx, ALIGNED)
                    lq = tl.load(s_row + cols, mask=ok, other=float("-inf")).to(tl.float32) * k - Ls
                    t = tl.load(t_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
                    rt, d, a, u = _fold_teacher(t, lq, k, tau, rt, d, a, u, NEED_U)
                # Combine the lanes against the row's maximum.
                t_max = tl.max(rt, axis=0)
                delta = (t_max - rt) * k
                scale = tl.exp2(-delta)
                dsum = tl.sum(d * scale, axis=0)
                kl_i = tl.sum((a - delta * d) * scale, axis=0) / dsum - tl.log2(dsum)
                L = t_max * k + tl.log2(dsum)
                # The untempered log-sum-exp (nats) for the weights; the tempered one at temperature 1.
                if NEED_U:
                    ce_i = t_max + tl.log(tl.sum(u * tl.exp2(-tau * delta), axis=0))
                else:
                    ce_i = t_max + tl.log(dsum)
            if (SCHEME == 1 or SCHEME == 2) and not HAS_W:
                ce_i = ce_i - tl.load(t_ptr + i * sti + row * stride_tn + y).to(tl.float32)
            here = offs_t == i
            kl_t = tl.where(here, kl_i * LN2, kl_t)
            lse_t = tl.where(here, L, lse_t)
            ce_t = tl.where(here, ce_i, ce_t)

        # ---- teacher weights, the row's loss
        if HAS_W:
            w = tl.load(w_ptr + offs_t.to(tl.int64) * stride_wi + row, mask=t_ok, other=0.0).to(tl.float32)
        elif SCHEME == 1:
            w = 1.0 / (1.0 + ce_t)
        elif SCHEME == 2:
            z = tl.where(t_ok, -ce_t, float("-inf"))
            ez = tl.exp(z - tl.max(z, axis=0))
            w = ez / tl.sum(ez, axis=0)
        else:
            w = tl.full((T_PAD,), 1.0, tl.float32)
        w = tl.where(t_ok & valid, w, 0.0)
        row_loss = tl.sum(tl.where(w != 0, w * kl_t, 0.0), axis=0) * (tau * tau / n_valid)
        tl.store(loss_ptr + row, tl.where(valid, row_loss, 0.0))

        # ---- sweep 2: d loss / d s_c = sum_i coef_i (q_c - p_ic), coef_i = w_i tau / n_valid, while
        # the row is still in L2
        if WRITE_GRAD:
            coef = w * tl.where(valid, tau / n_valid, 0.0)
            coef_sum = tl.sum(coef, axis=0)
            work = work_ptr + row * (2 * T_PAD)
            tl.store(work + offs_t, lse_t)
            tl.store(work + T_PAD + offs_t, coef)
            tl.debug_barrier()  # the per-teacher scalars, read below by every thread
            g_row = grad_ptr + row * stride_gn
            if ALIGNED:
                g_al = grad_ptr + tl.multiple_of(row * stride_gn + lead, VEC)
                for c0 in range(0, n_main, BLOCK_C):
                    g = coef_sum * tl.exp2(tl.load(s_al + c0 + idx).to(tl.float32) * k - Ls)
                    for j in tl.static_range(T):
                        t_al = t_ptr + tl.multiple_of(j * sti + row * stride_tn + lead, VEC)
                        t = tl.load(t_al + c0 + idx).to(tl.float32)
                        g -= tl.load(work + T_PAD + j) * tl.exp2(t * k - tl.load(work + j))
                    tl.store(g_al + c0 + idx, g.to(grad_ptr.dtype.element_ty))
            for e0 in range(0, n_edge, BLOCK_C):
                cols, ok = _edge_cols(e0, lead, n_main, n_edge, idx, ALIGNED)
                s = tl.load(s_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
                g = coef_sum * tl.exp2(s * k - Ls)
                for j in tl.static_range(T):
                    t = tl.load(t_ptr + j * sti + row * stride_tn + cols, mask=ok, other=float("-inf"))
                    g -= tl.load(work + T_PAD + j) * tl.exp2(t.to(tl.float32) * k - tl.load(work + j))
                tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=ok)
            tl.debug_barrier()  # nothing of this row's scratch is rewritten before every thread read it


@triton.jit
def _mt_kl_scale_kernel(grad_ptr, up_ptr, done_ptr, numel, BLOCK: tl.constexpr):
    """``grad *= up / done``, skipped entirely when the upstream gradient is the one already applied
    (1 after the forward: the common case of a loss used as it is)."""
    up = tl.load(up_ptr).to(tl.float32)
    done = tl.load(done_ptr)
    if up != done:
        factor = up / done
        offs = tl.arange(0, BLOCK)
        for start in range(tl.program_id(0) * BLOCK, numel, tl.num_programs(0) * BLOCK):
            o = start + offs
            ok = o < numel
            g = tl.load(grad_ptr + o, mask=ok, other=0.0).to(tl.float32)
            tl.store(grad_ptr + o, (g * factor).to(grad_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------------
# Classification sizes (C <= SMALL_C, few rows): one program, all rows, a block of rows at a time.


@triton.jit
def _mt_kl_small_kernel(
    s_ptr, t_ptr, w_ptr, y_ptr, lse_ptr,  # as in _mt_kl_kernel
    loss_ptr,  # [] float32: the loss itself
    grad_ptr,  # [N, C], as in _mt_kl_kernel
    T, N, C, stride_sn, stride_ti, stride_tn, stride_wi, stride_gn, inv_tau, tau, ignore_index,
    SCHEME: tl.constexpr, HAS_W: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_LSE: tl.constexpr,
    WRITE_GRAD: tl.constexpr, TAU_ONE: tl.constexpr, T_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The whole loss (and its gradient) in one launch: counts the rows that count, then takes
    ``ROWS`` rows at a time as a ``[T_PAD, ROWS, BLOCK_C]`` tile (a whole row per block: no online
    rescaling; the gradient is written from the same tile)."""
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
        lane_ok = t_ok[:, None] & r_ok[None, :]
        lse_at = lse_ptr + lane[:, None] * N + rows64[None, :]
        if HAS_LSE:  # the normaliser is known: exp(ts - m_t) is p itself
            m_t = tl.load(lse_at, mask=lane_ok, other=0.0)
        else:
            m_t = tl.maximum(tl.max(ts, axis=2), _NEG)  # [T_PAD, ROWS]
        zt = ts - m_t[:, :, None]
        e = tl.exp(zt)
        # p_t = 0 (a -inf teacher logit) contributes nothing, even where s is -inf too.
        a_t = tl.sum(tl.where(e > 0, e * (zt - zs[None, :, :]), 0.0), axis=2)
        if HAS_LSE:
            d_safe = tl.full((T_PAD, ROWS), 1.0, tl.float32)
            log_dt = tl.zeros((T_PAD, ROWS), tl.float32)
        else:
            d_safe = tl.where(lane_ok, tl.sum(e, axis=2), 1.0)
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
            if HAS_LSE:
                m_u = tl.load(lse_at + T * N, mask=lane_ok, other=0.0)
                log_du = tl.zeros((T_PAD, ROWS), tl.float32)
            elif TAU_ONE:
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

        if WRITE_GRAD:  # d loss / d s_c = sum_i coef_i (q_c - p_ic), coef_i = w_i tau / n_valid
            coef = w * tl.where(valid, tau / n_valid, 0.0)[None, :]
            q = tl.exp(zs - log_ds[:, None])  # [ROWS, BLOCK_C]
            p = tl.exp(zt - log_dt[:, :, None])  # [T_PAD, ROWS, BLOCK_C]
            wp = tl.sum(tl.where(coef[:, :, None] != 0, coef[:, :, None] * p, 0.0), axis=0)
            g = tl.sum(coef, axis=0)[:, None] * q - wp
            tl.store(grad_ptr + rows64[:, None] * stride_gn + cols[None, :], g.to(grad_ptr.dtype.element_ty),
                     mask=r_ok[:, None] & c_ok[None, :])
    tl.store(loss_ptr, tl.sum(total, axis=0) * (tau * tau / n_valid))






def _options(t_pad: int, roomy: bool = False) -> dict[str, Any]:
    # Left to itself, ptxas 12.8 kept some specializations of the earlier kernels at 64-80 registers
    # a thread and spilled 4-32 bytes around the class loop, at its default register-usage level and
    # at level 10 alike. An explicit cap lets it use what it needs. ``roomy``: 168 at any T, for the
    # one-program kernel (occupancy is moot) and the row kernel's unaligned rows (their head and tail
    # masks spilled 120-128 B on sm_80 at 128) and float64 inputs (twice the registers a value; Triton
    # 3.9 spilled 4 B on sm_90 at 128). None of ``python -m fastmt.tools.aot``'s builds spills. Options the user gives Triton through PTXAS_OPTIONS still apply.
    ptx = " ".join(filter(None, [knobs.nvidia.ptxas_options, "--register-usage-level 10"]))
    return {"ptx_options": ptx, "maxnreg": 128 if t_pad <= 4 and not roomy else 168}


# Vectors of 16 bytes each thread takes per block: two loads in flight per tensor and thread.
VECTORS_PER_THREAD = 1


def kl_config(c: int, itemsize: int = 2) -> tuple[int, int, int]:
    """(ROWS, VEC, num_warps) of the row kernel for rows of ``c`` elements of ``itemsize`` bytes: a
    block is ``[ROWS, VEC]``, 16 bytes per thread and row of it. Long rows take 8 warps (more bytes in
    flight per program: the grid is held to what L2 can keep), short ones 4."""
    vec = max(1, 16 // itemsize)
    num_warps = 8 if c >= 8192 else 4
    rows = max(1, min(32 * num_warps * VECTORS_PER_THREAD, triton.next_power_of_2(triton.cdiv(c, vec))))
    return rows, vec, num_warps


# The sm_90 figures (H100/H200: 132 SMs, 50 MiB L2) stand in where no GPU says its own: the CPU
# interpreter and the ahead-of-time build take the same grid a GPU would.
DEFAULT_SMS = 132
DEFAULT_L2 = 50 * 1024 * 1024
# Share of L2 the rows in flight may fill (the rest: the teachers' other traffic, the gradient's
# write-back, whatever else runs).
L2_SHARE = 0.6
# The fewest programs per SM, whatever L2 holds: rows of a 128k vocabulary in float32 (2 MB each with
# two teachers and the gradient) would otherwise get 18 programs on 132 SMs.
MIN_PROGRAMS_PER_SM = 2


def _device_caps(device: torch.device) -> tuple[int, int]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.multi_processor_count, int(getattr(props, "L2_cache_size", DEFAULT_L2))
    return DEFAULT_SMS, DEFAULT_L2


def kl_programs(n: int, row_bytes: int, device: torch.device, num_warps: int = 4) -> int:
    """Programs of the persistent row kernel: as many rows in flight as fit in ``L2_SHARE`` of L2
    (each is read once from HBM, then again from L2 by the gradient sweep), but never fewer than
    ``MIN_PROGRAMS_PER_SM`` per SM (one program cannot keep an SM's loads in flight: long rows, whose
    second sweep then comes from HBM, are still read at the memory's pace), at most what the SMs hold
    at once (2048 threads each), at most one per row."""
    sms, l2 = _device_caps(device)
    by_l2 = int(L2_SHARE * l2) // max(1, row_bytes)
    resident = sms * max(1, 2048 // (32 * num_warps))
    return max(1, min(n, max(by_l2, MIN_PROGRAMS_PER_SM * sms), resident))


# Classification sizes go to the one-program kernel: at most 64 classes and 16k student logits
# (8192 rows of 2 classes, 256 of 64).
SMALL_C = 64
SMALL_ELEMS = 1 << 14


def small_config(n: int, c: int, num_t: int, itemsize: int = 4) -> tuple[int, int, int, int] | None:
    """(T_PAD, ROWS, BLOCK_C, num_warps) of the one-launch kernel for these sizes, or None (row kernel)."""
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


def grad_dtype(student_dtype: torch.dtype) -> torch.dtype:
    """The dtype the forward writes the student's gradient in."""
    return torch.float32 if student_dtype == torch.float16 else student_dtype


def kl_launch(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weights: torch.Tensor | None,
    scheme: str | None,
    temperature: float,
    labels: torch.Tensor | None,
    ignore_index: int,
    teacher_lse: torch.Tensor | None = None,
    with_grad: bool = False,
    count: torch.Tensor | None = None,
) -> tuple[Launch | None, torch.Tensor, torch.Tensor | None]:
    """The launch for these inputs and its outputs ``(loss, grad)``, allocated but not yet written:
    ``loss`` is per row (``[N]``, to be summed) from the row kernel, the loss itself (``[]``) from the
    one-launch kernel of classification sizes (``small_config``); ``grad`` (``d loss / d
    student_logits``, student dtype) when ``with_grad``, else None. ``teacher_lse`` (``[2, T, N]``
    float32: the teachers' log-sum-exps at the temperature and at 1, ``fastmt.losses.teacher_lse``)
    skips computing them. ``count`` (a float32 scalar tensor): the number of rows the loss is averaged
    over, when these rows are one chunk of a larger batch (the row kernel then divides by it instead
    of by this chunk's counted rows). Nothing runs on the inputs' data, so meta tensors give the exact launch
    without a device. With no rows there is nothing to launch: ``(None, zero loss, grad)``.
    """
    s = student_logits.contiguous()
    t = teacher_logits.contiguous()
    n, c = s.shape
    num_t = t.shape[0]
    # float16 keeps its gradient in float32 until backward: made for an upstream gradient of 1, small
    # entries would underflow float16 before a loss scaler's factor reaches them.
    grad = torch.empty(s.shape, dtype=grad_dtype(s.dtype), device=s.device) if with_grad else None
    if n == 0:
        return None, s.new_zeros((), dtype=torch.float32), grad
    w = weights.contiguous() if weights is not None else None
    labels = labels.contiguous() if labels is not None else None
    lse = teacher_lse.contiguous() if teacher_lse is not None else None
    code = _SCHEME_CODE.get(scheme, 0) if w is None else 0
    tau_one = float(temperature) == 1.0
    itemsize = max(s.element_size(), t.element_size())
    g = grad if grad is not None else s
    flags = dict(SCHEME=code, HAS_W=w is not None, HAS_LABELS=labels is not None, HAS_LSE=lse is not None,
                 WRITE_GRAD=with_grad, TAU_ONE=tau_one)
    small = small_config(n, c, num_t, itemsize) if count is None else None
    if small is not None:  # one launch: the row count, every row, the loss itself
        t_pad, rows, block_c, warps = small
        loss = torch.empty((), dtype=torch.float32, device=s.device)
        args = (s, t, w if w is not None else s, labels if labels is not None else s, lse if lse is not None else s,
                loss, g, num_t, n, c, s.stride(0), t.stride(0), t.stride(1), w.stride(0) if w is not None else 0,
                g.stride(0), 1.0 / temperature, float(temperature), ignore_index)
        constexprs = dict(flags, T_PAD=t_pad, ROWS=rows, BLOCK_C=block_c)
        return Launch(_mt_kl_small_kernel, (1,), args, constexprs, warps, _options(t_pad, True)), loss, grad
    rows, vec, num_warps = kl_config(c, itemsize)
    t_pad = max(2, triton.next_power_of_2(num_t))
    row_loss = torch.empty(n, dtype=torch.float32, device=s.device)
    work = torch.empty((n, 2, t_pad) if with_grad else (1,), dtype=torch.float32, device=s.device)
    if count is not None:
        n_valid = count.reshape(()).to(torch.float32)
    elif labels is not None:
        n_valid = (labels != ignore_index).sum().to(torch.float32)
    else:
        n_valid = torch.full((), float(n), dtype=torch.float32, device=s.device)
    row_bytes = c * (s.element_size() + num_t * t.element_size() + (s.element_size() if with_grad else 0))
    args = (
        s, t, w if w is not None else s, labels if labels is not None else s, lse if lse is not None else s,
        n_valid, row_loss, g, work,
        n, c, s.stride(0), t.stride(0), t.stride(1), w.stride(0) if w is not None else 0, g.stride(0),
        math.log2(math.e) / temperature, float(temperature), ignore_index,
    )
    aligned = _aligned([s, t] + ([grad] if grad is not None else []), s.stride(0), t.stride(0), vec)
    constexprs = dict(T=num_t, **flags, ALIGNED=aligned, VEC=vec, T_PAD=t_pad, ROWS=rows)
    grid = (kl_programs(n, row_bytes, s.device, num_warps),)
    return Launch(_mt_kl_kernel, grid, args, constexprs, num_warps, _options(t_pad, not aligned or s.element_size() == 8)), row_loss, grad


SCALE_BLOCK = 4096


def kl_scale_launch(grad: torch.Tensor, grad_loss: torch.Tensor, done: torch.Tensor) -> Launch | None:
    """The backward's launch: ``grad *= grad_loss / done`` in place (``done``: the upstream gradient
    already applied, 1 after the forward), a no-op on the device when they are equal."""
    if grad.numel() == 0:
        return None
    up = grad_loss.reshape(())
    sms, _ = _device_caps(grad.device)
    grid = (max(1, min(triton.cdiv(grad.numel(), SCALE_BLOCK), 4 * sms)),)
    return Launch(_mt_kl_scale_kernel, grid, (grad, up, done, grad.numel()), dict(BLOCK=SCALE_BLOCK), 4)


def kl_forward(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weights: torch.Tensor | None,
    scheme: str | None,
    temperature: float,
    labels: torch.Tensor | None,
    ignore_index: int,
    teacher_lse: torch.Tensor | None = None,
    with_grad: bool = False,
    count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the kernel: (loss, a float32 scalar; ``d loss / d student_logits`` when ``with_grad``)."""
    launch, row_loss, grad = kl_launch(student_logits, teacher_logits, weights, scheme, temperature, labels,
                                       ignore_index, teacher_lse, with_grad, count)
    if launch is None:
        return row_loss, grad
    launch()
    return (row_loss if row_loss.dim() == 0 else row_loss.sum()), grad


def kl_scale_(grad: torch.Tensor, grad_loss: torch.Tensor, done: torch.Tensor) -> None:
    """Scale the forward's gradient by the upstream gradient, in place; ``done`` records it."""
    launch = kl_scale_launch(grad, grad_loss, done)
    if launch is not None:
        launch()
    done.copy_(grad_loss.reshape(()).to(torch.float32))


# ---------------------------------------------------------------------------------------------------
# torch.library ops: opaque to torch.compile (no graph break), differentiable through register_autograd.


@torch.library.custom_op("fastmt::mt_kl_forward", mutates_args=())
def mt_kl_op(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weights: torch.Tensor | None,
    labels: torch.Tensor | None,
    teacher_lse: torch.Tensor | None,
    scheme: str | None,
    temperature: float,
    ignore_index: int,
    with_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, gradient or an empty tensor, the upstream gradient applied to it so far: 1). ``scheme``:
    the weighting's name, or None with a ``weights`` tensor (or none: 1); the launch turns it into
    the kernel's constexpr, in one place."""
    loss, grad = kl_forward(student_logits, teacher_logits, weights, scheme, temperature, labels, ignore_index,
                            teacher_lse, with_grad)
    done = torch.ones((), dtype=torch.float32, device=student_logits.device)
    return loss, grad if grad is not None else student_logits.new_empty((0,), dtype=grad_dtype(student_logits.dtype)), done


@mt_kl_op.register_fake
def _(student_logits, teacher_logits, weights, labels, teacher_lse, scheme, temperature, ignore_index, with_grad):
    return (student_logits.new_empty((), dtype=torch.float32),
            student_logits.new_empty(student_logits.shape if with_grad else (0,), dtype=grad_dtype(student_logits.dtype)),
            student_logits.new_empty((), dtype=torch.float32))


@torch.library.custom_op("fastmt::mt_kl_scale_grad_", mutates_args=("grad", "done"))
def mt_kl_scale_op(grad: torch.Tensor, done: torch.Tensor, grad_loss: torch.Tensor) -> None:
    kl_scale_(grad, grad_loss, done)


@mt_kl_scale_op.register_fake
def _(grad, done, grad_loss):
    return None


def _setup(ctx, inputs, output):
    ctx.with_grad = inputs[8]
    ctx.dtype = inputs[0].dtype
    ctx.save_for_backward(output[1], output[2])


def _backward(ctx, grad_loss, grad_grad, grad_done):
    # The gradient was made in the forward for an upstream gradient of 1 (``done``); scale it in
    # place, once: a second backward through the same graph rescales from what the first applied.
    grad, done = ctx.saved_tensors
    if not ctx.with_grad:  # the student's logits did not ask for one (fastmt.kernels.mt_kl_loss decides)
        return None, None, None, None, None, None, None, None, None
    if grad.dtype != ctx.dtype:  # float16, kept in float32: one rounding, with the upstream gradient in it
        return (grad * grad_loss).to(ctx.dtype), None, None, None, None, None, None, None, None
    if torch.compiler.is_compiling():  # traced into the compiled backward: Inductor scales it in place
        mt_kl_scale_op(grad, done, grad_loss)
        return grad, None, None, None, None, None, None, None, None
    # Eager: the gradient handed back is the saved buffer itself (no copy), and autograd may keep it
    # as a leaf's ``.grad`` and add to it: a second backward through this graph would read that.
    if getattr(ctx, "handed_out", False):
        raise RuntimeError(
            "the fused KL loss hands its gradient buffer to the first backward (no copy); a second backward "
            "through the same graph (retain_graph=True) cannot be taken from it. Run the forward again, or "
            "use the reference loss (fastmt.losses.mt_kl_loss) where a graph must be walked twice.")
    ctx.handed_out = True
    mt_kl_scale_op(grad.data, done.data, grad_loss)  # .data: the saved tensors' versions stay valid
    return grad, None, None, None, None, None, None, None, None


mt_kl_op.register_autograd(_backward, setup_context=_setup)


assert set(_SCHEME_CODE) == set(SCHEMES)
