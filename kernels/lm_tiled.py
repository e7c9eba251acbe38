"""The causal-LM loss as a custom op, and its vocabulary-tiled torch path (no Triton needed).

``fastmt.kernels.lm_linear_kl_loss`` runs in two steps on either backend:

1. statistics ``[1 + 4T, N]`` float32 per token: the student's and each teacher's tempered
   log-sum-exp (base 2), each teacher's untempered log-sum-exp (nats), each teacher's KL (nats);
2. with the teacher weights made from them, the gradients ``d hs = tau / rows * G ws`` and
   ``d ws = tau / rows * G^T hs``.

``fastmt.kernels.lm_kl`` does both with Triton kernels (CUDA, or the CPU interpreter). Here the same
algorithm runs in torch over tiles of ``TILE`` vocabulary columns: each tile's logits
``[N, TILE]`` per model exist for one step of the loop and are folded into running statistics, so
memory does not grow with the vocabulary (beyond the output matrices themselves and their
gradient); this is the path on a CPU without the interpreter. The float64 reference forms every
``[N, V]``: ``fastmt.losses.lm_linear_kl_loss``.
"""

from __future__ import annotations

import math

import torch

import fastmt.kernels.lm_chunks as lm_chunks
from fastmt import losses as _ref
from fastmt.kernels.lm_common import grad_dtype, stack_teachers

try:  # Triton is optional: without it the vocabulary tiles run in torch (backend "torch")
    import fastmt.kernels.lm_kl as lm_kl
    from fastmt.kernels.hidden_mse import dot_plan
except ImportError:
    lm_kl = dot_plan = None

# Vocabulary columns per tile of the torch path: [N, 4096] float32 per model and temporary.
TILE = 4096
LN2 = math.log(2.0)
_NEG = -1.0e30  # finite floor for running maxima (no inf - inf)


def teacher_weights(stats, ht, wt, targets, weights, ignore_index: int) -> torch.Tensor:
    """``[T, N]`` float32 teacher weights from the statistics, 0 on rows that do not count."""
    t = ht.shape[0]
    valid = targets != ignore_index
    if isinstance(weights, torch.Tensor):
        w = weights.detach().to(torch.float32)
    elif weights in ("paper", "softmax"):
        # CE_i = untempered log-sum-exp - the logit of the next token: one row of each output matrix.
        idx = torch.where(valid, targets, 0).long().clamp(0, wt.shape[1] - 1)
        z_y = torch.stack([(ht[i].float() * wt[i].index_select(0, idx).float()).sum(-1) for i in range(t)])
        ce = stats[1 + t: 1 + 2 * t] - z_y
        w = _ref.weights_from_ce(ce, weights)
    else:  # uniform, or none: every teacher 1
        w = torch.ones_like(stats[1: 1 + t])
    return torch.where(valid, w, 0.0)


def _tile_logits(hs, ws, ht, wt, v0: int, v1: int):
    """The student's ``[N, v1-v0]`` and the teachers' ``[T, N, v1-v0]`` logits of one tile, float32."""
    zs = (hs @ ws[v0:v1].t()).float()
    zt = torch.bmm(ht, wt[:, v0:v1].transpose(1, 2)).float()
    return zs, zt


