"""``fastmt.losses.lm_topk_kl_loss``: the KL against teachers kept as their top-k log-probabilities."""

from __future__ import annotations

import pytest
import torch

from fastmt.losses import lm_kl_loss, lm_topk_kl_loss


def _teachers(t, n, v, k, tau, seed):
    g = torch.Generator().manual_seed(seed)
    s = 2 * torch.randn(n, v, generator=g, dtype=torch.float64)
    z = 3 * torch.randn(t, n, v, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=g)
    y[1] = -100
    lp = torch.log_softmax(z / tau, -1)
    top, ids = lp.topk(k, dim=-1)
    target_lp = torch.log_softmax(z, -1).gather(-1, torch.where(y >= 0, y, 0).view(1, n, 1).expand(t, n, 1))[..., 0]
    return s, z, y, ids, top, target_lp


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("weights", ["paper", "softmax", "uniform"])
def test_every_token_stored_is_the_full_loss(weights, direction):
    """K = V: no tail, and the loss and its gradient are lm_kl_loss's on the teachers' logits."""
    s, z, y, ids, top, target_lp = _teachers(3, 6, 11, 11, 2.0, seed=1)
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    got = lm_topk_kl_loss(a, ids, top, y, weights, 2.0, direction=direction, target_logprobs=target_lp)
    want = lm_kl_loss(b, z, y, weights, 2.0, direction=direction)
    (ga,), (gb,) = torch.autograd.grad(got, a), torch.autograd.grad(want, b)
    assert abs(got.item() - want.item()) <= 1e-12 * max(1.0, abs(want.item()))
    assert torch.allclose(ga, gb, rtol=0, atol=1e-12)


def _by_hand(s, ids, top, y, tau, direction):
    """The partition KL, one teacher and token at a time, uniform weights, float64."""
    total, count = 0.0, 0
    for n in range(s.shape[0]):
        if int(y[n]) < 0:
            continue
        count += 1
        q = torch.softmax(s[n] / tau, -1)
        for i in range(ids.shape[0]):
            keep = ids[i, n]
            p = top[i, n].exp()
            qk = q[keep]
            rest = torch.ones_like(q, dtype=torch.bool)
            rest[keep] = False
            pq = torch.cat([p, (1 - p.sum()).reshape(1)]), torch.cat([qk, q[rest].sum().reshape(1)])
            a, b = pq if direction == "forward" else pq[::-1]
            total = total + (a * (a.log() - b.log())).sum()
    return tau * tau * total / count


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_value_and_gradient_are_the_partition_formula(direction):
    s, z, y, ids, top, _ = _teachers(2, 5, 9, 3, 1.5, seed=2)
    a = s.clone().requires_grad_()
    got = lm_topk_kl_loss(a, ids, top, y, "uniform", 1.5, direction=direction)
    (ga,) = torch.autograd.grad(got, a)
    b = s.clone().requires_grad_()
    want = _by_hand(b, ids, top, y, 1.5, direction)
    (gb,) = torch.autograd.grad(want, b)
    assert abs(got.item() - want.item()) <= 1e-12 * max(1.0, abs(want.item()))
    assert torch.allclose(ga, gb, rtol=0, atol=1e-12)
    assert not ga[1].any()  # the ignored row


@pytest.mark.parametrize("k", [1, 4, 16])
def test_never_more_than_the_full_kl(k):
    """Merging the vocabulary outside the top k into one cell cannot increase the forward KL."""
    s, z, y, ids, top, _ = _teachers(2, 8, 40, k, 1.0, seed=3)
    cached = lm_topk_kl_loss(s, ids, top, y, "uniform", 1.0)
    full = lm_kl_loss(s, z, y, "uniform", 1.0)
    assert 0 <= cached.item() <= full.item() + 1e-12


def test_confidence_weights_need_the_next_tokens_log_probability():
    s, z, y, ids, top, _ = _teachers(2, 4, 9, 3, 1.0, seed=4)
    with pytest.raises(ValueError, match="needs target_logprobs"):
        lm_topk_kl_loss(s, ids, top, y, "paper")
