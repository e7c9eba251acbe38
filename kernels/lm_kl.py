"""Output layer + multi-teacher KL for causal language models, without ``tokens x vocab`` logits.

``fastmt.losses.lm_linear_kl_loss`` forms the student's logits ``hs [N,D] @ ws [V,D]^T`` and each
teacher's ``ht_i @ wt_i^T`` and takes the token-level multi-teacher KL of them. Here no ``N x V``
tensor is made for the student or any teacher:

1. ``_lm_stats_kernel``: a program per block of ``BN`` rows walks the vocabulary in tiles of ``BV``
   columns. Each tile's logits are one ``[BN, D] x [D, BV]`` product per model on tensor cores
   (``tl.dot``), folded at once into per-row online statistics: the student's tempered log-sum-exp,
   each teacher's tempered (and, for the weights, untempered) log-sum-exp, and the running sum that
   becomes the KL: ``sum_v p_iv (a_iv - a_sv)`` for the forward KL, ``sum_v q_v (a_sv - a_iv)`` for the
   reverse one (``a``: logits over the temperature). Out: ``[1 + 4T, N]`` float32.
2. The teacher weights (``paper``, ``softmax``, ``uniform``, a tensor) and the loss, from those
   ``[T, N]`` numbers in torch; a teacher's logit at the next token is one row of its output matrix
   dotted with its hidden state, not a column of logits.
3. Training: rows in chunks whose gradient block ``G [rows, V]`` fits ``chunk_bytes``.
   ``_lm_grad_kernel`` (a program per ``BN x BV`` tile) recomputes the tile's logits and writes
   ``G = sum_i w_i (q - p_i)`` (forward KL) or ``sum_i w_i q (log q - log p_i - KL_i)`` (reverse);
   then ``d hs = G ws`` for the chunk's rows and ``d ws += G^T hs``, two GEMMs that write each output
   element once: no atomics. Both are scaled by ``temperature / counted rows`` at the end.

Teachers are given stacked, ``[T, N, Dt]`` and ``[T, V, Dt]``; ``stack_teachers`` pads teachers of
different widths with zero columns (exactly the same logits). The output matrices may be tied to the
input embeddings: the gradient for ``ws`` is returned like any other and autograd adds the lookup's.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastmt.kernels.hidden_mse import dot_plan
from fastmt.kernels.launch import Launch
from fastmt.kernels.lm_common import CHUNK_BYTES, stack_teachers  # noqa: F401 (lm_kl.stack_teachers)

# Floor for running maxima (see kl.py): rescales are always 2^(m_old - m_new) of two stored maxima,
# never a product minus a maximum, which a GPU build contracts into an FMA that keeps a rounding error.
_NEG = tl.constexpr(-1.0e30)
# One stage (no software pipelining of the width loop: the tiles' registers go to the per-row
# statistics) and an explicit cap: at ptxas's own choice some float32 builds spilled 4-8 B at
# ~176 registers; with 232 none of ``python -m fastmt.tools.aot``'s builds spills.
OPTIONS = {"num_stages": 1, "maxnreg": 232}


@triton.jit
def _logit_tile(h_ptr, w_ptr, rows, cols, r_ok, c_ok, D, s_hn, s_hd, s_wv, s_wd,
                BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, DOT_FP32: tl.constexpr,
                PRECISION: tl.constexpr):
    """``h[rows] @ w[cols]^T`` as a float32 ``[BN, BV]`` tile (zero outside ``r_ok``/``c_ok``)."""
    acc = tl.zeros((BN, BV), tl.float32)
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD)
        d_ok = dd < D
        h = tl.load(h_ptr + rows[:, None] * s_hn + dd[None, :] * s_hd, mask=r_ok[:, None] & d_ok[None, :],
                    other=0.0)
        w = tl.load(w_ptr + cols[None, :] * s_wv + dd[:, None] * s_wd, mask=c_ok[None, :] & d_ok[:, None],
                    other=0.0)
        if DOT_FP32:
            acc = tl.dot(h.to(tl.float32), w.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(h, w, acc)
    return acc


@triton.jit
def _lm_stats_kernel(
    hs_ptr, ws_ptr, ht_ptr, wt_ptr,  # [N,D], [V,D], [T,N,Dt], [T,V,Dt]
    out_ptr,  # [1 + 4T, N] float32: student lse (base 2), teachers' lse (base 2), untempered lse, KL (nats), scratch
    N, V, D, DT,
    s_hn, s_hd, s_wv, s_wd, s_ti, s_tn, s_td, s_ui, s_uv, s_ud,
    k,  # log2(e) / temperature
    tau,  # temperature
    T: tl.constexpr, REVERSE: tl.constexpr, NEED_U: tl.constexpr,
    S_FP32: tl.constexpr, S_PREC: tl.constexpr, T_FP32: tl.constexpr, T_PREC: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
):
    LN2: tl.constexpr = 0.6931471805599453
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    r_ok = rows < N
    rows = rows.to(tl.int64)
    sti = s_ti + tl.zeros((), tl.int64)  # 64-bit teacher offsets: T x V x Dt passes 2^31 at LLM sizes
    sui = s_ui + tl.zeros((), tl.int64)

    m_s = tl.full((BN,), _NEG, tl.float32)  # student: running maximum of a = z k (base 2)
    d_s = tl.zeros((BN,), tl.float32)  # sum 2^(a - m_s)
    # Each teacher's running values live in ``out`` between tiles (rows 1+i, 1+T+i, 1+2T+i, 1+3T+i of
    # the block's columns: m_i, u_i, a_i, d_i), not in registers: one teacher's state is live at a time.
    # a_i: forward sum 2^(a_i - m_i)(a_i - a_s), reverse sum 2^(a_s - m_s)(a_s - a_i); u_i: sum 2^(tau
    # (a_i - m_i)), the untempered normaliser.
    for i in range(T):
        tl.store(out_ptr + (1 + i) * N + rows, tl.full((BN,), _NEG, tl.float32), mask=r_ok)
        tl.store(out_ptr + (1 + T + i) * N + rows, tl.zeros((BN,), tl.float32), mask=r_ok)
        tl.store(out_ptr + (1 + 2 * T + i) * N + rows, tl.zeros((BN,), tl.float32), mask=r_ok)
        tl.store(out_ptr + (1 + 3 * T + i) * N + rows, tl.zeros((BN,), tl.float32), mask=r_ok)
    tl.debug_barrier()

    for v0 in range(0, V, BV):
        cols = (v0 + tl.arange(0, BV)).to(tl.int64)
        c_ok = cols < V
        zs = _logit_tile(hs_ptr, ws_ptr, rows, cols, r_ok, c_ok, D, s_hn, s_hd, s_wv, s_wd, BN, BV, BD,
                         S_FP32, S_PREC)
        xs = tl.where(c_ok[None, :], zs * k, float("-inf"))
        ms_new = tl.maximum(m_s, tl.max(xs, axis=1))
        alpha_s = tl.exp2(m_s - ms_new)
        es = tl.exp2(xs - ms_new[:, None])
        d_s = d_s * alpha_s + tl.sum(es, axis=1)
        for i in range(T):  # a loop, not unrolled: one teacher's tiles live at a time
            zt = _logit_tile(ht_ptr + i * sti, wt_ptr + i * sui, rows, cols, r_ok, c_ok, DT, s_tn, s_td, s_uv, s_ud,
                             BN, BV, BD, T_FP32, T_PREC)
            xt = tl.where(c_ok[None, :], zt * k, float("-inf"))
            m_at, u_at = out_ptr + (1 + i) * N + rows, out_ptr + (1 + T + i) * N + rows
            a_at, d_at = out_ptr + (1 + 2 * T + i) * N + rows, out_ptr + (1 + 3 * T + i) * N + rows
            mi = tl.load(m_at, mask=r_ok, other=0.0)
            mi_new = tl.maximum(mi, tl.max(xt, axis=1))
            alpha = tl.exp2(mi - mi_new)
            et = tl.exp2(xt - mi_new[:, None])
            di = tl.load(d_at, mask=r_ok, other=0.0) * alpha + tl.sum(et, axis=1)
            if REVERSE:
                ai = tl.load(a_at, mask=r_ok, other=0.0) * alpha_s + tl.sum(tl.where(es > 0, es * (xs - xt), 0.0), axis=1)
            else:
                ai = tl.load(a_at, mask=r_ok, other=0.0) * alpha + tl.sum(tl.where(et > 0, et * (xt - xs), 0.0), axis=1)
            if NEED_U:
                ui = tl.load(u_at, mask=r_ok, other=0.0) * tl.exp2(tau * (mi - mi_new))
                ui += tl.sum(tl.exp2(tau * (xt - mi_new[:, None])), axis=1)
            tl.debug_barrier()  # every thread has read this teacher's state before it is rewritten
            if NEED_U:
                tl.store(u_at, ui, mask=r_ok)
            tl.store(m_at, mi_new, mask=r_ok)
            tl.store(d_at, di, mask=r_ok)
            tl.store(a_at, ai, mask=r_ok)
            tl.debug_barrier()  # written before any thread reads it for the next tile
        m_s = ms_new

    lse_s = m_s + tl.log2(d_s)
    tl.store(out_ptr + rows, lse_s, mask=r_ok)
    for i in range(T):
        mi = tl.load(out_ptr + (1 + i) * N + rows, mask=r_ok, other=0.0)
        di = tl.load(out_ptr + (1 + 3 * T + i) * N + rows, mask=r_ok, other=1.0)
        ai = tl.load(out_ptr + (1 + 2 * T + i) * N + rows, mask=r_ok, other=0.0)
        lse_i = mi + tl.log2(di)
        if REVERSE:
            kl = (ai / d_s - lse_s + lse_i) * LN2
        else:
            kl = (ai / di - lse_i + lse_s) * LN2
        if NEED_U:
            lse_u = (tau * mi + tl.log2(tl.load(out_ptr + (1 + T + i) * N + rows, mask=r_ok, other=1.0))) * LN2
        else:
            lse_u = lse_i * LN2
        tl.debug_barrier()
        tl.store(out_ptr + (1 + i) * N + rows, lse_i, mask=r_ok)
        tl.store(out_ptr + (1 + T + i) * N + rows, lse_u, mask=r_ok)
        tl.store(out_ptr + (1 + 2 * T + i) * N + rows, kl, mask=r_ok)


@triton.jit
def _lm_grad_kernel(
    hs_ptr, ws_ptr, ht_ptr, wt_ptr,  # as in _lm_stats_kernel
    stats_ptr,  # [1 + 4T, N] float32 from _lm_stats_kernel
    coef_ptr,  # [T, N] float32: each teacher's weight, 0 on rows that do not count
    g_ptr,  # [rows of the chunk, V]: G
    r0, r1, N, V, D, DT,
    s_hn, s_hd, s_wv, s_wd, s_ti, s_tn, s_td, s_ui, s_uv, s_ud, s_gn,
    k,
    T: tl.constexpr, REVERSE: tl.constexpr,
    S_FP32: tl.constexpr, S_PREC: tl.constexpr, T_FP32: tl.constexpr, T_PREC: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
):
    LN2: tl.constexpr = 0.6931471805599453
    rows = r0 + tl.program_id(0) * BN + tl.arange(0, BN)
    r_ok = rows < r1
    rows = rows.to(tl.int64)
    cols = (tl.program_id(1) * BV + tl.arange(0, BV)).to(tl.int64)
    c_ok = cols < V
    sti = s_ti + tl.zeros((), tl.int64)
    sui = s_ui + tl.zeros((), tl.int64)

    zs = _logit_tile(hs_ptr, ws_ptr, rows, cols, r_ok, c_ok, D, s_hn, s_hd, s_wv, s_wd, BN, BV, BD, S_FP32, S_PREC)
    lse_s = tl.load(stats_ptr + rows, mask=r_ok, other=0.0)
    ls = tl.where(c_ok[None, :], zs * k, float("-inf")) - lse_s[:, None]  # log2 q
    q = tl.exp2(ls)
    g = tl.zeros((BN, BV), tl.float32)
    c_sum = tl.zeros((BN,), tl.float32)
    for i in range(T):  # a loop, not unrolled: one teacher's tiles live at a time
        c = tl.load(coef_ptr + i * N + rows, mask=r_ok, other=0.0)
        lse_i = tl.load(stats_ptr + (1 + i) * N + rows, mask=r_ok, other=0.0)
        zt = _logit_tile(ht_ptr + i * sti, wt_ptr + i * sui, rows, cols, r_ok, c_ok, DT, s_tn, s_td, s_uv, s_ud,
                         BN, BV, BD, T_FP32, T_PREC)
        lt = zt * k - lse_i[:, None]  # log2 p_i
        if REVERSE:
            kl = tl.load(stats_ptr + (1 + 2 * T + i) * N + rows, mask=r_ok, other=0.0)
            term = tl.where(q > 0, q * ((ls - lt) * LN2 - kl[:, None]), 0.0)
            g += tl.where(c[:, None] != 0, c[:, None] * term, 0.0)
        else:
            g -= tl.where(c[:, None] != 0, c[:, None] * tl.exp2(lt), 0.0)
            c_sum += c
    if not REVERSE:
        g += c_sum[:, None] * q
    tl.store(g_ptr + (rows - r0)[:, None] * s_gn + cols[None, :], g.to(g_ptr.dtype.element_ty),
             mask=r_ok[:, None] & c_ok[None, :])


def lm_config(plan_half: bool, v: int = 0, device_type: str = "cuda", aligned: bool = True) -> tuple[int, int, int, int]:
    """(BN, BV, BD, num_warps): tiles of rows x vocabulary, and the reduction step over the width.
    ``aligned``: every row stride is a multiple of 16 (Triton then knows rows start on 16-byte
    boundaries), so tiles load 16 bytes a thread; other widths load element by element,
    with a 64-bit address per element, and take smaller tiles (the ahead-of-time build spilled
    otherwise). Triton's CPU interpreter pays per tile rather than per element: there, vocabularies past
    16k columns take wider tiles (at most 256 of them a row), so that a 262,144-token test takes seconds."""
    if plan_half and aligned:
        bn, bv, bd, warps = BIG_TILES
    else:
        bn, bv, bd, warps = SMALL_TILES
    if device_type == "cpu":
        bv = max(bv, min(1024, triton.next_power_of_2(max(1, v // 256))))
    return bn, bv, bd, warps


BIG_TILES = (64, 64, 64, 8)
SMALL_TILES = (32, 32, 32, 4)


def _aligned(*tensors: torch.Tensor) -> bool:
    """Whether Triton will know that every row of these tensors starts on a 16-byte boundary: it
    specializes integer arguments on divisibility by 16, so the row strides must be multiples of 16."""
    return all(x.stride(-2) % 16 == 0 for x in tensors)


def _strides(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.stride())


def stats_launch(hs, ws, ht, wt, temperature: float, reverse: bool, need_u: bool) -> tuple[Launch, torch.Tensor]:
    """The statistics kernel's launch and its output ``[1 + 4T, N]`` (allocated, not yet written; the
    last T rows are the kernel's scratch)."""
    n, d = hs.shape
    v = ws.shape[0]
    t, _, dt = ht.shape
    sp, tp = dot_plan(hs.dtype, hs.device.type), dot_plan(ht.dtype, ht.device.type)
    bn, bv, bd, warps = lm_config(sp.half and tp.half, v, hs.device.type, _aligned(hs, ws, ht, wt))
    out = torch.empty((1 + 4 * t, n), dtype=torch.float32, device=hs.device)
    args = (hs, ws, ht, wt, out, n, v, d, dt, *_strides(hs), *_strides(ws), *_strides(ht), *_strides(wt),
            math.log2(math.e) / temperature, float(temperature))
    constexprs = dict(T=t, REVERSE=reverse,
                      NEED_U=need_u and float(temperature) != 1.0, S_FP32=sp.dot_fp32, S_PREC=sp.precision,
                      T_FP32=tp.dot_fp32, T_PREC=tp.precision, BN=bn, BV=bv, BD=bd)
    return Launch(_lm_stats_kernel, (triton.cdiv(n, bn),), args, constexprs, warps, OPTIONS), out