def tiled_stats(hs, ws, ht, wt, tau: float, reverse: bool, need_u: bool, tile: int | None = None) -> torch.Tensor:
    """``_lm_stats_kernel``'s output, computed tile by tile in torch (natural units inside)."""
    tile = tile or TILE
    n, v, t = hs.shape[0], ws.shape[0], ht.shape[0]
    dev = hs.device
    m_s = torch.full((n,), _NEG, device=dev)
    d_s = torch.zeros(n, device=dev)
    m_t = torch.full((t, n), _NEG, device=dev)
    d_t, a_t, u_t = (torch.zeros(t, n, device=dev) for _ in range(3))
    for v0 in range(0, v, tile):
        zs, zt = _tile_logits(hs, ws, ht, wt, v0, min(v, v0 + tile))
        xs, xt = zs / tau, zt / tau
        ms_new = torch.maximum(m_s, xs.amax(1))
        alpha_s = torch.exp(m_s - ms_new)
        es = torch.exp(xs - ms_new[:, None])
        d_s = d_s * alpha_s + es.sum(1)
        mt_new = torch.maximum(m_t, xt.amax(2))
        alpha = torch.exp(m_t - mt_new)
        et = torch.exp(xt - mt_new[:, :, None])
        d_t = d_t * alpha + et.sum(2)
        if reverse:
            a_t = a_t * alpha_s + (es[None] * (xs[None] - xt)).sum(2)
        else:
            a_t = a_t * alpha + (et * (xt - xs[None])).sum(2)
        if need_u:
            u_t = u_t * torch.exp(tau * (m_t - mt_new)) + torch.exp(tau * (xt - mt_new[:, :, None])).sum(2)
        m_s, m_t = ms_new, mt_new
    lse_s = m_s + d_s.log()
    lse_t = m_t + d_t.log()
    kl = a_t / d_s - lse_s + lse_t if reverse else a_t / d_t - lse_t + lse_s
    lse_u = tau * m_t + u_t.log() if need_u else lse_t
    out = torch.empty((1 + 4 * t, n), dtype=torch.float32, device=dev)
    out[0] = lse_s / LN2
    out[1: 1 + t] = lse_t / LN2
    out[1 + t: 1 + 2 * t] = lse_u
    out[1 + 2 * t: 1 + 3 * t] = kl
    out[1 + 3 * t:] = d_t
    return out


def tiled_grads(hs, ws, ht, wt, stats, w, tau: float, reverse: bool, tile: int | None = None):
    """``(G ws, G^T hs)`` in float32, one vocabulary tile of ``G [N, tile]`` at a time."""
    tile = tile or TILE
    n, v, t = hs.shape[0], ws.shape[0], ht.shape[0]
    lse_s = stats[0] * LN2
    lse_t = stats[1: 1 + t] * LN2
    kl = stats[1 + 2 * t: 1 + 3 * t]
    d_hs = torch.zeros((n, hs.shape[1]), dtype=torch.float32, device=hs.device)
    d_ws = torch.empty((v, ws.shape[1]), dtype=torch.float32, device=hs.device)
    hs32 = hs.float()
    for v0 in range(0, v, tile):
        v1 = min(v, v0 + tile)
        zs, zt = _tile_logits(hs, ws, ht, wt, v0, v1)
        lq = zs / tau - lse_s[:, None]
        q = lq.exp()
        lp = zt / tau - lse_t[:, :, None]
        if reverse:
            g = (w[:, :, None] * q[None] * ((lq[None] - lp) - kl[:, :, None])).sum(0)
        else:
            g = w.sum(0)[:, None] * q - (w[:, :, None] * lp.exp()).sum(0)
        d_hs += g @ ws[v0:v1].float()
        d_ws[v0:v1] = g.t() @ hs32
    return d_hs, d_ws


def _forward(hs, ws, ht, wt, targets, weights, tau: float, ignore_index: int, reverse: bool, chunk_bytes: int,
             backend: str, with_grad: bool):
    """``(loss, d hs, d ws)``: the gradients (for an upstream gradient of 1, in ``grad_dtype`` of their
    inputs') are made in the forward, as the classification KL kernel makes its own;
    without ``with_grad`` they are None. ``backend``: ``chunks`` (``fastmt.kernels.lm_chunks``),
    ``triton`` (``fastmt.kernels.lm_kl``) or ``torch`` (the vocabulary tiles here)."""
    t = ht.shape[0]
    if backend == "chunks":
        return lm_chunks.chunked(hs, ws, ht, wt, targets, weights, tau, ignore_index, reverse, chunk_bytes, with_grad)
    if backend in ("logits", "logits-torch"):  # ht holds the teachers' logits [T, N, V]; wt is unused
        return lm_chunks.chunked(hs, ws, None, None, targets, weights, tau, ignore_index, reverse, chunk_bytes,
                                 with_grad, t_logits=ht, kernels=backend == "logits")
    need_u = isinstance(weights, str) and weights != "uniform"
    if backend == "triton":
        # Half-precision inputs multiply on tensor cores: each output matrix joins its hidden states' dtype.
        ws_c = ws.to(hs.dtype).contiguous() if dot_plan(hs.dtype, hs.device.type).half else ws.contiguous()
        wt_c = wt.to(ht.dtype) if dot_plan(ht.dtype, ht.device.type).half else wt
        hs_c = hs.contiguous()
        stats = lm_kl.triton_stats(hs_c, ws_c, ht, wt_c, tau, reverse, need_u)
    else:
        hs_c, ws_c, wt_c = hs, ws.to(hs.dtype), wt.to(ht.dtype)
        stats = tiled_stats(hs_c, ws_c, ht, wt_c, tau, reverse, need_u)
    w = teacher_weights(stats, ht, wt_c, targets, weights, ignore_index)
    n_valid = (targets != ignore_index).sum().to(torch.float32).clamp_min(1.0)
    kl = stats[1 + 2 * t: 1 + 3 * t]
    loss = (tau * tau) * torch.where(w != 0, w * kl, 0.0).sum() / n_valid
    if not with_grad:
        return loss, None, None
    if backend == "triton":
        d_hs, d_ws = lm_kl.triton_grads(hs_c, ws_c, ht, wt_c, stats, w, tau, reverse, chunk_bytes)
    else:
        d_hs, d_ws = tiled_grads(hs_c, ws_c, ht, wt_c, stats, w, tau, reverse)
    scale = tau / n_valid  # d loss / d logits = tau / counted rows * G (at an upstream gradient of 1)
    return loss, d_hs.mul_(scale).to(grad_dtype(hs.dtype)), d_ws.mul_(scale).to(grad_dtype(ws.dtype))


