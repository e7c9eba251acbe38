"""``fastmt.losses.lm_kl_loss``: token-level multi-teacher KD for causal LMs, against the formula in float64."""

from __future__ import annotations

import pytest
import torch

from fastmt.losses import check_vocab, lm_kl_loss


def _by_hand(s, t, y, scheme, tau, direction, ignore=-100):
    """The formula, one token and one teacher at a time, in float64 (no shared code with the loss)."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for n in range(s.shape[0]):
        if int(y[n]) == ignore:
            continue
        count += 1
        ce = torch.stack([-torch.log_softmax(t[i, n].double(), -1)[y[n]] for i in range(t.shape[0])])
        w = {"paper": 1 / (1 + ce), "softmax": torch.softmax(-ce, 0), "uniform": torch.ones_like(ce)}[scheme]
        q = torch.softmax(s[n].double() / tau, -1)
        for i in range(t.shape[0]):
            p = torch.softmax(t[i, n].double() / tau, -1)
            a, b = (p, q) if direction == "forward" else (q, p)
            total = total + w[i] * tau * tau * (a * (a.log() - b.log())).sum()
    return total / max(count, 1)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("scheme", ["paper", "softmax", "uniform"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_value_and_gradient_are_the_formula(direction, scheme, tau):
    """Odd sizes (3 teachers, 11 tokens, a 37-token vocabulary), some positions ignored (padding, the
    prompt): the value to 1e-12 and every gradient element to 1e-10 in float64."""
    g = torch.Generator().manual_seed(5)
    s = (3 * torch.randn(11, 37, generator=g, dtype=torch.float64)).requires_grad_()
    t = 3 * torch.randn(3, 11, 37, generator=g, dtype=torch.float64)
    y = torch.randint(0, 37, (11,), generator=g)
    y[[0, 1, 7]] = -100
    got = lm_kl_loss(s, t, y, scheme, tau, direction=direction)
    (gs,) = torch.autograd.grad(got, s)
    s2 = s.detach().clone().requires_grad_()
    want = _by_hand(s2, t, y, scheme, tau, direction)
    (ws,) = torch.autograd.grad(want, s2)
    assert abs(got.item() - want.item()) <= 1e-12 * max(1.0, abs(want.item()))
    assert torch.allclose(gs, ws, rtol=0, atol=1e-10)
    assert not gs[[0, 1, 7]].any()  # ignored positions get no gradient


def test_reverse_and_forward_differ_and_gradcheck():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(5, 9, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 9, generator=g, dtype=torch.float64)
    y = torch.randint(0, 9, (5,), generator=g)
    f = lm_kl_loss(s, t, y, direction="forward")
    r = lm_kl_loss(s, t, y, direction="reverse")
    assert f.item() > 0 and r.item() > 0 and abs(f.item() - r.item()) > 1e-6
    for d in ("forward", "reverse"):
        assert torch.autograd.gradcheck(lambda x, d=d: lm_kl_loss(x, t, y, "softmax", 1.5, direction=d), (s,))


def test_half_precision_inputs_give_a_float32_loss_near_float64():
    """bf16 logits: the loss is computed in float32 from the rounded inputs, so it equals the float64
    loss of those same rounded inputs to float32 rounding (the bound: a few float32 ulps of the sum)."""
    g = torch.Generator().manual_seed(2)
    s = torch.randn(16, 50, generator=g).to(torch.bfloat16)
    t = torch.randn(2, 16, 50, generator=g).to(torch.bfloat16)
    y = torch.randint(0, 50, (16,), generator=g)
    for d in ("forward", "reverse"):
        got = lm_kl_loss(s, t, y, direction=d)
        want = lm_kl_loss(s.double(), t.double(), y, direction=d)
        assert got.dtype == torch.float32
        assert abs(got.item() - want.item()) <= 50 * torch.finfo(torch.float32).eps * max(1.0, abs(want.item()))


def test_every_position_ignored_is_zero_with_zero_gradient():
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(2, 4, 6)
    y = torch.full((4,), -100)
    for d in ("forward", "reverse"):
        loss = lm_kl_loss(s, t, y, direction=d)
        (gs,) = torch.autograd.grad(loss, s)
        assert loss.item() == 0 and not gs.any()


def test_teachers_with_another_vocabulary_are_refused_naming_both_sizes():
    with pytest.raises(ValueError, match=r"teacher 0 has a vocabulary of 32000 tokens and the student 32001: "
                                         r"teachers must share the student's tokenizer"):
        lm_kl_loss(torch.randn(3, 32001), torch.randn(1, 3, 32000), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"teacher 1 \(llama\) has a vocabulary of 128256 tokens and the student 32000"):
        check_vocab(32000, [32000, 128256], ["tiny", "llama"])
    with pytest.raises(ValueError, match="direction must be one of 'forward', 'reverse'"):
        lm_kl_loss(torch.randn(3, 5), torch.randn(1, 3, 5), torch.zeros(3, dtype=torch.long), direction="js")
