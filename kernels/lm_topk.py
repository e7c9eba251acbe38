"""The top-k (cached-teacher) loss from the student's output layer, its gradients made in the forward.

``fastmt.kernels.lm_topk_linear_kl_loss`` equals ``fastmt.losses.lm_topk_kl_loss(h @ w.T, ...)`` with
the forward KL, without forming ``h @ w.T`` beyond one chunk of rows and without an autograd graph over
the vocabulary. Per chunk of rows (torch; any device):

1. ``z = h_c w^T / tau`` (float32), ``lse = logsumexp(z)``, ``q = exp(z - lse)``;
2. per teacher ``i`` and row: the student's mass outside the teacher's ids,
   ``Q_i = sum(q) - sum_{k in S_i} q_k``, both sums in float64 over the same float32 ``q``, so the
   ids' own rounding cancels and ``Q_i`` is as exact as a sum over the outside alone (a row whose
   ``Q_i`` is below ``1e-30`` takes the log-sum-exp over its masked logits instead);
3. ``KL_i = sum_k p_k (lp_k - log q_k) + r_i (log r_i - log Q_i)`` (the tail term where the teacher
   has tail mass ``r_i`` and the student has some);
4. its gradient, made here: with ``c_i = w_i tau / count`` (``w_i`` the teacher weight) and
   ``m_i = sum_k p_k + r_i``, ``d z_v = q_v sum_i c_i m_i - sum_i c_i r_i q_v / Q_i [v not in S_i]
   - sum_i c_i p_{i,v} [v in S_i]`` (``d z`` of ``tau^2 KL`` through ``z / tau``; the middle term from
   a copy of ``q`` with the ids zeroed, so nothing large cancels), then ``d h_c = d z w`` and
   ``d w += d z^T h_c``.

So the vocabulary is read a few times a chunk (``T + 3`` passes), where autograd through
the reference formula materialises ``[T, rows, V]`` masks and log-sum-exps and, under checkpointing,
runs the forward twice. The reverse KL keeps the reference (``fastmt.tasks.lm.cached``).
"""

from __future__ import annotations

import torch

from fastmt import losses as _ref
from fastmt.kernels.lm_common import product

CHUNK_BYTES = 256 * 1024 * 1024  # float32 [rows, V] blocks a chunk may hold (z, q, the gradient)
_TINY_TAIL = 1e-30  # below it, the student's outside mass is recomputed as a log-sum-exp


def _weights(scheme, target, t: int, n: int, device) -> torch.Tensor:
    """``[T, N]`` teacher weights (float64) as ``lm_topk_kl_loss`` makes them."""
    if isinstance(scheme, torch.Tensor):
        return scheme.detach().double()
    if scheme is None or scheme == "uniform":
        return torch.ones((t, n), dtype=torch.float64, device=device)
    ce = -target.detach().to(_ref.compute_dtype(target))  # the reference's precision (the stored values')
    return _ref.weights_from_ce(ce, scheme).double()


def _chunk(z, ids, lp, lr, w, y, ignore_index, scale, tau, want_grad: bool):
    """Loss (float64 sum over the chunk's counted rows, already times ``tau^2 / count``) and ``d z``
    (in ``z``'s dtype: the gradient of that loss with respect to the chunk's unscaled logits)."""
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # [R, 1]
    q = torch.exp(z - lse)  # [R, V] float32
    total = q.sum(-1, dtype=torch.float64)  # [R]
    t = ids.shape[0]
    q_k = q.unsqueeze(0).expand(t, -1, -1).gather(-1, ids)  # [T, R, K]
    q_out = (total.unsqueeze(0) - q_k.double().sum(-1)).clamp_min(0.0)  # [T, R]
    lq_k = (z.unsqueeze(0).expand(t, -1, -1).gather(-1, ids) - lse.unsqueeze(0)).double()  # [T, R, K]
    lq_out = torch.log(q_out)
    tiny = q_out < _TINY_TAIL
    if bool(tiny.any()):
        for i, r in tiny.nonzero().tolist():  # rare: the student has (almost) no mass outside the ids
            masked = z[r].scatter(0, ids[i, r], float("-inf"))
            lq_out[i, r] = (torch.logsumexp(masked, 0) - lse[r, 0]).double()
            q_out[i, r] = lq_out[i, r].exp()
    lp = lp.double()
    p = lp.exp()
    r = lr.double().exp()
    has_tail = (r > 0) & (lq_out > float("-inf"))
    kl = (p * (lp - lq_k)).sum(-1) + torch.where(has_tail, r * (lr.double().clamp_min(-1e300) - lq_out), 0.0)
    valid = (y != ignore_index).unsqueeze(0)
    c = torch.where(valid, w, 0.0) * scale  # [T, R]: weight x tau^2 / count
    loss = (c * torch.where(valid, kl, 0.0)).sum()
    if not want_grad:
        return loss, None
    c = c / tau  # d/dz of z/tau
    dt = q.dtype
    m = p.sum(-1) + torch.where(has_tail, r, 0.0)
    dz = q * (c * m).sum(0).to(dt).unsqueeze(-1)
    # The tail term's part, q_v r / Q_i outside the teacher's ids, from a copy of q with the ids zeroed (never
    # "all of q, minus the ids again": where Q_i is small that difference loses every digit).
    a = torch.where(has_tail & ~tiny, r / q_out.clamp_min(1e-300), 0.0)
    for i in range(t):
        dz.sub_(q.scatter(-1, ids[i], 0.0).mul_((c[i] * a[i]).to(dt).unsqueeze(-1)))
        dz.scatter_add_(-1, ids[i], (-(c[i].unsqueeze(-1) * p[i])).to(dt))
    if bool(tiny.any()):  # q_v / Q_i as one exponential, where both are below float range
        for i, row in (tiny & has_tail).nonzero().tolist():
            rel = torch.exp(z[row] - lse[row, 0] - lq_out[i, row].to(dt)).scatter(0, ids[i, row], 0.0)
            dz[row].sub_(rel * (c[i, row] * r[i, row]).to(dt))
    return loss, dz


