"""Fused projection + masked, weighted MSE: ``fastmt.losses.mt_hidden_loss`` as Triton kernels.

For every (teacher i, student layer k) the error ``E = hs[k] @ W[i,k] + b[i,k] - ht[i,k]`` is formed
one ``[BLOCK_R, BLOCK_D]`` tile at a time; all T*K pairs are one launch. Rows are the flattened
``(n, s)`` positions, ``R = N * S``; ``c_r = mask[n,s] * w[i,n]`` weighs row r for teacher i.

- forward: each program builds its tile of E with a loop of ``tl.dot`` over Ds and writes one
  partial sum of ``c_r * E^2``; the loss is their sum over ``sum(mask) * Dt``. E never reaches memory.
- backward, no atomics: the rows are cut into chunks whose ``dE = c E`` fits a bounded buffer
  (``DE_BUDGET_BYTES``). Per chunk, one kernel recomputes E and stores ``dE`` (in the student's
  dtype for half precision, as the products consume it), then two GEMM kernels read it:
  ``dW[i,k] (+)= hs[k]^T dE[i,k]`` with ``db[i,k] (+)= sum_r dE[i,k]`` (the sum over rows runs inside
  one program, so every output tile has exactly one writer) and ``d hs[k] = sum_i dE[i,k] W[i,k]^T``
  (the sum over teachers is the GEMM's own reduction: the teachers' Dt columns are one long K).
  The upstream scale ``g * 2 / (sum(mask) Dt)`` is a device scalar applied in the epilogues, after
  the float32 accumulation (folded into a half-precision dE, a converged error would underflow).

Products run in the student's dtype on tensor cores for fp16/bf16 (the weight is cast to it, as
autocast would). Float32 and float64 inputs: on a GPU where torch allows TF32 for matmuls, TF32 on
tensor cores; else exact float32 (``input_precision="ieee"``) on FMA units, which on a GPU
``fastmt.kernels`` never runs for training (cuBLAS's float32 GEMMs, the reference, serve there; they
are faster than exact-float32 Triton tiles). Accumulation is float32.

One plan per dtype, on every device: the weight's and dE's dtypes, the tiles and the chunks do not
depend on where the kernels run. The one difference is how Triton's CPU interpreter multiplies bf16
(numpy has no bfloat16, and a bf16 ``tl.dot`` there returns garbage): it loads the same bf16 values
and multiplies them as float32 (``DOT_FP32``). A product of two bf16 numbers is exact in float32, so
that is the tensor cores' computation, up to the order of the float32 accumulation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastmt.kernels.launch import Launch

# Most bytes the backward's dE chunk may take (64 MiB: 2,816 of 8,192 rows for 3 teachers x 4 layers
# x 768 columns in bf16). Smaller budgets only mean more, shorter launches.
DE_BUDGET_BYTES = 64 << 20


@triton.jit
def _row_coef(mask_ptr, tw_ptr, i, offs_r, r_ok, S, N, HAS_MASK: tl.constexpr, HAS_TW: tl.constexpr):
    """``mask[n,s] * w[i,n]`` for a block of flattened rows (0 outside the tensor)."""
    c = tl.where(r_ok, 1.0, 0.0)
    if HAS_MASK:
        c = c * tl.load(mask_ptr + offs_r, mask=r_ok, other=0.0).to(tl.float32)
    if HAS_TW:
        c = c * tl.load(tw_ptr + i * N + offs_r // S, mask=r_ok, other=0.0).to(tl.float32)
    return c


@triton.jit
def _error_tile(hs_ptr, ht_ptr, w_ptr, b_ptr, i, k, K, R, Ds, Dt, offs_r, offs_d, r_ok, d_ok,
                DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """``hs[k] @ W[i,k] + b[i,k] - ht[i,k]`` on one tile, float32."""
    x_base = hs_ptr + k * R * Ds
    w_base = w_ptr + (i * K + k) * Ds * Dt
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for k0 in range(0, Ds, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < Ds
        x = tl.load(x_base + offs_r[:, None] * Ds + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + offs_k[:, None] * Dt + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    bias = tl.load(b_ptr + (i * K + k) * Dt + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    y = tl.load(ht_ptr + ((i * K + k) * R + offs_r[:, None]) * Dt + offs_d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    return acc + bias[None, :] - y


@triton.jit
def _program_tile(hs_ptr, ht_ptr, w_ptr, b_ptr, mask_ptr, tw_ptr, r0, r_end, K, R, S, N, Ds, Dt,
                  HAS_MASK: tl.constexpr, HAS_TW: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's (teacher, layer), its rows (from ``r0``, before ``r_end``) and columns, its error
    tile and row coefficients."""
    pid_ik = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    pid_d = tl.program_id(2).to(tl.int64)
    i = pid_ik // K
    k = pid_ik % K
    offs_r = r0 + pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    r_ok = offs_r < r_end
    d_ok = offs_d < Dt
    e = _error_tile(hs_ptr, ht_ptr, w_ptr, b_ptr, i, k, K, R, Ds, Dt, offs_r, offs_d, r_ok, d_ok,
                    DOT_FP32, PRECISION, BLOCK_R, BLOCK_D, BLOCK_K)
    c = _row_coef(mask_ptr, tw_ptr, i, offs_r, r_ok, S, N, HAS_MASK, HAS_TW)
    # Rows with c == 0 (padding) are dropped, not multiplied: non-finite values there stay out.
    keep = (c[:, None] != 0) & d_ok[None, :]
    return offs_r, offs_d, r_ok, d_ok, e, c, keep


