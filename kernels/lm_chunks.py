"""The causal-LM loss over chunks of rows: cuBLAS GEMMs for every product, the KL row kernel between.

``fastmt.kernels.lm_linear_kl_loss`` on a GPU runs here by default (``backend="chunks"``). Per chunk
of ``R`` token rows (``R`` chosen so that the chunk's logits stay within a byte budget):

1. the student's logits ``[R, V]`` and the teachers' ``[T, R, V]``: ``T + 1`` GEMMs in the inputs'
   dtype (tensor cores for half precision), never ``N x V``;
2. ``fastmt.kernels.kl``'s row kernel (the classification KL kernel: the same weights from each
   teacher's untempered cross-entropy on the target, the same temperature, rows of ``ignore_index``
   skipped) gives the chunk's share of the loss and ``d loss / d student logits`` for the chunk,
   averaged over the counted rows of the whole batch (its ``count`` argument), not the chunk's;
   the reverse KL, which that kernel does not compute, runs the reference's formula on the chunk;
3. two GEMMs turn that gradient into the chunk's rows of ``d hs`` and its part of ``d ws``, which
   is summed in float32 (in place, where cuBLAS writes float32 from half inputs).

That is ``T + 3`` products of ``2 R V D`` per chunk, against ``2 (T + 1) + 2`` for the
vocabulary-tiled kernels of ``fastmt.kernels.lm_kl`` (which recompute the logits for the gradient)
and ``4 T`` for a single-teacher chunked loss run once per teacher. The price: the chunk's logits
(``(T + 2) R V`` elements) and the float32 ``d ws`` read and written once per chunk.
"""

from __future__ import annotations

import torch

from fastmt import losses as _ref
from fastmt.kernels.lm_common import grad_dtype, product

try:  # Triton is optional: without it the torch formula serves (``kernels=False``)
    import fastmt.kernels.kl as _kl
except ImportError:
    _kl = None

# Bytes the chunk's float32 logits and gradient (T + 2 blocks of [R, V]) may take.
CHUNK_BYTES = 1024 * 1024 * 1024


def chunk_rows(n: int, v: int, t: int, itemsize: int, budget: int = CHUNK_BYTES) -> int:
    """Rows per chunk: as many as keep the float32 logits and gradient (``T + 2`` blocks of ``[rows, V]``)
    and the gradient in the inputs' dtype within ``budget`` bytes (at least 16)."""
    return max(16, min(n, budget // max(1, ((t + 2) * 4 + itemsize) * v)))


def torch_chunk(zs, zt, y, weights, tau, ignore_index, count, reverse: bool):
    """One chunk in torch, either direction: ``(loss share, d loss / d zs)``, averaged over ``count``
    rows. Forward: ``d KL(p_i || q) / d (zs / tau) = q - p_i``; reverse: ``q ((log q - log p_i) - KL_i)``.
    The weights are constants (from the teachers' untempered cross-entropy on the target)."""
    valid = y != ignore_index
    if isinstance(weights, torch.Tensor):
        w = weights.float()
    elif weights in ("paper", "softmax"):
        w = _ref.teacher_weights(zt.float(), torch.where(valid, y, 0), weights).float()
    else:  # uniform, or none: every teacher 1
        w = torch.ones(zt.shape[:2], dtype=torch.float32, device=zs.device)
    w = torch.where(valid, w, 0.0)
    lq = torch.log_softmax(zs.float() / tau, -1)
    lp = torch.log_softmax(zt.float() / tau, -1)
    q = lq.exp()
    if reverse:
        diff = torch.where(q > 0, lq - lp, 0.0)  # [T,R,V]; 0 where q is, so a -inf teacher logit gives no NaN
        kl = (q * diff).sum(-1)  # [T,R]
        diff.sub_(kl[..., None]).mul_(q).mul_(w[..., None])
        grad = diff.sum(0)
    else:
        p = lp.exp()
        kl = (p * torch.where(p > 0, lp - lq, 0.0)).sum(-1)
        grad = w.sum(0)[:, None] * q - (w[..., None] * p).sum(0)
    loss = (tau * tau) * torch.where(w != 0, w * kl, 0.0).sum() / count
    return loss, grad.mul_(tau / count)


def chunked(hs, ws, ht, wt, targets, weights, tau: float, ignore_index: int, reverse: bool,
            chunk_bytes: int, with_grad: bool, t_logits: torch.Tensor | None = None, kernels: bool = True):
    """``(loss, d hs, d ws)`` for an upstream gradient of 1 (None without ``with_grad``), in
    ``lm_common.grad_dtype`` of their inputs' dtypes (``d ws`` is summed over chunks in float32). Logits
    are float32 (a half GEMM that writes float32), so the KL sees the products unrounded; the gradient
    block is rounded to the inputs' dtype for its two GEMMs, as in ``fastmt.kernels.lm_kl``.
    ``t_logits`` ``[T, N, V]``: the teachers' logits as given, instead of ``ht`` and ``wt`` (None then).
    ``kernels``: the KL row kernel for the forward KL (else the torch formula, as for the reverse)."""
    n, v = hs.shape[0], ws.shape[0]
    t = t_logits.shape[0] if t_logits is not None else ht.shape[0]
    dtype = hs.dtype
    ws_c = ws.to(dtype)
    wt_c = wt.to(ht.dtype) if t_logits is None else None
    count = (targets != ignore_index).sum().to(torch.float32).clamp_min(1.0)
    w_tensor = weights.detach().float() if isinstance(weights, torch.Tensor) else None
    scheme = weights if isinstance(weights, str) else None
    rows = chunk_rows(n, v, t if t_logits is None else 0, dtype.itemsize, chunk_bytes)
    loss = torch.zeros((), dtype=torch.float32, device=hs.device)
    d_hs = torch.empty(hs.shape, dtype=grad_dtype(dtype), device=hs.device) if with_grad else None
    d_ws = torch.zeros((v, ws.shape[1]), dtype=torch.float32, device=hs.device) if with_grad else None
    zs_buf = torch.empty((rows, v), dtype=torch.float32, device=hs.device)
    zt_buf = torch.empty((t, rows, v), dtype=torch.float32, device=hs.device) if t_logits is None else None
    zs = zt = g = None  # views of the buffers (or the block's gradient), dropped before d ws is rounded
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        h = hs[r0:r1]
        zs = zs_buf[: r1 - r0]
        product(h, ws_c.t(), zs)
        if t_logits is None:
            zt = zt_buf[:, : r1 - r0]
            for i in range(t):
                product(ht[i, r0:r1], wt_c[i].t(), zt[i])
        else:
            zt = t_logits[:, r0:r1]
        y = targets[r0:r1]
        w = w_tensor[:, r0:r1] if w_tensor is not None else None
        if reverse or not kernels:
            part, g = torch_chunk(zs, zt, y, w if w is not None else scheme, tau, ignore_index, count, reverse)
        else:
            part, g = _kl.kl_forward(zs, zt, w, scheme if w is None else None, tau, y, ignore_index,
                                     with_grad=with_grad, count=count)
        loss += part
        if not with_grad:
            continue
        g = g.to(dtype)
        if d_hs.dtype == dtype:
            torch.mm(g, ws_c, out=d_hs[r0:r1])
        else:
            product(g, ws_c, d_hs[r0:r1])
        product(g.t(), h, d_ws, accumulate=True)
    if not with_grad:
        return loss, None, None
    del zs_buf, zt_buf, zs, zt, g
    return loss, d_hs, d_ws.to(grad_dtype(ws.dtype))
