"""Output layer + multi-teacher KL for causal language models, without ``tokens x vocab`` logits.

``fastmt.losses.lm_linear_kl_loss`` forms the student's logits ``hs [N,D] @ ws [V,D]^T`` and each
teacher's ``ht_i @ wt_i^T`` and takes the token-level multi-teacher KL of them. Here no ``N x V``
tensor is made for the student or any teacher:

1. ``_lm_stats_kernel``: a program per block of ``BN`` rows walks the vocabulary in tiles of ``BV``
   columns. Each tile's logits are one ``[BN, D] x [D, BV]`` product per model on tensor cores
   (``tl.dot``), folded at once into per-row online statistics: the student's tempered log-sum-exp,
   each teacher's tempered (and, for the weights, untempered) log-sum-exp, and the running sum that
   becomes the KL: ``sum_v p_iv (a_iv - a_sv)`` for the forward KL, ``sum_v q_v (a_sv - a_iv)`` for the
   reverse one (``a``: logits over the temperature). Out: ``[1 + 3T, N]`` float32.
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

# Floor for running maxima (see kl.py): rescales are always 2^(m_old - m_new) of two stored maxima,
# never a product minus a maximum, which a GPU build contracts into an FMA that keeps a rounding error.
_NEG = tl.constexpr(-1.0e30)
# Bytes of the gradient block G that one chunk of rows may take.
CHUNK_BYTES = 256 * 1024 * 1024


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
def _pick(x, sel):
    """Row ``i`` of a ``[T_PAD, BN]`` state, where ``sel`` is ``offs_t[:, None] == i``."""
    return tl.sum(tl.where(sel, x, 0.0), axis=0)


@triton.jit
def _lm_stats_kernel(
    hs_ptr, ws_ptr, ht_ptr, wt_ptr,  # [N,D], [V,D], [T,N,Dt], [T,V,Dt]
    out_ptr,  # [1 + 3T, N] float32: student lse (base 2), teachers' lse (base 2), untempered lse, KL (nats)
    N, V, D, DT,
    s_hn, s_hd, s_wv, s_wd, s_ti, s_tn, s_td, s_ui, s_uv, s_ud,
    k,  # log2(e) / temperature
    tau,  # temperature
    T: tl.constexpr, T_PAD: tl.constexpr, REVERSE: tl.constexpr, NEED_U: tl.constexpr,
    S_FP32: tl.constexpr, S_PREC: tl.constexpr, T_FP32: tl.constexpr, T_PREC: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
):
    LN2: tl.constexpr = 0.6931471805599453
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    r_ok = rows < N
    rows = rows.to(tl.int64)
    offs_t = tl.arange(0, T_PAD)
    sti = s_ti + tl.zeros((), tl.int64)  # 64-bit teacher offsets: T x V x Dt passes 2^31 at LLM sizes
    sui = s_ui + tl.zeros((), tl.int64)

    m_s = tl.full((BN,), _NEG, tl.float32)  # student: running maximum of a = z k (base 2)
    d_s = tl.zeros((BN,), tl.float32)  # sum 2^(a - m_s)
    m_t = tl.full((T_PAD, BN), _NEG, tl.float32)  # per teacher, the same
    d_t = tl.zeros((T_PAD, BN), tl.float32)
    a_t = tl.zeros((T_PAD, BN), tl.float32)  # forward: sum 2^(a_i - m_i)(a_i - a_s); reverse: sum 2^(a_s - m_s)(a_s - a_i)
    u_t = tl.zeros((T_PAD, BN), tl.float32)  # sum 2^(tau (a_i - m_i)): the untempered normaliser

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
        for i in tl.static_range(T):
            zt = _logit_tile(ht_ptr + i * sti, wt_ptr + i * sui, rows, cols, r_ok, c_ok, DT, s_tn, s_td, s_uv, s_ud,
                             BN, BV, BD, T_FP32, T_PREC)
            xt = tl.where(c_ok[None, :], zt * k, float("-inf"))
            sel = offs_t[:, None] == i
            mi = _pick(m_t, sel)
            mi_new = tl.maximum(mi, tl.max(xt, axis=1))
            alpha = tl.exp2(mi - mi_new)
            et = tl.exp2(xt - mi_new[:, None])
            di = _pick(d_t, sel) * alpha + tl.sum(et, axis=1)
            if REVERSE:
                ai = _pick(a_t, sel) * alpha_s + tl.sum(tl.where(es > 0, es * (xs - xt), 0.0), axis=1)
            else:
                ai = _pick(a_t, sel) * alpha + tl.sum(tl.where(et > 0, et * (xt - xs), 0.0), axis=1)
            if NEED_U:
                ui = _pick(u_t, sel) * tl.exp2(tau * (mi - mi_new)) + tl.sum(tl.exp2(tau * (xt - mi_new[:, None])),
                                                                              axis=1)
                u_t = tl.where(sel, ui[None, :], u_t)
            m_t = tl.where(sel, mi_new[None, :], m_t)
            d_t = tl.where(sel, di[None, :], d_t)
            a_t = tl.where(sel, ai[None, :], a_t)
        m_s = ms_new

    lse_s = m_s + tl.log2(d_s)
    tl.store(out_ptr + rows, lse_s, mask=r_ok)
    for i in tl.static_range(T):
        sel = offs_t[:, None] == i
        mi = _pick(m_t, sel)
        lse_i = mi + tl.log2(_pick(d_t, sel))
        if REVERSE:
            kl = (_pick(a_t, sel) / d_s - lse_s + lse_i) * LN2
        else:
            kl = (_pick(a_t, sel) / _pick(d_t, sel) - lse_i + lse_s) * LN2
        if NEED_U:
            lse_u = (tau * mi + tl.log2(_pick(u_t, sel))) * LN2
        else:
            lse_u = lse_i * LN2
        tl.store(out_ptr + (1 + i) * N + rows, lse_i, mask=r_ok)
        tl.store(out_ptr + (1 + T + i) * N + rows, lse_u, mask=r_ok)
        tl.store(out_ptr + (1 + 2 * T + i) * N + rows, kl, mask=r_ok)


@triton.jit
def _lm_grad_kernel(
    hs_ptr, ws_ptr, ht_ptr, wt_ptr,  # as in _lm_stats_kernel
    stats_ptr,  # [1 + 3T, N] float32 from _lm_stats_kernel
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
    for i in tl.static_range(T):
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


def lm_config(plan_half: bool, v: int = 0, device_type: str = "cuda") -> tuple[int, int, int, int]:
    """(BN, BV, BD, num_warps): tiles of rows x vocabulary, and the reduction step over the width.
    Triton's CPU interpreter pays per tile rather than per element: there, vocabularies past 16k
    columns take wider tiles (at most 256 of them a row), so that a 262,144-token test takes seconds."""
    bn, bv, bd = (64, 64, 64) if plan_half else (32, 64, 32)
    if device_type == "cpu":
        bv = max(bv, min(1024, triton.next_power_of_2(max(1, v // 256))))
    return bn, bv, bd, 4


def stack_teachers(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Teachers' ``[N, Dt_i]`` hidden states or ``[V, Dt_i]`` output matrices as one ``[T, *, max Dt]``
    tensor, narrower ones padded with zero columns (their logits are unchanged). Stack output matrices
    once, not every step: they are the largest tensors here."""
    width = max(t.shape[-1] for t in tensors)
    if all(t.shape[-1] == width for t in tensors):
        return torch.stack(tensors)
    out = tensors[0].new_zeros((len(tensors), tensors[0].shape[0], width))
    for i, t in enumerate(tensors):
        out[i, :, : t.shape[-1]] = t
    return out


