"""Tests for the reference losses in fastmt.losses.

Expected values come from three independent sources: closed forms worked out by hand, a float64 NumPy
implementation written with explicit loops (with analytic gradients), and torch.autograd.gradcheck.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmt.losses import SCHEMES, layer_map, mt_hidden_loss, mt_kl_loss, teacher_weights

LN2, LN3 = math.log(2.0), math.log(3.0)
INF = float("inf")

# Per-dtype tolerances against a float64 result computed from the unrounded inputs.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=5e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=4e-2, atol=1e-2),
}


def grads(loss, *inputs):
    return torch.autograd.grad(loss, inputs, allow_unused=True)


# --------------------------------------------------------------------------------------------------
# Independent float64 implementations, loop by loop, with gradients derived by hand:
#   dL_kd/ds[n]     = tau / N_valid * sum_i w[i,n] * (q[n] - p[i,n])
#   dL_hid/dproj    = 2 * mask * w * residual / (sum(mask) * Dt), chained into hs, W and b.


def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def np_teacher_weights(t, y, scheme, ignore_index=-100):
    num_teachers, n_rows, _ = t.shape
    w = np.zeros((num_teachers, n_rows))
    for n in range(n_rows):
        if y[n] == ignore_index:
            continue
        ce = [-math.log(np_softmax(t[i, n])[y[n]]) for i in range(num_teachers)]
        for i in range(num_teachers):
            if scheme == "paper":
                w[i, n] = 1.0 / (1.0 + ce[i])
            elif scheme == "softmax":
                w[i, n] = math.exp(-ce[i]) / sum(math.exp(-c) for c in ce)
            else:
                w[i, n] = 1.0
    return w


def np_kl(s, t, w, tau, y=None, ignore_index=-100):
    num_teachers, n_rows, num_classes = t.shape
    loss, grad, n_valid = 0.0, np.zeros_like(s), 0
    for n in range(n_rows):
        if y is not None and y[n] == ignore_index:
            continue
        n_valid += 1
        q = np_softmax(s[n] / tau)
        for i in range(num_teachers):
            p = np_softmax(t[i, n] / tau)
            kl = sum(p[c] * (math.log(p[c]) - math.log(q[c])) for c in range(num_classes) if p[c] > 0)
            loss += w[i, n] * tau * tau * kl
            grad[n] += w[i, n] * tau * (q - p)
    n_valid = max(n_valid, 1)
    return loss / n_valid, grad / n_valid


def np_hidden(hs, ht, W, b, mask, w):
    num_teachers, num_layers, n_rows, seq, dt = ht.shape
    denom = mask.sum() * dt
    loss = 0.0
    d_hs, d_w, d_b = np.zeros_like(hs), np.zeros_like(W), np.zeros_like(b)
    for i in range(num_teachers):
        for k in range(num_layers):
            for n in range(n_rows):
                for p in range(seq):
                    c = mask[n, p] * w[i, n]
                    if c == 0:
                        continue
                    r = hs[k, n, p] @ W[i, k] + b[i, k] - ht[i, k, n, p]
                    loss += c * float(r @ r)
                    g = 2.0 * c * r / denom
                    d_hs[k, n, p] += W[i, k] @ g
                    d_w[i, k] += np.outer(hs[k, n, p], g)
                    d_b[i, k] += g
    return loss / denom, d_hs, d_w, d_b


def kl_inputs(n=7, c=3, t=3, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(n, c, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
    tl = (2 * torch.randn(t, n, c, generator=gen, dtype=torch.float64)).to(dtype)
    y = torch.randint(0, c, (n,), generator=gen)
    return s, tl, y


def hidden_inputs(t=3, k=2, n=4, s=5, ds=12, dt=20, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)

    hs = r(k, n, s, ds).requires_grad_()
    ht = r(t, k, n, s, dt)
    w = r(t, k, ds, dt, scale=ds**-0.5).requires_grad_()
    b = r(t, k, dt, scale=0.1).requires_grad_()
    return hs, ht, w, b


# --------------------------------------------------------------------------------------------------
# Hand-computed cases. With tau = 2, logits [2 ln 3, 0] give probabilities [3/4, 1/4]; untempered they
# give [9/10, 1/10].

TAU = 2.0
HAND_S = [[2 * LN3, 0.0], [0.0, 0.0]]  # q[0] = [3/4, 1/4], q[1] = [1/2, 1/2]
HAND_T = [
    [[0.0, 0.0], [2 * LN3, 0.0]],  # teacher 0: p = [1/2, 1/2], [3/4, 1/4]
    [[2 * LN3, 0.0], [0.0, 2 * LN3]],  # teacher 1: p = [3/4, 1/4], [1/4, 3/4]
]
HAND_Y = [0, 1]
# KL(p || q) per (teacher, row), and the untempered CE of the true label per (teacher, row).
HAND_KL = [[0.5 * math.log(4 / 3), 0.75 * math.log(1.5) - 0.25 * LN2], [0.0, 0.75 * math.log(1.5) - 0.25 * LN2]]
HAND_CE = [[LN2, math.log(10.0)], [math.log(10 / 9), math.log(10 / 9)]]
HAND_W = {
    "uniform": [[1.0, 1.0], [1.0, 1.0]],
    "paper": [[1 / (1 + HAND_CE[i][n]) for n in range(2)] for i in range(2)],
    # softmax of -CE over teachers is the true-label probability, normalised over teachers
    "softmax": [[5 / 14, 1 / 10], [9 / 14, 9 / 10]],
}


def hand_tensors():
    s = torch.tensor(HAND_S, dtype=torch.float64, requires_grad=True)
    return s, torch.tensor(HAND_T, dtype=torch.float64), torch.tensor(HAND_Y)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_teacher_weights_hand(scheme):
    _, t, y = hand_tensors()
    w = teacher_weights(t, y, scheme)
    assert w.shape == (2, 2) and w.dtype == torch.float64 and not w.requires_grad
    torch.testing.assert_close(w, torch.tensor(HAND_W[scheme], dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_kl_hand(scheme):
    s, t, y = hand_tensors()
    w = HAND_W[scheme]
    expected = sum(w[i][n] * TAU**2 * HAND_KL[i][n] for i in range(2) for n in range(2)) / 2
    loss = mt_kl_loss(s, t, scheme, temperature=TAU, labels=y)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # tau / N * sum_i w (q - p): q - p is +-1/4 or 0 everywhere in this example
    (g,) = grads(loss, s)
    g0 = TAU / 2 * (w[0][0] * 0.25)
    g1 = TAU / 2 * (w[0][1] * -0.25 + w[1][1] * 0.25)
    torch.testing.assert_close(g, torch.tensor([[g0, -g0], [g1, -g1]], dtype=torch.float64))


def test_kl_hand_none_weights_and_tau_squared():
    s, t, _ = hand_tensors()
    kl_sum = sum(map(sum, HAND_KL))
    assert mt_kl_loss(s, t, temperature=TAU).item() == pytest.approx(4.0 * kl_sum / 2, rel=1e-12)
    # Logits divided by tau give the same distributions at tau = 1, so only the tau^2 factor differs.
    s1, t1 = s.detach() / TAU, t / TAU
    assert mt_kl_loss(s1, t1, temperature=1.0).item() == pytest.approx(kl_sum / 2, rel=1e-12)


def test_kl_hand_tensor_weights():
    s, t, _ = hand_tensors()
    w = torch.tensor([[2.0, 0.0], [5.0, 3.0]], dtype=torch.float64)
    expected = TAU**2 * (2.0 * HAND_KL[0][0] + 3.0 * HAND_KL[1][1]) / 2
    assert mt_kl_loss(s, t, w, temperature=TAU).item() == pytest.approx(expected, rel=1e-12)


def test_hidden_hand_scalar():
    # K = T = N = 1, S = 2, Ds = Dt = 1: projections 1*3+1 = 4 and 2*3+1 = 7 against targets 2 and 10.
    hs = torch.tensor([1.0, 2.0], dtype=torch.float64).view(1, 1, 2, 1).requires_grad_()
    ht = torch.tensor([2.0, 10.0], dtype=torch.float64).view(1, 1, 1, 2, 1)
    W = torch.full((1, 1, 1, 1), 3.0, dtype=torch.float64, requires_grad=True)
    b = torch.full((1, 1, 1), 1.0, dtype=torch.float64, requires_grad=True)
    assert mt_hidden_loss(hs, ht, W, b).item() == pytest.approx((4 + 9) / 2)
    assert mt_hidden_loss(hs, ht, W, b, mask=torch.tensor([[1, 0]])).item() == pytest.approx(4.0)
    w = torch.tensor([[0.5]], dtype=torch.float64)
    loss = mt_hidden_loss(hs, ht, W, b, weights=w)
    assert loss.item() == pytest.approx(0.5 * 13 / 2)
    # residuals r = [2, -3]; dL/db = sum 2 w r / 2 = -0.5, dL/dW = sum 2 w r hs / 2 = -2, dL/dhs = w r W
    g_hs, g_w, g_b = grads(loss, hs, W, b)
    assert g_b.item() == pytest.approx(-0.5)
    assert g_w.item() == pytest.approx(0.5 * (2 * 1 - 3 * 2))
    torch.testing.assert_close(g_hs.flatten(), torch.tensor([3.0, -4.5], dtype=torch.float64))


def test_hidden_hand_two_teachers_vectors():
    # T = 2, K = N = S = 1, Ds = Dt = 2.
    hs = torch.tensor([1.0, 1.0], dtype=torch.float64).view(1, 1, 1, 2).requires_grad_()
    W = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]]], [[[1.0, 0.0], [0.0, 1.0]]]], dtype=torch.float64)
    W.requires_grad_()
    b = torch.tensor([[[0.0, 1.0]], [[0.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    ht = torch.tensor([[0.0, 0.0], [0.0, 2.0]], dtype=torch.float64).view(2, 1, 1, 1, 2)
    # teacher 0: [1,3]+[0,1]-[0,0] = [1,4] -> 17; teacher 1: [1,1]-[0,2] = [1,-1] -> 2; over Dt = 2
    assert mt_hidden_loss(hs, ht, W, b).item() == pytest.approx((17 + 2) / 2)
    loss = mt_hidden_loss(hs, ht, W, b, weights=torch.tensor([[2.0], [3.0]], dtype=torch.float64))
    assert loss.item() == pytest.approx((2 * 17 + 3 * 2) / 2)
    (g_b,) = grads(loss, b)
    torch.testing.assert_close(g_b, torch.tensor([[[2.0, 8.0]], [[3.0, -3.0]]], dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# Against the loop implementation on random inputs with odd shapes.


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("ignore_index", [-100, 1])
def test_teacher_weights_random(scheme, ignore_index):
    _, t, y = kl_inputs(n=7, c=3, t=3, seed=1)
    y[[1, 4]] = ignore_index
    got = teacher_weights(t, y, scheme, ignore_index=ignore_index)
    expected = np_teacher_weights(t.numpy(), y.tolist(), scheme, ignore_index)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-14)
    assert (got[:, [1, 4]] == 0).all()


# Scheme weights need labels, so they are only paired with with_labels=True.
@pytest.mark.parametrize(
    "weights,with_labels",
    [(None, False), (None, True), ("tensor", False), ("tensor", True)] + [(sch, True) for sch in SCHEMES],
)
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_kl_matches_loops(weights, with_labels, tau):
    s, t, y = kl_inputs(n=7, c=3, t=3, seed=2)
    y[[0, 5]] = -100
    if weights == "tensor":
        w_arg = torch.rand(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        w_np = w_arg.numpy()
    elif weights is None:
        w_arg, w_np = None, np.ones((3, 7))
    else:
        w_arg, w_np = weights, np_teacher_weights(t.numpy(), y.tolist(), weights)
    labels = y if with_labels else None
    loss = mt_kl_loss(s, t, w_arg, temperature=tau, labels=labels)
    y_list = y.tolist() if with_labels else None
    expected, expected_grad = np_kl(s.detach().numpy(), t.numpy(), w_np, tau, y_list)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    (g,) = grads(loss, s)
    np.testing.assert_allclose(g.numpy(), expected_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("with_weights", [False, True])
def test_hidden_matches_loops(with_mask, with_weights):
    hs, ht, W, b = hidden_inputs(t=3, k=2, n=4, s=5, ds=12, dt=20, seed=4)
    gen = torch.Generator().manual_seed(5)
    mask = (torch.rand(4, 5, generator=gen) > 0.3).long() if with_mask else None
    w = torch.rand(3, 4, generator=gen, dtype=torch.float64) if with_weights else None
    loss = mt_hidden_loss(hs, ht, W, b, mask=mask, weights=w)
    mask_np = mask.numpy().astype(np.float64) if with_mask else np.ones((4, 5))
    w_np = w.numpy() if with_weights else np.ones((3, 4))
    expected, *expected_grads = np_hidden(
        hs.detach().numpy(), ht.numpy(), W.detach().numpy(), b.detach().numpy(), mask_np, w_np
    )
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    for got, want in zip(grads(loss, hs, W, b), expected_grads):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)


def test_hidden_cls_mode_single_position():
    # hidden_loss="cls" passes S = 1; the formula must hold there too.
    hs, ht, W, b = hidden_inputs(t=2, k=3, n=5, s=1, ds=7, dt=9, seed=6)
    loss = mt_hidden_loss(hs, ht, W, b, mask=torch.ones(5, 1, dtype=torch.bool))
    expected, *_ = np_hidden(hs.detach().numpy(), ht.numpy(), W.detach().numpy(), b.detach().numpy(),
                             np.ones((5, 1)), np.ones((2, 5)))
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_kl_gradient_equals_soft_cross_entropy_gradient():
    # The KL and the paper's soft cross-entropy differ by the teacher entropy, a constant in s.
    s, t, y = kl_inputs(n=6, c=5, t=2, seed=7)
    tau = 3.0
    w = teacher_weights(t, y, "paper")
    soft_ce = -(w[..., None] * torch.softmax(t / tau, -1) * torch.log_softmax(s / tau, -1)).sum() * tau**2 / 6
    (g_kl,) = grads(mt_kl_loss(s, t, "paper", tau, y), s)
    (g_ce,) = grads(soft_ce, s)
    torch.testing.assert_close(g_kl, g_ce)


# --------------------------------------------------------------------------------------------------
# gradcheck


def test_gradcheck_kl():
    s, t, y = kl_inputs(n=4, c=3, t=2, seed=8)
    y[2] = -100
    w = torch.rand(2, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: mt_kl_loss(x, t, w, 1.7, y), (s,))
    assert torch.autograd.gradcheck(lambda x: mt_kl_loss(x, t, "softmax", 0.6, y), (s,))
    assert torch.autograd.gradgradcheck(lambda x: mt_kl_loss(x, t, "paper", 1.3, y), (s,))


def test_gradcheck_hidden():
    hs, ht, W, b = hidden_inputs(t=2, k=2, n=3, s=2, ds=3, dt=4, seed=9)
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]])
    w = torch.rand(2, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, c, d: mt_hidden_loss(a, ht, c, d, mask, w), (hs, W, b))


# --------------------------------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kl_dtypes(dtype):
    s64, t64, y = kl_inputs(n=7, c=3, t=3, seed=10)
    y[3] = -100
    s = s64.detach().to(dtype).requires_grad_()
    loss = mt_kl_loss(s, t64.to(dtype), "paper", 2.0, y)
    ref = mt_kl_loss(s64, t64, "paper", 2.0, y)
    assert loss.dtype == torch.float32
    (g,) = grads(loss, s)
    (g_ref,) = grads(ref, s64)
    assert g.dtype == dtype
    torch.testing.assert_close(loss.double(), ref.detach(), **TOL[dtype])
    torch.testing.assert_close(g.double(), g_ref, **TOL[dtype])
    # On the rounded inputs the float32 computation itself is accurate.
    exact = mt_kl_loss(s.detach().double(), t64.to(dtype).double(), "paper", 2.0, y)
    torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_hidden_dtypes(dtype):
    hs64, ht64, W64, b64 = hidden_inputs(t=3, k=2, n=3, s=5, ds=12, dt=20, seed=11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    hs, W, b = (x.detach().to(dtype).requires_grad_() for x in (hs64, W64, b64))
    loss = mt_hidden_loss(hs, ht64.to(dtype), W, b, mask)
    ref = mt_hidden_loss(hs64, ht64, W64, b64, mask)
    assert loss.dtype == torch.float32
    for got, want, x in zip(grads(loss, hs, W, b), grads(ref, hs64, W64, b64), (hs, W, b)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **TOL[dtype])
    torch.testing.assert_close(loss.double(), ref.detach(), **TOL[dtype])


def test_float64_anywhere_computes_in_float64():
    s, t, _ = kl_inputs(n=3, c=4, t=2, seed=12)
    assert mt_kl_loss(s.detach().float(), t).dtype == torch.float64
    assert mt_kl_loss(s, t.float()).dtype == torch.float64
    assert teacher_weights(t.float(), torch.tensor([0, 1, 2]), "paper").dtype == torch.float32
    hs, ht, W, b = hidden_inputs(t=1, k=1, n=2, s=2, ds=3, dt=3, seed=13, dtype=torch.float32)
    assert mt_hidden_loss(hs, ht, W, b).dtype == torch.float32
    assert mt_hidden_loss(hs, ht.double(), W, b).dtype == torch.float64


# --------------------------------------------------------------------------------------------------
# Gradient routing


def test_kl_no_gradient_to_teacher_or_weights():
    s, t, y = kl_inputs(n=5, c=4, t=2, seed=14)
    t.requires_grad_()
    w = torch.rand(2, 5, dtype=torch.float64, requires_grad=True)
    g_s, g_t, g_w = grads(mt_kl_loss(s, t, w, 2.0, y), s, t, w)
    assert g_s is not None and g_t is None and g_w is None
    mt_kl_loss(s, t, "softmax", 2.0, y).backward()
    assert t.grad is None and s.grad is not None


def test_hidden_no_gradient_to_teacher_mask_or_weights():
    hs, ht, W, b = hidden_inputs(t=2, k=2, n=3, s=4, ds=5, dt=6, seed=15)
    ht.requires_grad_()
    mask = torch.ones(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    out = grads(mt_hidden_loss(hs, ht, W, b, mask, w), hs, W, b, ht, mask, w)
    assert all(g is not None for g in out[:3]) and all(g is None for g in out[3:])


def test_upstream_gradient_scales():
    s, t, y = kl_inputs(n=5, c=3, t=2, seed=16)
    (g1,) = grads(mt_kl_loss(s, t, "paper", 2.0, y), s)
    (3.0 * mt_kl_loss(s, t, "paper", 2.0, y)).backward()
    torch.testing.assert_close(s.grad, 3.0 * g1)
    hs, ht, W, b = hidden_inputs(t=2, k=1, n=3, s=2, ds=4, dt=5, seed=17)
    one = grads(mt_hidden_loss(hs, ht, W, b), hs, W, b)
    (-0.5 * mt_hidden_loss(hs, ht, W, b)).backward()
    for x, g in zip((hs, W, b), one):
        torch.testing.assert_close(x.grad, -0.5 * g)


# --------------------------------------------------------------------------------------------------
# ignore_index, masks and -inf classes


def test_ignored_rows_are_dropped_from_the_mean():
    s, t, y = kl_inputs(n=7, c=3, t=3, seed=18)
    keep = torch.tensor([0, 2, 3, 6])
    y_ign = torch.full_like(y, -100)
    y_ign[keep] = y[keep]
    w = torch.rand(3, 7, dtype=torch.float64)
    w[:, 1] = float("nan")  # an ignored row's weight must not leak into the loss or gradient
    for weights, sub_w in ((w, w[:, keep]), ("paper", "paper"), (None, None)):
        loss = mt_kl_loss(s, t, weights, 1.5, y_ign)
        sub = mt_kl_loss(s[keep], t[:, keep], sub_w, 1.5, y[keep])
        torch.testing.assert_close(loss, sub)
        (g,) = grads(loss, s)
        (g_sub,) = grads(sub, s)
        torch.testing.assert_close(g[keep], g_sub[keep])
        assert (g[[1, 4, 5]] == 0).all()


def test_ignored_row_with_infinite_kl_does_not_leak():
    # A -inf student logit where the teacher has mass makes that row's KL infinite; ignored, it must
    # leave the loss and the other rows' gradients untouched.
    s, t, y = kl_inputs(n=4, c=3, t=2, seed=25)
    s_bad = s.detach().clone()
    s_bad[1, 0] = -INF
    s_bad.requires_grad_()
    y[1] = -100
    loss = mt_kl_loss(s_bad, t, None, 2.0, y)
    ref = mt_kl_loss(s, t, None, 2.0, y)
    torch.testing.assert_close(loss, ref)
    (g,) = grads(loss, s_bad)
    (g_ref,) = grads(ref, s)
    torch.testing.assert_close(g, g_ref)


def test_custom_ignore_index():
    s, t, y = kl_inputs(n=4, c=3, t=2, seed=19)
    y = torch.tensor([0, 7, 2, 7])
    loss = mt_kl_loss(s, t, "softmax", 1.0, y, ignore_index=7)
    sub = mt_kl_loss(s[[0, 2]], t[:, [0, 2]], "softmax", 1.0, y[[0, 2]], ignore_index=7)
    torch.testing.assert_close(loss, sub)


@pytest.mark.parametrize("weights", [None, "paper", "tensor"])
def test_all_rows_ignored(weights):
    s, t, _ = kl_inputs(n=3, c=4, t=2, seed=20)
    w = torch.ones(2, 3, dtype=torch.float64) if weights == "tensor" else weights
    loss = mt_kl_loss(s, t, w, 2.0, torch.full((3,), -100))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    (g,) = grads(loss, s)
    assert torch.equal(g, torch.zeros_like(s))


def test_empty_batch_is_zero():
    s = torch.zeros(0, 3, requires_grad=True)
    assert mt_kl_loss(s, torch.zeros(2, 0, 3)).item() == 0.0


def test_teacher_minus_inf_class_is_finite():
    s, t, y = kl_inputs(n=5, c=4, t=3, seed=21)
    y = y.clamp(max=2)  # keep the masked class away from the labels
    t = t.clone()
    t[:, :, 3] = -INF
    t[1, 2, 0] = -INF
    loss = mt_kl_loss(s, t, "paper", 2.0, y)
    (g,) = grads(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    w = np_teacher_weights(t.numpy(), y.tolist(), "paper")
    expected, expected_grad = np_kl(s.detach().numpy(), t.numpy(), w, 2.0, y.tolist())
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    np.testing.assert_allclose(g.numpy(), expected_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_minus_inf_in_both_equals_dropping_the_class(dtype):
    s, t, y = kl_inputs(n=5, c=4, t=2, seed=22)
    y = y.clamp(max=2)
    s_m = s.detach().clone()
    t_m = t.clone()
    s_m[:, 3] = -INF
    t_m[:, :, 3] = -INF
    s_m = s_m.to(dtype).requires_grad_()
    loss = mt_kl_loss(s_m, t_m.to(dtype), "softmax", 1.5, y)
    (g,) = grads(loss, s_m)
    assert torch.isfinite(loss) and not torch.isnan(g).any()
    assert (g[:, 3] == 0).all()
    s_r = s.detach()[:, :3].to(dtype).requires_grad_()
    ref = mt_kl_loss(s_r, t[:, :, :3].to(dtype), "softmax", 1.5, y)
    (g_r,) = grads(ref, s_r)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g[:, :3], g_r)


def test_hidden_all_masked_is_zero_and_attached():
    hs, ht, W, b = hidden_inputs(t=2, k=2, n=3, s=4, ds=5, dt=6, seed=23)
    loss = mt_hidden_loss(hs, ht, W, b, mask=torch.zeros(3, 4, dtype=torch.int32))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    for g in grads(loss, hs, W, b):
        assert torch.equal(g, torch.zeros_like(g))


def test_hidden_mask_ignores_padding_values():
    # Masked positions may hold anything, non-finite values included.
    hs, ht, W, b = hidden_inputs(t=2, k=1, n=2, s=3, ds=4, dt=4, seed=24)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    base = mt_hidden_loss(hs, ht, W, b, mask)
    ht_pad = ht.clone()
    ht_pad[:, :, 0, 2] = float("nan")
    ht_pad[:, :, 1, 1:] = INF
    torch.testing.assert_close(mt_hidden_loss(hs, ht_pad, W, b, mask), base)
    # bool, integer and float masks mean the same thing
    for m in (mask.bool(), mask.float(), mask.to(torch.uint8)):
        torch.testing.assert_close(mt_hidden_loss(hs, ht, W, b, m), base)


# --------------------------------------------------------------------------------------------------
# Argument validation


def _kl_args(**over):
    args = dict(
        student_logits=torch.randn(4, 3),
        teacher_logits=torch.randn(2, 4, 3),
        weights=None,
        temperature=1.0,
        labels=torch.tensor([0, 1, 2, -100]),
    )
    args.update(over)
    return args


def _hid_args(**over):
    args = dict(
        student_hidden=torch.randn(2, 3, 5, 4),
        teacher_hidden=torch.randn(2, 2, 3, 5, 6),
        proj_weight=torch.randn(2, 2, 4, 6),
        proj_bias=torch.randn(2, 2, 6),
        mask=torch.ones(3, 5),
        weights=torch.ones(2, 3),
    )
    args.update(over)
    return args


META = dict(device="meta")

KL_BAD = {
    "student_logits": [torch.randn(4, 3, 1), torch.randint(0, 3, (4, 3)), [[0.0, 1.0]]],
    "teacher_logits": [
        torch.randn(2, 5, 3),
        torch.randn(2, 4, 2),
        torch.randn(4, 3),
        torch.randn(0, 4, 3),
        torch.randn(2, 4, 3).long(),
        torch.randn(2, 4, 3, **META),
    ],
    "weights": [torch.ones(3, 4), torch.ones(2, 4).long(), torch.ones(2, 4, **META), "entropy", [1.0, 2.0], 1.0],
    "temperature": [0.0, -1.0, float("nan"), float("inf"), "warm", None],
    "labels": [torch.tensor([0, 1, 2]), torch.tensor([0.0, 1.0, 2.0, 0.0]), torch.ones(4, dtype=torch.bool),
               torch.tensor([0, 1, 2, 0], **META)],
}


@pytest.mark.parametrize(
    "arg,value", [(k, v) for k, vs in KL_BAD.items() for v in vs], ids=lambda x: x if isinstance(x, str) else None
)
def test_kl_rejects(arg, value):
    with pytest.raises(ValueError, match=arg):
        mt_kl_loss(**_kl_args(**{arg: value}))


def test_kl_scheme_needs_labels():
    with pytest.raises(ValueError, match="labels"):
        mt_kl_loss(**_kl_args(weights="paper", labels=None))


def test_kl_shape_message():
    with pytest.raises(ValueError) as info:
        mt_kl_loss(torch.randn(4, 3), torch.randn(2, 5, 3))
    assert str(info.value) == (
        "teacher_logits must have shape [T,N,C] with N=4, C=3 matching student_logits; got [2,5,3]"
    )


TW_BAD = {
    "teacher_logits": [torch.randn(4, 3), torch.randint(0, 3, (2, 4, 3))],
    "labels": [torch.tensor([0, 1, 2]), torch.tensor([0.0, 1.0, 2.0, 0.0]), torch.tensor([0, 1, 3, 0]),
               torch.tensor([0, -1, 2, 0]), torch.tensor([0, 1, 2, 0], **META), [0, 1, 2, 0]],
    "scheme": ["Paper", None, "entropy"],
}


@pytest.mark.parametrize(
    "arg,value", [(k, v) for k, vs in TW_BAD.items() for v in vs], ids=lambda x: x if isinstance(x, str) else None
)
def test_teacher_weights_rejects(arg, value):
    args = dict(teacher_logits=torch.randn(2, 4, 3), labels=torch.tensor([0, 1, 2, -100]), scheme="paper")
    args[arg] = value
    with pytest.raises(ValueError, match=arg):
        teacher_weights(**args)


def test_out_of_range_labels_rejected_through_kl_scheme():
    with pytest.raises(ValueError, match="labels"):
        mt_kl_loss(**_kl_args(weights="softmax", labels=torch.tensor([0, 1, 3, -100])))


HID_BAD = {
    "student_hidden": [torch.randn(3, 5, 4), torch.randn(2, 3, 5, 4).long()],
    "teacher_hidden": [
        torch.randn(2, 3, 3, 5, 6),  # K
        torch.randn(2, 2, 4, 5, 6),  # N
        torch.randn(2, 2, 3, 7, 6),  # S
        torch.randn(2, 3, 5, 6),
        torch.randn(2, 2, 3, 5, 6).to(torch.int8),
        torch.randn(2, 2, 3, 5, 6, **META),
    ],
    "proj_weight": [
        torch.randn(3, 2, 4, 6),  # T
        torch.randn(2, 2, 5, 6),  # Ds
        torch.randn(2, 2, 4, 7),  # Dt
        torch.randn(2, 2, 4, 6).int(),
        torch.randn(2, 2, 4, 6, **META),
    ],
    "proj_bias": [torch.randn(2, 2, 7), torch.randn(2, 1, 6), torch.randn(2, 2, 6).long(),
                  torch.randn(2, 2, 6, **META)],
    "mask": [torch.ones(3, 4), torch.ones(15), torch.ones(3, 5, **META)],
    "weights": [torch.ones(3, 3), torch.ones(2, 3, 1), torch.ones(2, 3).long(), torch.ones(2, 3, **META)],
}


@pytest.mark.parametrize(
    "arg,value", [(k, v) for k, vs in HID_BAD.items() for v in vs], ids=lambda x: x if isinstance(x, str) else None
)
def test_hidden_rejects(arg, value):
    with pytest.raises(ValueError, match=arg):
        mt_hidden_loss(**_hid_args(**{arg: value}))


def test_valid_arguments_accepted():
    # Guards the rejection tests above: their only defect is the one argument they change.
    assert torch.isfinite(mt_kl_loss(**_kl_args()))
    assert torch.isfinite(mt_kl_loss(**_kl_args(weights="paper")))
    assert torch.isfinite(mt_hidden_loss(**_hid_args()))
    assert teacher_weights(torch.randn(2, 4, 3), torch.tensor([0, 1, 2, -100]).int()).shape == (2, 4)


# --------------------------------------------------------------------------------------------------
# layer_map


@pytest.mark.parametrize(
    "k,m,expected",
    [
        (3, 6, [2, 4, 6]),
        (2, 3, [2, 3]),  # 1.5 rounds up to 2
        (4, 12, [3, 6, 9, 12]),
        (1, 1, [1]),
        (1, 12, [12]),
        (6, 6, [1, 2, 3, 4, 5, 6]),
        (4, 6, [2, 3, 5, 6]),  # 1.5 -> 2, 4.5 -> 5: half-up, not Python's half-to-even
        (3, 4, [1, 3, 4]),
    ],
)
def test_layer_map_cases(k, m, expected):
    assert layer_map(k, m) == expected


@pytest.mark.parametrize("k,m", [(8, 6), (4, 3), (0, 6), (-1, 6), (2.0, 6), (True, 6)])
def test_layer_map_rejects_student_layers(k, m):
    with pytest.raises(ValueError, match="--student-layers"):
        layer_map(k, m)


def test_layer_map_deeper_message():
    with pytest.raises(ValueError) as info:
        layer_map(8, 6)
    assert str(info.value) == "student layers (--student-layers) = 8 is deeper than a teacher with 6 layers"


@pytest.mark.parametrize("m", [0, -2, 3.0])
def test_layer_map_rejects_teacher_layers(m):
    with pytest.raises(ValueError, match="num_teacher_layers"):
        layer_map(1, m)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 48).flatmap(lambda m: st.tuples(st.integers(1, m), st.just(m))))
def test_layer_map_properties(km):
    k, m = km
    got = layer_map(k, m)
    assert got == [math.floor(Fraction(j * m, k) + Fraction(1, 2)) for j in range(1, k + 1)]
    assert got[-1] == m and all(a < b for a, b in zip(got, got[1:])) and got[0] >= 1
