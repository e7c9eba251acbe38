"""``fastmt.kernels.lm_topk_linear_kl_loss``: the top-k (cached-teacher) loss from the student's output
layer, gradients made in one pass a chunk of rows at a time, against ``fastmt.losses.lm_topk_kl_loss``
on the materialised logits: float64 values and every gradient element, odd sizes, per dtype."""

from __future__ import annotations

import pytest
import torch

import fastmt.kernels as fused
from fastmt import losses
from fastmt.cache.topk import topk_from_logits


def _case(n, d, v, t, k, tau, seed, dtype=torch.float64, ignored=(1,)):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5 * 3
    z = 3 * torch.randn(t, n, v, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=g)
    for i in ignored:
        if i < n:
            y[i] = -100
    ids, lp, tail, target = topk_from_logits(z, y, k, tau)  # stored as a cache stores them (float32)
    return h.to(dtype), w.to(dtype), y, ids, lp, tail, target


def _both(h, w, y, ids, lp, tail, target, weights, tau, chunk_bytes=None):
    a, wa = h.clone().requires_grad_(), w.clone().requires_grad_()
    got = fused.lm_topk_linear_kl_loss(a, wa, ids, lp, y, weights, tau, target_logprobs=target, tail_logprobs=tail,
                                       chunk_bytes=chunk_bytes)
    got_h, got_w = torch.autograd.grad(got, (a, wa))
    b, wb = h.double().clone().requires_grad_(), w.double().clone().requires_grad_()
    want = losses.lm_topk_kl_loss(b @ wb.t(), ids, lp, y, weights, tau, target_logprobs=target, tail_logprobs=tail)
    want_h, want_w = torch.autograd.grad(want, (b, wb))
    return (got, got_h, got_w), (want, want_h, want_w)