def _as_stack(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else stack_teachers(list(x))


def _strides(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.stride())


def stats_launch(hs, ws, ht, wt, temperature: float, reverse: bool, need_u: bool) -> tuple[Launch, torch.Tensor]:
    """The statistics kernel's launch and its output ``[1 + 3T, N]`` (allocated, not yet written)."""
    n, d = hs.shape
    v = ws.shape[0]
    t, _, dt = ht.shape
    sp, tp = dot_plan(hs.dtype, hs.device.type), dot_plan(ht.dtype, ht.device.type)
    bn, bv, bd, warps = lm_config(sp.half and tp.half, v, hs.device.type)
    out = torch.empty((1 + 3 * t, n), dtype=torch.float32, device=hs.device)
    args = (hs, ws, ht, wt, out, n, v, d, dt, *_strides(hs), *_strides(ws), *_strides(ht), *_strides(wt),
            math.log2(math.e) / temperature, float(temperature))
    constexprs = dict(T=t, T_PAD=max(2, triton.next_power_of_2(t)), REVERSE=reverse,
                      NEED_U=need_u and float(temperature) != 1.0, S_FP32=sp.dot_fp32, S_PREC=sp.precision,
                      T_FP32=tp.dot_fp32, T_PREC=tp.precision, BN=bn, BV=bv, BD=bd)
    return Launch(_lm_stats_kernel, (triton.cdiv(n, bn),), args, constexprs, warps), out


def grad_launch(hs, ws, ht, wt, stats, coef, g, r0: int, r1: int, temperature: float, reverse: bool) -> Launch:
    """The launch that writes ``G`` for rows ``r0:r1`` into ``g`` (``[r1 - r0, V]``)."""
    n, d = hs.shape
    v = ws.shape[0]
    t, _, dt = ht.shape
    sp, tp = dot_plan(hs.dtype, hs.device.type), dot_plan(ht.dtype, ht.device.type)
    bn, bv, bd, warps = lm_config(sp.half and tp.half, v, hs.device.type)
    args = (hs, ws, ht, wt, stats, coef, g, r0, r1, n, v, d, dt, *_strides(hs), *_strides(ws), *_strides(ht),
            *_strides(wt), g.stride(0), math.log2(math.e) / temperature)
    constexprs = dict(T=t, REVERSE=reverse, S_FP32=sp.dot_fp32, S_PREC=sp.precision, T_FP32=tp.dot_fp32,
                      T_PREC=tp.precision, BN=bn, BV=bv, BD=bd)
    return Launch(_lm_grad_kernel, (triton.cdiv(r1 - r0, bn), triton.cdiv(v, bv)), args, constexprs, warps)


def chunk_rows(n: int, v: int, itemsize: int, budget: int = CHUNK_BYTES) -> int:
    """Rows per chunk: as many as keep ``G [rows, V]`` within ``budget`` bytes (at least 16)."""
    return max(16, min(n, budget // max(1, v * itemsize)))


def _teacher_weights(stats, ht, wt, targets, weights, ignore_index: int, t: int) -> torch.Tensor:
    """``[T, N]`` float32 teacher weights, 0 on rows that do not count."""
    valid = targets != ignore_index
    if isinstance(weights, torch.Tensor):
        w = weights.detach().to(torch.float32)
    elif weights in ("paper", "softmax"):
        # CE_i = untempered log-sum-exp - the logit of the next token: one row of each output matrix.
        idx = torch.where(valid, targets, 0).long().clamp(0, wt.shape[1] - 1)
        z_y = torch.stack([(ht[i].float() * wt[i].index_select(0, idx).float()).sum(-1) for i in range(t)])
        ce = stats[1 + t: 1 + 2 * t] - z_y
        w = 1.0 / (1.0 + ce) if weights == "paper" else torch.softmax(-ce, dim=0)
    else:  # uniform, or none: every teacher 1
        w = torch.ones_like(stats[1: 1 + t])
    return torch.where(valid, w, 0.0)


class _LMLinearKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, ht, wt, targets, weights, tau, ignore_index, reverse, chunk_bytes):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        plan = dot_plan(hs.dtype, hs.device.type)
        hs_c = hs.contiguous()
        ws_c = ws.to(hs.dtype).contiguous() if plan.half else ws.contiguous()
        t = ht.shape[0]
        tplan = dot_plan(ht.dtype, ht.device.type)
        wt_c = wt.to(ht.dtype) if tplan.half else wt
        launch, stats = stats_launch(hs_c, ws_c, ht, wt_c, tau, reverse, isinstance(weights, str) and weights != "uniform")
        launch()
        w = _teacher_weights(stats, ht, wt_c, targets, weights, ignore_index, t)
        n_valid = (targets != ignore_index).sum().to(torch.float32).clamp_min(1.0)
        kl = stats[1 + 2 * t:]
        loss = (tau * tau) * torch.where(w != 0, w * kl, 0.0).sum() / n_valid
        if not needs_grad:
            ctx.grads = (None, None)
            return loss
        n, v = hs.shape[0], ws.shape[0]
        g_dtype = hs.dtype if plan.half else torch.float32
        rows = chunk_rows(n, v, torch.empty((), dtype=g_dtype).element_size(), chunk_bytes)
        g = torch.empty((rows, v), dtype=g_dtype, device=hs.device)
        d_hs = torch.empty((n, hs.shape[1]), dtype=g_dtype, device=hs.device)
        d_ws = None
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            gc = g[: r1 - r0]
            grad_launch(hs_c, ws_c, ht, wt_c, stats, w, gc, r0, r1, tau, reverse)()
            torch.mm(gc, ws_c.to(g_dtype), out=d_hs[r0:r1])
            part = gc.t() @ hs_c[r0:r1].to(g_dtype)
            # Chunks add up in float32: a half-precision sum over many chunks would lose the small ones.
            d_ws = part.float() if d_ws is None else d_ws.add_(part)
        scale = tau / n_valid  # d loss / d logits = tau / counted rows * G (at an upstream gradient of 1)
        ctx.grads = (d_hs.float().mul_(scale), d_ws.mul_(scale))
        ctx.dtypes = (hs.dtype, ws.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        d_hs, d_ws = ctx.grads
        ctx.grads = None
        out_hs = (d_hs * grad_loss).to(ctx.dtypes[0]) if d_hs is not None and ctx.needs_input_grad[0] else None
        out_ws = (d_ws * grad_loss).to(ctx.dtypes[1]) if d_ws is not None and ctx.needs_input_grad[1] else None
        return out_hs, out_ws, None, None, None, None, None, None, None, None


def lm_linear_kl(hs, ws, ht, wt, targets, weights, temperature: float, ignore_index: int, reverse: bool,
                 chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """The fused loss on checked arguments (``fastmt.kernels.lm_linear_kl_loss`` checks them)."""
    ht = _as_stack(ht).detach()
    wt = _as_stack(wt).detach()
    return _LMLinearKL.apply(hs, ws, ht, wt, targets, weights, float(temperature), int(ignore_index), bool(reverse),
                             int(chunk_bytes))