@triton.jit
def _hidden_fwd_kernel(
    hs_ptr,  # [K, R, Ds] student hidden
    ht_ptr,  # [T, K, R, Dt] teacher hidden
    w_ptr,  # [T, K, Ds, Dt] projection weight
    b_ptr,  # [T, K, Dt] projection bias
    mask_ptr,  # [R] 0/1 (read when HAS_MASK)
    tw_ptr,  # [T, N] teacher weights per example (read when HAS_TW)
    part_ptr,  # [T*K * row blocks * col blocks] float32 partial sums
    K, R, S, N, Ds, Dt,
    HAS_MASK: tl.constexpr, HAS_TW: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_r, offs_d, r_ok, d_ok, e, c, keep = _program_tile(
        hs_ptr, ht_ptr, w_ptr, b_ptr, mask_ptr, tw_ptr, 0, R, K, R, S, N, Ds, Dt,
        HAS_MASK, HAS_TW, DOT_FP32, PRECISION, BLOCK_R, BLOCK_D, BLOCK_K)
    sq = tl.where(keep, c[:, None] * e * e, 0.0)
    pid = (tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
    tl.store(part_ptr + pid, tl.sum(tl.sum(sq, axis=1), axis=0))


@triton.jit
def _hidden_de_kernel(
    hs_ptr, ht_ptr, w_ptr, b_ptr, mask_ptr, tw_ptr,  # as in the forward kernel
    de_ptr,  # [T*K, RC, Dt] this chunk's c * E (unscaled), in de's dtype
    r0, rows,  # the chunk: its first row and its row count (<= RC)
    RC,  # the buffer's rows per teacher and layer
    K, R, S, N, Ds, Dt,
    HAS_MASK: tl.constexpr, HAS_TW: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_r, offs_d, r_ok, d_ok, e, c, keep = _program_tile(
        hs_ptr, ht_ptr, w_ptr, b_ptr, mask_ptr, tw_ptr, r0, r0 + rows, K, R, S, N, Ds, Dt,
        HAS_MASK, HAS_TW, DOT_FP32, PRECISION, BLOCK_R, BLOCK_D, BLOCK_K)
    de = tl.where(keep, c[:, None] * e, 0.0)
    ik = tl.program_id(0).to(tl.int64)
    local = offs_r - r0
    tl.store(de_ptr + (ik * RC + local[:, None]) * Dt + offs_d[None, :], de.to(de_ptr.dtype.element_ty),
             mask=r_ok[:, None] & d_ok[None, :])


@triton.jit
def _hidden_dw_kernel(
    hs_ptr,  # [K, R, Ds] student hidden
    de_ptr,  # [T*K, RC, Dt] the chunk's dE
    scale_ptr,  # [] float32: upstream gradient * 2 / (sum(mask) * Dt)
    dw_ptr,  # [T*K, Ds, Dt] float32
    db_ptr,  # [T*K, Dt] float32
    r0, rows,  # the chunk: its first row and its row count (<= RC)
    RC, K, R, Ds, Dt,
    ACCUMULATE: tl.constexpr,  # add to dw/db (every chunk after the first) instead of storing
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # over Ds
    BLOCK_N: tl.constexpr,  # over Dt
    BLOCK_R: tl.constexpr,  # over the chunk's rows (the reduction)
):
    """``dW[i,k] = scale * hs[k]^T dE[i,k]`` over one chunk's rows; programs of the first Ds block
    also write ``db[i,k] = scale * sum_r dE[i,k]``. One writer per output tile: no atomics."""
    ik = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2).to(tl.int64)
    k = ik % K
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < Ds
    n_ok = offs_n < Dt
    x_base = hs_ptr + (k * R + r0) * Ds
    e_base = de_ptr + ik * RC * Dt
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    col = tl.zeros((BLOCK_N,), tl.float32)
    for q0 in range(0, rows, BLOCK_R):
        offs_q = q0 + tl.arange(0, BLOCK_R)
        q_ok = offs_q < rows
        xt = tl.load(x_base + offs_q[None, :] * Ds + offs_m[:, None], mask=m_ok[:, None] & q_ok[None, :], other=0.0)
        de = tl.load(e_base + offs_q[:, None] * Dt + offs_n[None, :], mask=q_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(xt.to(tl.float32), de.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(xt.to(de.dtype), de, acc)
        col += tl.sum(de.to(tl.float32), axis=0)
    scale = tl.load(scale_ptr)
    out = dw_ptr + (ik * Ds + offs_m[:, None]) * Dt + offs_n[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    acc = acc * scale
    if ACCUMULATE:
        acc += tl.load(out, mask=ok, other=0.0)
    tl.store(out, acc, mask=ok)
    if pid_m == 0:
        col = col * scale
        if ACCUMULATE:
            col += tl.load(db_ptr + ik * Dt + offs_n, mask=n_ok, other=0.0)
        tl.store(db_ptr + ik * Dt + offs_n, col, mask=n_ok)


@triton.jit
def _hidden_dx_kernel(
    de_ptr,  # [T*K, RC, Dt] the chunk's dE
    w_ptr,  # [T, K, Ds, Dt] projection weight (the dot dtype)
    scale_ptr,  # [] float32
    dhs_ptr,  # [K, R, Ds] the student's gradient, in its dtype
    r0, rows, RC, T, K, R, Ds, Dt,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # over the chunk's rows
    BLOCK_N: tl.constexpr,  # over Ds
    BLOCK_K: tl.constexpr,  # over Dt, for each teacher in turn
):
    """``d hs[k] = scale * sum_i dE[i,k] W[i,k]^T`` for one chunk's rows: the teachers' columns are
    one reduction, so each output tile is written once."""
    k = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    pid_n = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < rows
    n_ok = offs_n < Ds
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for i in range(0, T):
        e_base = de_ptr + (i * K + k) * RC * Dt
        w_base = w_ptr + (i * K + k) * Ds * Dt
        for d0 in range(0, Dt, BLOCK_K):
            offs_d = d0 + tl.arange(0, BLOCK_K)
            d_ok = offs_d < Dt
            de = tl.load(e_base + offs_m[:, None] * Dt + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            wt = tl.load(w_base + offs_n[None, :] * Dt + offs_d[:, None], mask=d_ok[:, None] & n_ok[None, :], other=0.0)
            if DOT_FP32:
                acc = tl.dot(de.to(tl.float32), wt.to(tl.float32), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(de, wt.to(de.dtype), acc)
    scale = tl.load(scale_ptr)
    out = dhs_ptr + (k * R + r0 + offs_m[:, None]) * Ds + offs_n[None, :]
    tl.store(out, (acc * scale).to(dhs_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _fit(n: int, most: int) -> int:
    """A power-of-two tile side for a dimension of ``n``: at least 16 (``tl.dot``'s minimum), at most ``most``."""
    return max(16, min(most, triton.next_power_of_2(n)))


def hidden_config(rows: int, ds: int, dt: int, mode: str, backward: bool) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_D, BLOCK_K, num_warps) of the error kernels (forward, and dE in backward), for
    the plan's ``mode``: "ieee" (exact float32), "tf32" or "half" (tensor cores)."""
    if mode == "ieee":
        # Exact float32 products run on FMA units: small tiles, 8 warps keep them in registers.
        return _fit(rows, 64 if not backward else 32), _fit(dt, 64), _fit(ds, 32 if not backward else 16), 8
    deep = 64 if mode == "half" else 32  # a float32 operand tile takes twice the bytes of a half one
    if _vector_rows(ds, dt):
        # Tensor cores: 128 x 128 tiles, Hopper's wgmma shape.
        return _fit(rows, 128), _fit(dt, 128), _fit(ds, deep), 8
    return _fit(rows, 64), _fit(dt, 64), _fit(ds, 32), 8


def _vector_rows(ds: int, dt: int) -> bool:
    # Widths that Triton specializes as multiples of 16 get vector loads. Other widths load element by
    # element, each with its own 64-bit address: at 128 x 128 tiles that spilled hundreds of bytes
    # (``python -m fastmt.tools.aot``, e.g. Ds=40, Dt=70), at 64 x 64 nothing.
    return ds % 16 == 0 and dt % 16 == 0


def gemm_config(m: int, n: int, red: int, mode: str, vector: bool = True) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_RED, num_warps) of the backward's GEMM kernels (``mode``: as above)."""
    if mode == "ieee":
        return _fit(m, 64), _fit(n, 64), _fit(red, 16), 8
    if vector:
        return _fit(m, 128), _fit(n, 128), _fit(red, 64 if mode == "half" else 32), 8
    return _fit(m, 64), _fit(n, 64), _fit(red, 32), 8


def chunk_rows(rows: int, pairs: int, dt: int, itemsize: int, budget: int = DE_BUDGET_BYTES) -> int:
    """Rows per backward chunk: near-equal chunks whose dE fits ``budget``, in whole 128-row tiles
    (16-row steps when the budget holds fewer than 128 rows)."""
    per_row = max(1, pairs * dt * itemsize)
    fit = budget // per_row
    unit = 128 if fit >= 128 else 16
    most = max(unit, fit // unit * unit)
    if rows <= most:
        return rows
    n_chunks = triton.cdiv(rows, most)
    return min(most, triton.cdiv(triton.cdiv(rows, n_chunks), unit) * unit)


class Plan(NamedTuple):
    mode: str  # "half" (fp16/bf16 tensor cores), "tf32" (float32 on tensor cores), "ieee" (exact float32)
    dot_fp32: bool  # the kernels' DOT_FP32: multiply loaded values as float32 (with PRECISION)
    precision: str  # the kernels' PRECISION: tl.dot's input_precision when DOT_FP32

    @property
    def half(self) -> bool:
        return self.mode == "half"


def tf32_allowed() -> bool:
    """Whether torch lets float32 matmuls use TF32 on a GPU (``torch.backends.cuda.matmul.allow_tf32``,
    which ``torch.set_float32_matmul_precision("high")`` turns on)."""
    return bool(torch.backends.cuda.matmul.allow_tf32)


def dot_plan(dtype: torch.dtype, device_type: str, tf32: bool | None = None) -> Plan:
    """How the products run for inputs of ``dtype`` on ``device_type``. ``tf32``: float32 on tensor
    cores (default: on a GPU, where torch allows it; on the CPU's interpreter never)."""
    if dtype in (torch.float16, torch.bfloat16):
        # The interpreter's bf16: the half plan's values, multiplied as float32 (exact products; above).
        return Plan("half", dtype == torch.bfloat16 and device_type == "cpu", "ieee")
    if tf32 is None:
        tf32 = device_type == "cuda" and tf32_allowed()
    return Plan("tf32", True, "tf32") if tf32 else Plan("ieee", True, "ieee")


def _prepare(hs, ht, w, b, mask, tw, tf32=None):
    """Contiguous views, the plan (``dot_plan``), and the dims every kernel takes."""
    k, n, s, ds = hs.shape
    t, dt = ht.shape[0], ht.shape[-1]
    rows = n * s
    plan = dot_plan(hs.dtype, hs.device.type, tf32)
    # Half-precision students multiply on tensor cores: the weight joins their dtype, as under autocast.
    w_in = w.to(hs.dtype).contiguous() if plan.half else w.contiguous()
    m = mask.reshape(rows).contiguous() if mask is not None else None
    if m is not None and m.dtype == torch.bool:
        m = m.to(torch.uint8)
    tw_in = tw.contiguous() if tw is not None else None
    return hs.contiguous(), ht.contiguous(), w_in, b.contiguous(), m, tw_in, plan, (t, k, rows, s, n, ds, dt)


def _denominator(mask, rows: int, dt: int, device) -> torch.Tensor:
    count = mask.to(torch.float32).sum() if mask is not None else torch.full((), float(rows), device=device)
    denom = count * dt
    return torch.where(denom > 0, denom, torch.ones_like(denom))


def hidden_fwd_launch(hs, ht, w, b, mask=None, tw=None, tf32=None) -> tuple[Launch | None, torch.Tensor | None]:
    """The forward launch and its buffer of partial sums (allocated, not written); ``(None, None)`` for
    empty inputs. Nothing runs on the inputs' data, so meta tensors give the exact launch."""
    hs_c, ht_c, w_c, b_c, m, tw_c, plan, (t, k, rows, s, n, ds, dt) = _prepare(hs, ht, w, b, mask, tw, tf32)
    if hs.numel() == 0 or ht.numel() == 0:
        return None, None
    br, bd, bk, num_warps = hidden_config(rows, ds, dt, plan.mode, backward=False)
    grid = (t * k, triton.cdiv(rows, br), triton.cdiv(dt, bd))
    parts = torch.empty(grid[0] * grid[1] * grid[2], dtype=torch.float32, device=hs.device)
    args = (hs_c, ht_c, w_c, b_c, m if m is not None else hs_c, tw_c if tw_c is not None else hs_c, parts,
            k, rows, s, n, ds, dt)
    meta = dict(HAS_MASK=m is not None, HAS_TW=tw_c is not None, DOT_FP32=plan.dot_fp32, PRECISION=plan.precision,
                BLOCK_R=br, BLOCK_D=bd, BLOCK_K=bk)
    return Launch(_hidden_fwd_kernel, grid, args, meta, num_warps), parts


def hidden_bwd_launch(grad, hs, ht, w, b, mask=None, tw=None, budget: int = DE_BUDGET_BYTES, tf32=None):
    """The backward's launches, in order (three per chunk of rows; none for empty inputs), and the
    gradients they write: ``dhs`` (the student's dtype), ``dw``, ``db`` (float32)."""
    hs_c, ht_c, w_c, b_c, m, tw_c, plan, (t, k, rows, s, n, ds, dt) = _prepare(hs, ht, w, b, mask, tw, tf32)
    dev = hs.device
    if not (hs.numel() and ht.numel()):
        return [], torch.zeros(hs.shape, dtype=hs.dtype, device=dev), \
            torch.zeros(w.shape, dtype=torch.float32, device=dev), torch.zeros(b.shape, dtype=torch.float32, device=dev)
    dhs = torch.empty(hs.shape, dtype=hs.dtype, device=dev)
    dw = torch.empty(w.shape, dtype=torch.float32, device=dev)
    db = torch.empty(b.shape, dtype=torch.float32, device=dev)
    de_dtype = hs.dtype if plan.half else torch.float32
    rc = chunk_rows(rows, t * k, dt, torch.empty((), dtype=de_dtype).element_size(), budget)
    de = torch.empty((t * k, rc, dt), dtype=de_dtype, device=dev)
    scale = (grad.to(torch.float32) * 2.0 / _denominator(mask, rows, dt, dev)).reshape(())
    mask_arg = m if m is not None else hs_c
    tw_arg = tw_c if tw_c is not None else hs_c
    br, bd, bk, warps_e = hidden_config(rc, ds, dt, plan.mode, backward=True)
    dot = dict(DOT_FP32=plan.dot_fp32, PRECISION=plan.precision)
    meta_e = dict(HAS_MASK=m is not None, HAS_TW=tw_c is not None, **dot, BLOCK_R=br, BLOCK_D=bd, BLOCK_K=bk)
    wm, wn, wr, warps_w = gemm_config(ds, dt, rc, plan.mode, _vector_rows(ds, dt))
    xm, xn, xk, warps_x = gemm_config(rc, ds, dt, plan.mode, _vector_rows(ds, dt))
    launches = []
    for r0 in range(0, rows, rc):
        nr = min(rc, rows - r0)
        launches.append(Launch(_hidden_de_kernel, (t * k, triton.cdiv(nr, br), triton.cdiv(dt, bd)),
                               (hs_c, ht_c, w_c, b_c, mask_arg, tw_arg, de, r0, nr, rc, k, rows, s, n, ds, dt),
                               meta_e, warps_e))
        launches.append(Launch(_hidden_dw_kernel, (t * k, triton.cdiv(ds, wm), triton.cdiv(dt, wn)),
                               (hs_c, de, scale, dw, db, r0, nr, rc, k, rows, ds, dt),
                               dict(ACCUMULATE=r0 > 0, **dot, BLOCK_M=wm, BLOCK_N=wn, BLOCK_R=wr), warps_w))
        launches.append(Launch(_hidden_dx_kernel, (k, triton.cdiv(nr, xm), triton.cdiv(ds, xn)),
                               (de, w_c, scale, dhs, r0, nr, rc, t, k, rows, ds, dt),
                               dict(**dot, BLOCK_M=xm, BLOCK_N=xn, BLOCK_K=xk), warps_x))
    return launches, dhs, dw, db


def hidden_forward(hs, ht, w, b, mask=None, tw=None) -> torch.Tensor:
    launch, parts = hidden_fwd_launch(hs, ht, w, b, mask, tw)
    if launch is None:
        return hs.new_zeros((), dtype=torch.float32)
    launch()
    return parts.sum() / _denominator(mask, hs.shape[1] * hs.shape[2], ht.shape[-1], hs.device)


def hidden_backward(grad, hs, ht, w, b, mask=None, tw=None, budget: int = DE_BUDGET_BYTES):
    launches, dhs, dw, db = hidden_bwd_launch(grad, hs, ht, w, b, mask, tw, budget)
    for launch in launches:
        launch()
    return dhs, dw.to(w.dtype), db.to(b.dtype)


# ---------------------------------------------------------------------------------------------------
# torch.library ops: opaque to torch.compile, differentiable through register_autograd.


@torch.library.custom_op("fastmt::mt_hidden_forward", mutates_args=())
def mt_hidden_op(hs: torch.Tensor, ht: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                 mask: torch.Tensor | None, tw: torch.Tensor | None) -> torch.Tensor:
    return hidden_forward(hs, ht, w, b, mask, tw)


@mt_hidden_op.register_fake
def _(hs, ht, w, b, mask, tw):
    return hs.new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastmt::mt_hidden_backward", mutates_args=())
def mt_hidden_bwd_op(grad: torch.Tensor, hs: torch.Tensor, ht: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                     mask: torch.Tensor | None, tw: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return hidden_backward(grad, hs, ht, w, b, mask, tw)


@mt_hidden_bwd_op.register_fake
def _(grad, hs, ht, w, b, mask, tw):
    # Contiguous, as the kernels write them (empty_like would keep a transposed input's strides).
    return hs.new_empty(hs.shape), w.new_empty(w.shape), b.new_empty(b.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    hs, ht, w, b, mask, tw = ctx.saved_tensors
    dhs, dw, db = mt_hidden_bwd_op(grad, hs, ht, w, b, mask, tw)
    return dhs, None, dw, db, None, None


mt_hidden_op.register_autograd(_backward, setup_context=_setup)
