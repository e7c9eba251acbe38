"""Fused projection + masked, weighted MSE: ``fastmt.losses.mt_hidden_loss`` as Triton kernels.

For every (teacher i, student layer k) the error ``E = hs[k] @ W[i,k] + b[i,k] - ht[i,k]`` lives only
in registers, one ``[BLOCK_R, BLOCK_D]`` tile at a time; all T*K pairs are one launch.

- forward: each program builds its tile of E with a K-loop of ``tl.dot`` and writes one partial sum
  of ``c_r * E^2`` (``c_r = mask[n,s] * w[i,n]``); the loss is their sum over ``sum(mask) * Dt``.
- backward: each program recomputes its tile of E (flash-attention style: no saved activation),
  forms ``dE = 2 c E g / denom`` and accumulates ``d hs += dE @ W^T``, ``d W += hs^T @ dE``,
  ``d b += sum_r dE`` into float32 buffers with atomic adds. Three GEMMs' worth of work, as unfused.

Rows are the flattened ``(n, s)`` positions, ``R = N * S``. Products run in the student's dtype on
tensor cores for fp16/bf16 (the weight is cast to it, as autocast would) and in exact float32
(``input_precision="ieee"``, no TF32) for float32 and float64 inputs; accumulation is float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmt.kernels.kl import Launch


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
                DOT_FP32: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
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
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    bias = tl.load(b_ptr + (i * K + k) * Dt + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    y = tl.load(ht_ptr + ((i * K + k) * R + offs_r[:, None]) * Dt + offs_d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    return acc + bias[None, :] - y


@triton.jit
def _program_tile(hs_ptr, ht_ptr, w_ptr, b_ptr, mask_ptr, tw_ptr, K, R, S, N, Ds, Dt,
                  HAS_MASK: tl.constexpr, HAS_TW: tl.constexpr, DOT_FP32: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's (teacher, layer), its rows and columns, its error tile and row coefficients."""
    pid_ik = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    pid_d = tl.program_id(2).to(tl.int64)
    i = pid_ik // K
    k = pid_ik % K
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    r_ok = offs_r < R
    d_ok = offs_d < Dt
    e = _error_tile(hs_ptr, ht_ptr, w_ptr, b_ptr, i, k, K, R, Ds, Dt, offs_r, offs_d, r_ok, d_ok,
                    DOT_FP32, BLOCK_R, BLOCK_D, BLOCK_K)
    c = _row_coef(mask_ptr, tw_ptr, i, offs_r, r_ok, S, N, HAS_MASK, HAS_TW)
    # Rows with c == 0 (padding) are dropped, not multiplied: non-finite values there stay out.
    keep = (c[:, None] != 0) & d_ok[None, :]
    return i, k, offs_r, offs_d, r_ok, d_ok, e, c, keep


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
    HAS_MASK: tl.constexpr, HAS_TW: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    i, k, offs_r, offs_d, r_ok, d_ok, e, c, keep = _program_tile(
        hs_ptr, ht_ptr, w_ptr, b_ptr, mask_ptr, tw_ptr, K, R, S, N, Ds, Dt,
        HAS_MASK, HAS_TW, DOT_FP32, BLOCK_R, BLOCK_D, BLOCK_K)
    sq = tl.where(keep, c[:, None] * e * e, 0.0)
    pid = (tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
    tl.store(part_ptr + pid, tl.sum(tl.sum(sq, axis=1), axis=0))


@triton.jit
def _hidden_bwd_kernel(
    hs_ptr, ht_ptr, w_ptr, b_ptr, mask_ptr, tw_ptr,  # as in the forward kernel
    scale_ptr,  # [] float32: upstream gradient * 2 / (sum(mask) * Dt)
    dhs_ptr,  # [K, R, Ds] float32, accumulated
    dw_ptr,  # [T, K, Ds, Dt] float32, accumulated
    db_ptr,  # [T, K, Dt] float32, accumulated
    K, R, S, N, Ds, Dt,
    HAS_MASK: tl.constexpr, HAS_TW: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    i, k, offs_r, offs_d, r_ok, d_ok, e, c, keep = _program_tile(
        hs_ptr, ht_ptr, w_ptr, b_ptr, mask_ptr, tw_ptr, K, R, S, N, Ds, Dt,
        HAS_MASK, HAS_TW, DOT_FP32, BLOCK_R, BLOCK_D, BLOCK_K)
    # The upstream scale (~2/(sum(mask) Dt), tiny) is applied after the products: folded into a
    # half-precision dE first, a converged error would underflow to subnormals.
    scale = tl.load(scale_ptr)
    de = tl.where(keep, c[:, None] * e, 0.0)  # [BLOCK_R, BLOCK_D] float32, unscaled

    tl.atomic_add(db_ptr + (i * K + k) * Dt + offs_d, tl.sum(de, axis=0) * scale, mask=d_ok)
    x_base = hs_ptr + k * R * Ds
    w_base = w_ptr + (i * K + k) * Ds * Dt
    if not DOT_FP32:
        de_lo = de.to(hs_ptr.dtype.element_ty)
    for k0 in range(0, Ds, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < Ds
        x = tl.load(x_base + offs_r[:, None] * Ds + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + offs_k[:, None] * Dt + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            dx = tl.dot(de, tl.trans(w.to(tl.float32)), input_precision="ieee")
            dw = tl.dot(tl.trans(x.to(tl.float32)), de, input_precision="ieee")
        else:
            dx = tl.dot(de_lo, tl.trans(w.to(x.dtype)))
            dw = tl.dot(tl.trans(x), de_lo)
        tl.atomic_add(dhs_ptr + (k * R + offs_r[:, None]) * Ds + offs_k[None, :], dx * scale,
                      mask=r_ok[:, None] & k_ok[None, :])
        tl.atomic_add(dw_ptr + ((i * K + k) * Ds + offs_k[:, None]) * Dt + offs_d[None, :], dw * scale,
                      mask=k_ok[:, None] & d_ok[None, :])


def _blocks(rows: int, ds: int, dt: int) -> tuple[int, int, int]:
    # tl.dot needs every tile side >= 16.
    block_r = max(16, min(64, triton.next_power_of_2(rows)))
    block_d = max(16, min(64, triton.next_power_of_2(dt)))
    block_k = max(16, min(32, triton.next_power_of_2(ds)))
    return block_r, block_d, block_k


def hidden_config(rows: int, ds: int, dt: int, dot_fp32: bool, backward: bool) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_D, BLOCK_K, num_warps) for one direction of the loss."""
    block_r, block_d, block_k = _blocks(rows, ds, dt)
    # Spills seen by ``python -m fastmt.kernels.aot`` (sm_80 and sm_90) at 4 warps: hundreds of bytes
    # in backward's float32 products (FMA, no tensor cores), a few in forward with float64 inputs.
    # Backward in float32 holds the error tile, dE and two products at once: 32 rows and 16 columns of
    # hs per step over 8 warps keep it in registers; in half precision it sat at the 255-register
    # ceiling with 4 warps, 8 leave ~100 registers of room. Forward in half precision keeps 4 warps.
    if backward:
        if dot_fp32:
            return min(block_r, 32), block_d, 16, 8
        return block_r, block_d, block_k, 8
    return block_r, block_d, block_k, 8 if dot_fp32 else 4


def _prepare(hs, ht, w, b, mask, tw, backward: bool):
    """Contiguous views, the dot dtype and the launch grid of one direction."""
    k, n, s, ds = hs.shape
    t, dt = ht.shape[0], ht.shape[-1]
    rows = n * s
    dot_fp32 = hs.dtype not in (torch.float16, torch.bfloat16)
    if hs.dtype == torch.bfloat16 and hs.device.type == "cpu":
        # Triton's CPU interpreter (3.9) returns garbage from a bfloat16 tl.dot (numpy has no bfloat16):
        # there the products run in float32. On a GPU bfloat16 takes the same path as float16.
        dot_fp32 = True
    # Half-precision students multiply on tensor cores: the weight joins their dtype, as under autocast.
    w_in = w.contiguous() if dot_fp32 else w.to(hs.dtype).contiguous()
    m = mask.reshape(rows).contiguous() if mask is not None else None
    if m is not None and m.dtype == torch.bool:
        m = m.to(torch.uint8)
    tw_in = tw.contiguous() if tw is not None else None
    br, bd, bk, num_warps = hidden_config(rows, ds, dt, dot_fp32, backward)
    grid = (t * k, triton.cdiv(rows, br), triton.cdiv(dt, bd))
    meta = dict(HAS_MASK=m is not None, HAS_TW=tw_in is not None, DOT_FP32=dot_fp32, BLOCK_R=br, BLOCK_D=bd, BLOCK_K=bk)
    dims = (k, rows, s, n, ds, dt)
    return hs.contiguous(), ht.contiguous(), w_in, b.contiguous(), m, tw_in, grid, meta, dims, num_warps


def _denominator(mask, rows: int, dt: int, device) -> torch.Tensor:
    count = mask.to(torch.float32).sum() if mask is not None else torch.full((), float(rows), device=device)
    denom = count * dt
    return torch.where(denom > 0, denom, torch.ones_like(denom))


def hidden_fwd_launch(hs, ht, w, b, mask=None, tw=None) -> tuple[Launch | None, torch.Tensor | None]:
    """The forward launch and its buffer of partial sums (allocated, not written); ``(None, None)`` for
    empty inputs. Nothing runs on the inputs' data, so meta tensors give the exact launch."""
    hs_c, ht_c, w_c, b_c, m, tw_c, grid, meta, dims, num_warps = _prepare(hs, ht, w, b, mask, tw, backward=False)
    if hs.numel() == 0 or ht.numel() == 0:
        return None, None
    parts = torch.empty(grid[0] * grid[1] * grid[2], dtype=torch.float32, device=hs.device)
    args = (hs_c, ht_c, w_c, b_c, m if m is not None else hs_c, tw_c if tw_c is not None else hs_c, parts, *dims)
    return Launch(_hidden_fwd_kernel, grid, args, meta, num_warps), parts


def hidden_bwd_launch(grad, hs, ht, w, b, mask=None, tw=None):
    """The backward launch (None for empty inputs) and its float32 accumulators ``dhs, dw, db``, zeroed."""
    hs_c, ht_c, w_c, b_c, m, tw_c, grid, meta, dims, num_warps = _prepare(hs, ht, w, b, mask, tw, backward=True)
    dhs = torch.zeros(hs.shape, dtype=torch.float32, device=hs.device)
    dw = torch.zeros(w.shape, dtype=torch.float32, device=hs.device)
    db = torch.zeros(b.shape, dtype=torch.float32, device=hs.device)
    if not (hs.numel() and ht.numel()):
        return None, dhs, dw, db
    scale = (grad.to(torch.float32) * 2.0 / _denominator(mask, dims[1], dims[5], hs.device)).reshape(())
    args = (hs_c, ht_c, w_c, b_c, m if m is not None else hs_c, tw_c if tw_c is not None else hs_c,
            scale, dhs, dw, db, *dims)
    return Launch(_hidden_bwd_kernel, grid, args, meta, num_warps), dhs, dw, db


def hidden_forward(hs, ht, w, b, mask=None, tw=None) -> torch.Tensor:
    launch, parts = hidden_fwd_launch(hs, ht, w, b, mask, tw)
    if launch is None:
        return hs.new_zeros((), dtype=torch.float32)
    launch()
    return parts.sum() / _denominator(mask, hs.shape[1] * hs.shape[2], ht.shape[-1], hs.device)


def hidden_backward(grad, hs, ht, w, b, mask=None, tw=None):
    launch, dhs, dw, db = hidden_bwd_launch(grad, hs, ht, w, b, mask, tw)
    if launch is not None:
        launch()
    return dhs.to(hs.dtype), dw.to(w.dtype), db.to(b.dtype)


# ---------------------------------------------------------------------------------------------------
# torch.library ops: opaque to torch.compile, differentiable through register_autograd.


@torch.library.custom_op("fastmt::mt_hidden_loss", mutates_args=())
def mt_hidden_op(hs: torch.Tensor, ht: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                 mask: torch.Tensor | None, tw: torch.Tensor | None) -> torch.Tensor:
    return hidden_forward(hs, ht, w, b, mask, tw)


@mt_hidden_op.register_fake
def _(hs, ht, w, b, mask, tw):
    return hs.new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastmt::mt_hidden_loss_backward", mutates_args=())
def mt_hidden_bwd_op(grad: torch.Tensor, hs: torch.Tensor, ht: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                     mask: torch.Tensor | None, tw: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return hidden_backward(grad, hs, ht, w, b, mask, tw)


@mt_hidden_bwd_op.register_fake
def _(grad, hs, ht, w, b, mask, tw):
    return torch.empty_like(hs), torch.empty_like(w), torch.empty_like(b)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    hs, ht, w, b, mask, tw = ctx.saved_tensors
    dhs, dw, db = mt_hidden_bwd_op(grad, hs, ht, w, b, mask, tw)
    return dhs, None, dw, db, None, None


mt_hidden_op.register_autograd(_backward, setup_context=_setup)