# A torch.library custom op, so that a step calling the loss compiles under torch.compile(fullgraph=True)
# without a graph break (the kernels inside are opaque to the compiler, as the classification losses' are).
@torch.library.custom_op("fastmt::lm_linear_kl", mutates_args=())
def lm_linear_kl_op(hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor, wt: torch.Tensor, targets: torch.Tensor,
                    weights: torch.Tensor | None, scheme: str | None, temperature: float, ignore_index: int,
                    reverse: bool, chunk_bytes: int, backend: str,
                    with_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, d hs, d ws)``; the gradients are empty without ``with_grad``."""
    loss, d_hs, d_ws = _forward(hs, ws, ht, wt, targets, weights if weights is not None else scheme, temperature,
                                ignore_index, reverse, chunk_bytes, backend, with_grad)
    if d_hs is None:
        d_hs, d_ws = hs.new_empty((0,), dtype=grad_dtype(hs.dtype)), hs.new_empty((0,), dtype=grad_dtype(ws.dtype))
    return loss, d_hs, d_ws


@lm_linear_kl_op.register_fake
def _(hs, ws, ht, wt, targets, weights, scheme, temperature, ignore_index, reverse, chunk_bytes, backend, with_grad):
    return (hs.new_empty((), dtype=torch.float32),
            hs.new_empty(hs.shape if with_grad else (0,), dtype=grad_dtype(hs.dtype)),
            hs.new_empty(ws.shape if with_grad else (0,), dtype=grad_dtype(ws.dtype)))


def _setup(ctx, inputs, output):
    ctx.with_grad = inputs[12]
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)
    ctx.save_for_backward(output[1], output[2])


def _backward(ctx, grad_loss, grad_hs, grad_ws):
    none = (None,) * 11
    if not ctx.with_grad:
        return (None, None) + none
    d_hs, d_ws = ctx.saved_tensors
    return (d_hs * grad_loss).to(ctx.dtypes[0]), (d_ws * grad_loss).to(ctx.dtypes[1]), *none


lm_linear_kl_op.register_autograd(_backward, setup_context=_setup)


def lm_linear_kl(hs, ws, ht, wt, targets, weights, temperature: float, ignore_index: int, reverse: bool,
                 chunk_bytes: int, backend: str) -> torch.Tensor:
    """The loss on checked arguments (``fastmt.kernels.lm_linear_kl_loss`` checks them); ``backend``:
    ``chunks`` (``fastmt.kernels.lm_chunks``), ``triton`` (``fastmt.kernels.lm_kl``) or ``torch`` (the
    tiles above)."""
    ht = (ht if isinstance(ht, torch.Tensor) else stack_teachers(list(ht))).detach()
    wt = (wt if isinstance(wt, torch.Tensor) else stack_teachers(list(wt))).detach()
    with_grad = torch.is_grad_enabled() and (hs.requires_grad or ws.requires_grad)
    w_tensor = weights.detach() if isinstance(weights, torch.Tensor) else None
    scheme = weights if isinstance(weights, str) else None
    loss, _, _ = lm_linear_kl_op(hs, ws, ht, wt, targets, w_tensor, scheme, float(temperature), int(ignore_index),
                                 bool(reverse), int(chunk_bytes), backend, with_grad)
    return loss