@pytest.mark.parametrize("shape", [(13, 7, 29, 2, 5), (1, 3, 5, 1, 1), (40, 16, 97, 3, 16), (9, 5, 20, 2, 20)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("weights", ["paper", "softmax", "uniform"])
@pytest.mark.parametrize("rows", [1, 4, None])
def test_float64_value_and_gradients_equal_the_reference(shape, weights, rows):
    n, d, v, t, k = shape
    case = _case(n, d, v, t, k, 2.0, seed=n + v)
    chunk = None if rows is None else 12 * v * rows  # one row a chunk, four, all
    (got, gh, gw), (want, wh, ww) = _both(*case, weights, 2.0, chunk)
    assert got.dtype == torch.float64
    assert abs(got.item() - want.item()) <= 1e-12 * max(1.0, abs(want.item())), (got, want)
    assert torch.allclose(gh, wh, rtol=1e-10, atol=1e-14) and torch.allclose(gw, ww, rtol=1e-10, atol=1e-14)


def test_a_weights_tensor_and_temperature_below_one():
    h, w, y, ids, lp, tail, target = _case(11, 6, 31, 3, 7, 0.5, seed=3)
    weights = torch.rand(3, 11, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (got, gh, gw), (want, wh, ww) = _both(h, w, y, ids, lp, tail, target, weights, 0.5, 12 * 31 * 3)
    assert abs(got.item() - want.item()) <= 1e-12 * max(1.0, abs(want.item()))
    assert torch.allclose(gh, wh, rtol=1e-10, atol=1e-14) and torch.allclose(gw, ww, rtol=1e-10, atol=1e-14)


def test_a_student_with_no_mass_outside_the_ids_takes_the_log_sum_exp():
    """Q_i below 1e-30: the student's tail is its masked log-sum-exp (the reference's), not log(0)."""
    h, w, y, ids, lp, tail, target = _case(6, 4, 12, 1, 3, 1.0, seed=5, ignored=())
    # Teacher tails with real mass, and a student whose output matrix puts ~80 nats on the teacher's ids.
    w = w.clone()
    h = torch.ones_like(h)
    w[:] = -40.0 / h.shape[1]
    for token in ids[0, 0].tolist():
        w[token] = 40.0 / h.shape[1]
    ids = ids[:, :1].expand(1, 6, 3).contiguous()
    lp, tail = lp[:, :1].expand(1, 6, 3).contiguous(), tail[:, :1].expand(1, 6).contiguous()
    r = torch.exp(tail.double())
    q = torch.softmax(h @ w.t(), -1)
    outside = q.sum(-1) - q.gather(-1, ids[0]).sum(-1)
    assert r.min() > 1e-3 and outside.max() < 1e-30  # the branch under test
    (got, gh, gw), (want, wh, ww) = _both(h, w, y, ids, lp, tail, target, "uniform", 1.0)
    # the tail term alone is r (log r - log Q) with log Q ~ -78: a floor well above the top-k part's size
    assert torch.isfinite(got) and got.item() > (r * (torch.log(r) + 70)).mean().item()
    assert abs(got.item() - want.item()) <= 1e-12 * abs(want.item())
    assert torch.allclose(gh, wh, rtol=1e-9, atol=1e-12) and torch.allclose(gw, ww, rtol=1e-9, atol=1e-12)


def test_no_counted_row_is_zero_with_zero_gradients():
    h, w, y, ids, lp, tail, target = _case(5, 4, 9, 2, 3, 1.0, seed=6)
    y[:] = -100
    (got, gh, gw), _ = _both(h, w, y, ids, lp, tail, target, "paper", 1.0)
    assert got.item() == 0.0 and not gh.any() and not gw.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precisions_within_their_rounding(dtype):
    """float32 and bfloat16 inputs: the logits are one GEMM in the inputs' dtype (then float32), so the
    bound is the dtype's epsilon times the size of what it rounds (logits of ~10), not one machine's result."""
    torch.manual_seed(0)
    h, w, y, ids, lp, tail, target = _case(24, 16, 67, 2, 8, 2.0, seed=7, dtype=dtype)
    (got, gh, gw), (want, wh, ww) = _both(h, w, y, ids, lp, tail, target, "paper", 2.0)
    eps = torch.finfo(dtype).eps
    # a relative error eps in each of D products of a logit ~10 moves the loss by ~eps * 10 * sqrt(D)
    bound = 4 * eps * 10 * 16**0.5
    assert abs(got.float().item() - want.item()) <= bound * max(1.0, abs(want.item())), (got, want, bound)
    for g, r in ((gh, wh), (gw, ww)):
        assert g.dtype == dtype
        assert (g.double() - r).abs().max() <= bound * r.abs().max(), ((g.double() - r).abs().max(), r.abs().max())


def test_bad_arguments_are_value_errors():
    h, w, y, ids, lp, tail, target = _case(4, 3, 7, 1, 2, 1.0, seed=8)
    with pytest.raises(ValueError, match="tail_logprobs"):
        fused.lm_topk_linear_kl_loss(h, w, ids, lp, y, "uniform", 1.0)
    with pytest.raises(ValueError, match="target_logprobs"):
        fused.lm_topk_linear_kl_loss(h, w, ids, lp, y, "paper", 1.0, tail_logprobs=tail)
    with pytest.raises(ValueError, match="topk_ids"):
        fused.lm_topk_linear_kl_loss(h, w, ids[:, :2], lp, y, "uniform", 1.0, tail_logprobs=tail)


def test_float32_keeps_its_digits_where_the_student_has_little_mass_outside_the_ids():
    """Q_i ~ 1e-5: the tail's gradient r q_v / Q_i is formed outside the ids only, so nothing of size
    r / Q_i cancels and float32 stays within a few of its epsilons of the float64 reference."""
    h, w, y, ids, lp, tail, target = _case(6, 4, 12, 2, 3, 1.0, seed=9, ignored=())
    h = torch.ones_like(h)
    w = torch.full_like(w, -6.0 / h.shape[1])
    for token in ids[0, 0].tolist():
        w[token] = 6.0 / h.shape[1]
    ids = ids[:, :1].expand(2, 6, 3).contiguous()
    lp, tail = lp[:, :1].expand(2, 6, 3).contiguous(), tail[:, :1].expand(2, 6).contiguous()
    q = torch.softmax(h @ w.t(), -1)
    outside = q.sum(-1) - q.gather(-1, ids[0]).sum(-1)
    assert 1e-6 < outside.max() < 1e-4
    (got, gh, gw), (want, wh, ww) = _both(h.float(), w.float(), y, ids, lp, tail, target, "paper", 1.0)
    eps = torch.finfo(torch.float32).eps
    assert abs(got.item() - want.item()) <= 16 * eps * abs(want.item())
    for g, r in ((gh, wh), (gw, ww)):
        assert (g.double() - r).abs().max() <= 64 * eps * r.abs().max(), ((g.double() - r).abs().max(), r.abs().max())


@pytest.mark.skipif(not torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_within_the_dtypes_rounding(dtype):
    """On the GPU (float32-writing GEMMs from half inputs): the same bounds as on the CPU."""
    torch.backends.cuda.matmul.allow_tf32 = False
    h, w, y, ids, lp, tail, target = _case(300, 64, 1031, 3, 17, 2.0, seed=10, dtype=dtype)
    dev = torch.device("cuda")
    h, w, y, ids, lp, tail, target = (x.to(dev) for x in (h, w, y, ids, lp, tail, target))
    (got, gh, gw), (want, wh, ww) = _both(h, w, y, ids, lp, tail, target, "softmax", 2.0, 12 * 1031 * 64)
    eps = 1e-12 if dtype == torch.float64 else 4 * torch.finfo(dtype).eps * 10 * 64**0.5
    assert abs(got.double().item() - want.item()) <= eps * max(1.0, abs(want.item())), (got, want)
    for g, r in ((gh, wh), (gw, ww)):
        assert g.dtype == dtype and (g.double() - r).abs().max() <= eps * r.abs().max()