class _TopKLinearKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, ids, lp, lr, weights, y, tau, ignore_index, chunk_bytes):
        want = h.requires_grad or w.requires_grad
        n, v = h.shape[0], w.shape[0]
        rows = max(1, min(n, chunk_bytes // max(1, 12 * v)))
        count = float((y != ignore_index).sum().clamp_min(1))
        scale = tau * tau / count
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32  # logits, d z, d h, d w
        wc = w.to(h.dtype)
        loss = torch.zeros((), dtype=torch.float64, device=h.device)
        d_h = torch.zeros((n, h.shape[1]), dtype=acc, device=h.device) if want else None
        d_w = torch.zeros((v, w.shape[1]), dtype=acc, device=h.device) if want else None
        with torch.autocast(h.device.type, enabled=False):
            for r0 in range(0, n, rows):
                sl = slice(r0, r0 + rows)
                hc = h[sl]
                z = (hc @ wc.t()).to(acc) / tau
                part, dz = _chunk(z, ids[:, sl], lp[:, sl], lr[:, sl], weights[:, sl], y[sl], ignore_index, scale, tau,
                                  want)
                loss += part
                if want:
                    # Half inputs: GEMMs on tensor cores that write float32 (lm_common.product), d w summed in place.
                    g = dz.to(hc.dtype)
                    product(g, wc, d_h[sl])
                    product(g.t(), hc, d_w, accumulate=True)
        if want:
            ctx.save_for_backward(d_h, d_w)
        ctx.want = want
        ctx.dtypes = (h.dtype, w.dtype)
        return loss.to(acc)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.want:
            return (None,) * 10
        d_h, d_w = ctx.saved_tensors
        return (d_h * grad).to(ctx.dtypes[0]), (d_w * grad).to(ctx.dtypes[1]), *(None,) * 8


def lm_topk_linear_kl_loss(hidden, weight, topk_ids, topk_logprobs, targets, weights="paper", temperature=1.0,
                           ignore_index=-100, target_logprobs=None, tail_logprobs=None, chunk_bytes=None):
    """``fastmt.losses.lm_topk_kl_loss(hidden @ weight.T, topk_ids, topk_logprobs, targets, weights,
    temperature, ignore_index, "forward", target_logprobs, tail_logprobs)`` with gradients for
    ``hidden [N, D]`` and ``weight [V, D]``, a chunk of rows at a time (see the module docstring).
    ``tail_logprobs`` is required here (a cache stores it): the tail is exact, not ``1 - sum p``."""
    _ref.check_tensor(hidden, "hidden")
    dims: dict = {}
    _ref.check_shape(hidden, "hidden", ("N", "D"), dims)
    _ref.check_shape(weight, "weight", ("V", "D"), dims)
    _ref.check_shape(topk_ids, "topk_ids", ("T", "N", "K"), dims)
    _ref.check_shape(topk_logprobs, "topk_logprobs", ("T", "N", "K"), dims)
    if tail_logprobs is None:
        raise ValueError("tail_logprobs [T, N] is required (the log of each teacher's mass outside its ids)")
    _ref.check_shape(tail_logprobs, "tail_logprobs", ("T", "N"), dims)
    _ref.check_labels(targets, dims["N"][0], hidden, "hidden")
    tau = _ref.check_temperature(temperature)
    t, n = topk_ids.shape[0], hidden.shape[0]
    if isinstance(weights, str) or weights is None:
        scheme = "uniform" if weights is None else _ref.check_scheme(weights, "weights")
        if scheme != "uniform":
            if target_logprobs is None:
                raise ValueError(f"weights={scheme!r} needs target_logprobs: each teacher's log-probability of "
                                 "the next token")
            _ref.check_shape(target_logprobs, "target_logprobs", ("T", "N"), dims)
        w = _weights(scheme, target_logprobs, t, n, hidden.device)
    else:
        _ref.check_shape(weights, "weights", ("T", "N"), dims)
        w = _weights(weights, None, t, n, hidden.device)
    return _TopKLinearKL.apply(hidden, weight, topk_ids.long(), topk_logprobs.detach(), tail_logprobs.detach(), w,
                               targets, tau, ignore_index, int(chunk_bytes or CHUNK_BYTES))