def grad_launch(hs, ws, ht, wt, stats, coef, g, r0: int, r1: int, temperature: float, reverse: bool) -> Launch:
    """The launch that writes ``G`` for rows ``r0:r1`` into ``g`` (``[r1 - r0, V]``)."""
    n, d = hs.shape
    v = ws.shape[0]
    t, _, dt = ht.shape
    sp, tp = dot_plan(hs.dtype, hs.device.type), dot_plan(ht.dtype, ht.device.type)
    bn, bv, bd, warps = lm_config(sp.half and tp.half, v, hs.device.type, _aligned(hs, ws, ht, wt))
    args = (hs, ws, ht, wt, stats, coef, g, r0, r1, n, v, d, dt, *_strides(hs), *_strides(ws), *_strides(ht),
            *_strides(wt), g.stride(0), math.log2(math.e) / temperature)
    constexprs = dict(T=t, REVERSE=reverse, S_FP32=sp.dot_fp32, S_PREC=sp.precision, T_FP32=tp.dot_fp32,
                      T_PREC=tp.precision, BN=bn, BV=bv, BD=bd)
    return Launch(_lm_grad_kernel, (triton.cdiv(r1 - r0, bn), triton.cdiv(v, bv)), args, constexprs, warps, OPTIONS)


def chunk_rows(n: int, v: int, itemsize: int, budget: int = CHUNK_BYTES) -> int:
    """Rows per chunk: as many as keep ``G [rows, V]`` within ``budget`` bytes (at least 16)."""
    return max(16, min(n, budget // max(1, v * itemsize)))


def triton_stats(hs, ws, ht, wt, tau: float, reverse: bool, need_u: bool) -> torch.Tensor:
    """``[1 + 4T, N]`` statistics from ``_lm_stats_kernel`` (``fastmt.kernels.lm_tiled`` reads them)."""
    launch, stats = stats_launch(hs, ws, ht, wt, tau, reverse, need_u)
    launch()
    return stats


def triton_grads(hs, ws, ht, wt, stats, w, tau: float, reverse: bool, chunk_bytes: int):
    """``(G ws, G^T hs)`` in float32 for the whole of ``G``, made chunk by chunk (``_lm_grad_kernel``
    writes each chunk's block, two GEMMs consume it)."""
    n, v = hs.shape[0], ws.shape[0]
    half = dot_plan(hs.dtype, hs.device.type).half
    g_dtype = hs.dtype if half else torch.float32
    rows = chunk_rows(n, v, torch.empty((), dtype=g_dtype).element_size(), chunk_bytes)
    g = torch.empty((rows, v), dtype=g_dtype, device=hs.device)
    d_hs = torch.empty((n, hs.shape[1]), dtype=g_dtype, device=hs.device)
    d_ws = None
    w_g = ws.to(g_dtype)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        gc = g[: r1 - r0]
        grad_launch(hs, ws, ht, wt, stats, w, gc, r0, r1, tau, reverse)()
        torch.mm(gc, w_g, out=d_hs[r0:r1])
        part = gc.t() @ hs[r0:r1].to(g_dtype)
        # Chunks add up in float32: a half-precision sum over many chunks would lose the small ones.
        d_ws = part.float() if d_ws is None else d_ws.add_(part)
    if d_ws is None:  # no rows
        d_ws = torch.zeros(ws.shape, dtype=torch.float32, device=ws.device)
    return d_hs.float(), d_ws
