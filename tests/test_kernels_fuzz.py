"""Property tests: random files never crash the reader; random tensors never make a loss NaN silently.

Every case either gives a well-formed result or raises the documented error (``DataError`` for
files, ``ValueError`` for loss arguments) — never another exception, a hang, or a silent NaN.
"""

from __future__ import annotations

import string
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fastmt import losses
from fastmt.data.dataset import DataError, read_dataset

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EXTS = [".tsv", ".csv", ".jsonl"]


def _read(data: bytes, ext: str):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"f{ext}"
        path.write_bytes(data)
        try:
            ds = read_dataset(path)
        except DataError as e:
            msg = str(e)
            assert msg.startswith(str(path)), msg  # names the file
            assert "\n" not in msg, msg  # one line
            return None
    assert len(ds.text_a) == len(ds.labels) > 0
    assert all(isinstance(t, str) for t in ds.text_a)
    assert ds.text_b is None or len(ds.text_b) == len(ds.text_a)
    return ds


@FUZZ
@given(st.binary(max_size=400), st.sampled_from(EXTS))
def test_random_bytes(data, ext):
    _read(data, ext)


@FUZZ
@given(st.binary(max_size=200), st.sampled_from(EXTS))
def test_random_bytes_after_a_good_header(data, ext):
    head = {".tsv": b"sentence\tlabel\nfine film\tpos\n", ".csv": b"sentence,label\nfine film,pos\n",
            ".jsonl": b'{"sentence": "fine film", "label": "pos"}\n'}[ext]
    _read(head + data, ext)


CELL = st.text(alphabet=string.ascii_letters + string.digits + " \t,;|\"'\\{}[]:\r\n\x00é😀", max_size=12)
COLUMNS = st.sampled_from(["sentence", "label", "text", "sentence1", "sentence2", "premise", "hypothesis", "idx", "x", ""])


@FUZZ
@given(st.sampled_from(["\t", ",", ";", "|"]), st.lists(COLUMNS, min_size=1, max_size=4),
       st.lists(st.lists(CELL, min_size=0, max_size=5), max_size=6), st.sampled_from([".tsv", ".csv"]))
def test_random_delimited_tables(delim, header, rows, ext):
    text = delim.join(header) + "\n" + "".join(delim.join(r) + "\n" for r in rows)
    _read(text.encode("utf-8"), ext)


@FUZZ
@given(st.lists(st.dictionaries(COLUMNS, st.one_of(CELL, st.integers(-3, 3), st.none(), st.floats(allow_nan=True)), max_size=4),
                max_size=6))
def test_random_json_lines(objs):
    import json

    _read("".join(json.dumps(o) + "\n" for o in objs).encode("utf-8"), ".jsonl")


# ---------------------------------------------------------------------------------------------------
# Losses: random shapes, extreme magnitudes, -inf masks


SCALES = [1e-4, 1.0, 30.0, 1e3, 1e4]


@st.composite
def kl_case(draw):
    t, n, c = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(2, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from(SCALES))
    student = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    teacher = torch.randn(t, n, c, generator=g, dtype=torch.float64) * scale
    # Masked classes: -inf for the student and every teacher; each row keeps at least one class.
    mask = torch.rand(n, c, generator=g) < draw(st.sampled_from([0.0, 0.3, 0.7]))
    mask[torch.arange(n), torch.randint(0, c, (n,), generator=g)] = False
    student = student.masked_fill(mask, float("-inf"))
    teacher = teacher.masked_fill(mask, float("-inf"))
    labels = torch.randint(0, c, (n,), generator=g)
    labels = torch.where(mask[torch.arange(n), labels], mask.logical_not().float().argmax(1), labels)  # gold not masked
    ignore = torch.rand(n, generator=g) < draw(st.sampled_from([0.0, 0.3]))
    labels = labels.masked_fill(ignore, -100)
    weights = draw(st.sampled_from(["paper", "softmax", "uniform", None, "tensor"]))
    if weights == "tensor":
        weights = torch.rand(t, n, generator=g, dtype=torch.float64)
    tau = draw(st.sampled_from([0.5, 1.0, 2.0, 8.0]))
    return student, teacher, labels, weights, tau


@FUZZ
@given(kl_case())
def test_kl_loss_is_finite_and_float32_agrees_with_float64(case):
    student, teacher, labels, weights, tau = case
    assume(bool((labels != -100).any()))
    s64 = student.clone().requires_grad_(True)
    loss64 = losses.mt_kl_loss(s64, teacher, weights=weights, temperature=tau, labels=labels)
    loss64.backward()
    assert torch.isfinite(loss64) and loss64 >= -1e-9
    g = s64.grad
    assert torch.isfinite(g).all()
    assert (g[student == float("-inf")] == 0).all()  # masked classes get no gradient
    s32 = student.float().requires_grad_(True)
    w32 = weights.float() if isinstance(weights, torch.Tensor) else weights
    loss32 = losses.mt_kl_loss(s32, teacher.float(), weights=w32, temperature=tau, labels=labels)
    loss32.backward()
    assert torch.isfinite(loss32) and torch.isfinite(s32.grad).all()
    assert abs(float(loss32.detach()) - float(loss64.detach())) <= 1e-4 * max(1.0, abs(float(loss64)))
    assert float((s32.grad.double() - g).norm()) <= 1e-3 * max(1e-6, float(g.norm())) + 1e-6


@FUZZ
@given(kl_case())
def test_kl_loss_all_rows_ignored_is_zero(case):
    """Every weighting (a scheme, none, or a tensor): with every row ignored the loss is 0 and the
    student gets a zero gradient (the ignored rows' values never reach it)."""
    student, teacher, labels, weights, tau = case
    labels = torch.full_like(labels, -100)
    s = student.clone().requires_grad_(True)
    out = losses.mt_kl_loss(s, teacher, weights=weights, temperature=tau, labels=labels)
    out.backward()
    assert float(out) == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s.grad))


@st.composite
def hidden_case(draw):
    t, k, n, s = (draw(st.integers(1, 3)) for _ in range(4))
    ds, dt = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from(SCALES))
    sh = torch.randn(k, n, s, ds, generator=g, dtype=torch.float64) * scale
    th = torch.randn(t, k, n, s, dt, generator=g, dtype=torch.float64) * scale
    w = torch.randn(t, k, ds, dt, generator=g, dtype=torch.float64) / ds**0.5
    b = torch.randn(t, k, dt, generator=g, dtype=torch.float64)
    mask = (torch.rand(n, s, generator=g) < draw(st.sampled_from([1.0, 0.6, 0.0]))).long()
    weights = torch.rand(t, n, generator=g, dtype=torch.float64) if draw(st.booleans()) else None
    return sh, th, w, b, mask, weights


def _hidden_by_hand(sh, th, w, b, mask, weights):
    """The hidden loss written out directly (float64): the squared error of every projected student
    layer against every teacher layer, kept where the mask is 1, weighted per teacher and example,
    over the masked positions times the teacher width."""
    t, k, n, s, dt = th.shape
    total = sh.new_zeros(())
    for i in range(t):
        for j in range(k):
            err = ((sh[j] @ w[i, j] + b[i, j] - th[i, j]) ** 2).sum(-1)  # [n, s]
            wi = weights[i][:, None] if weights is not None else 1.0
            total = total + (err * mask * wi).sum()
    return total / (mask.sum() * dt) if mask.sum() > 0 else total * 0


@FUZZ
@given(hidden_case())
def test_hidden_loss_is_finite_and_matches_the_formula(case):
    """Finite values and gradients at every scale; equal to the formula written out by hand; an
    all-masked batch (no position to compare) is exactly 0 with zero gradients."""
    sh, th, w, b, mask, weights = case
    args = [x.clone().requires_grad_(True) for x in (sh, w, b)]
    out = losses.mt_hidden_loss(args[0], th, args[1], args[2], mask=mask, weights=weights)
    out.backward()
    assert torch.isfinite(out) and out >= 0
    assert all(torch.isfinite(x.grad).all() for x in args)
    if int(mask.sum()) == 0:
        assert float(out) == 0.0 and all(torch.equal(x.grad, torch.zeros_like(x)) for x in args)
        return
    want = _hidden_by_hand(sh, th, w, b, mask.double(), weights)
    assert abs(float(out) - float(want)) <= 1e-9 * max(1.0, abs(float(want)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_not_hidden(bad):
    """A NaN or +inf in the logits is not masked away: the loss shows it (and training skips the step)."""
    s = torch.randn(3, 4)
    t = torch.randn(2, 3, 4)
    t[1, 0, 2] = bad
    out = losses.mt_kl_loss(s, t, weights="paper", labels=torch.tensor([0, 1, 2]))
    assert not torch.isfinite(out)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kl_case())
def test_fused_kl_kernel_agrees_on_fuzzed_inputs(case):
    from conftest import kernel_launches
    from fastmt import kernels

    student, teacher, labels, weights, tau = case
    assume(bool((labels != -100).any()))
    s_ref = student.clone().requires_grad_(True)
    ref = losses.mt_kl_loss(s_ref, teacher, weights=weights, temperature=tau, labels=labels)
    ref.backward()
    s_k = student.clone().requires_grad_(True)
    with kernel_launches() as launched:
        out = kernels.mt_kl_loss(s_k, teacher, weights=weights, temperature=tau, labels=labels)
        out.backward()
    assert len(launched) == 2, launched  # forward and backward both ran as Triton kernels
    assert torch.isfinite(out)
    # The kernel accumulates in float32 whatever the input dtype, and forms sum p (t - s)/tau minus
    # the two log-sum-exps: its rounding error grows with the logits' size (a float32 ulp of max|z|/tau).
    finite = torch.cat([student[torch.isfinite(student)], teacher[torch.isfinite(teacher)]])
    spread = float(finite.abs().max()) / tau
    tol = 1e-4 * max(1.0, abs(float(ref))) + 8 * 2.0**-23 * spread * tau**2
    assert abs(float(out) - float(ref)) <= tol
    assert torch.isfinite(s_k.grad).all()
    # The gradient is tau * sum_t w_t (p_s - p_t) / rows: with probabilities near each other (logits
    # ~1e-4 apart) float32 can resolve p_s - p_t only to a few ulps of 1, whatever the algorithm.
    rows = max(1, int((labels != -100).sum()))
    floor = 4 * 2.0**-23 * tau / rows * student.numel() ** 0.5
    assert float((s_k.grad.double() - s_ref.grad).norm()) <= 1e-3 * float(s_ref.grad.norm()) + floor + 1e-6


@st.composite
def fused_hidden_case(draw):
    """Hidden-loss inputs for the kernel: odd sizes, sparse or empty masks, zero weights, views that
    are not contiguous, and every dtype (float64 included)."""
    t, k, n, s = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 9))
    ds, dt = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-2, 1.0, 10.0]))
    sh = torch.randn(k, n, s, ds, generator=g, dtype=torch.float64) * scale
    th = torch.randn(t, k, n, s, dt, generator=g, dtype=torch.float64) * scale
    w = torch.randn(t, k, ds, dt, generator=g, dtype=torch.float64) / ds**0.5
    b = torch.randn(t, k, dt, generator=g, dtype=torch.float64) * 0.1
    mask_kind = draw(st.sampled_from(["none", "random", "empty", "bool"]))
    mask = None
    if mask_kind != "none":
        mask = torch.rand(n, s, generator=g) < (0.0 if mask_kind == "empty" else 0.6)
        mask = mask if mask_kind == "bool" else mask.long()
    weights = None
    if draw(st.booleans()):
        weights = torch.rand(t, n, generator=g, dtype=torch.float64)
        weights[:, 0] = 0.0  # an example no teacher weighs
    sh, th, w, b = (x.to(dtype) for x in (sh, th, w, b))
    weights = weights.to(dtype) if weights is not None else None
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    if layout == "transposed":  # same values, the strides of a transposed activation / weight
        sh = sh.transpose(1, 2).contiguous().transpose(1, 2)
        w = w.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "strided":  # every other element of a wider buffer
        sh = torch.stack([sh, torch.zeros_like(sh)], -1)[..., 0]
        th = torch.stack([th, torch.zeros_like(th)], -1)[..., 0]
    return sh, th, w, b, mask, weights


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fused_hidden_case())
def test_fused_hidden_kernel_agrees_on_fuzzed_inputs(case):
    from conftest import kernel_launches
    from fastmt import kernels

    sh, th, w, b, mask, weights = case
    dtype = sh.dtype
    xs = [x.clone().requires_grad_(True) for x in (sh, w, b)]
    with kernel_launches() as launched:
        out = kernels.mt_hidden_loss(xs[0], th, xs[1], xs[2], mask=mask, weights=weights)
        grads = torch.autograd.grad(-1.25 * out, xs)
    assert launched, "the hidden loss did not run as Triton kernels"
    xr = [x.double().requires_grad_(True) for x in (sh, w, b)]
    want = losses.mt_hidden_loss(xr[0], th.double(), xr[1], xr[2], mask=mask,
                                 weights=weights.double() if weights is not None else None)
    grads_want = torch.autograd.grad(-1.25 * want, xr)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    if mask is not None and int(mask.sum()) == 0:
        assert float(out) == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads)
        return
    # float32 inside the kernel (float64 inputs too); half-precision gradients are rounded once more.
    tol = {torch.float64: 2e-5, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    assert abs(float(out) - float(want)) <= tol * abs(float(want)) + 1e-12
    for name, g, gw, x in zip(("student_hidden", "proj_weight", "proj_bias"), grads, grads_want, xs):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        err = float((g.double() - gw).abs().max())
        assert err <= tol * float(gw.abs().max()) + 1e-12, (name, err, float(gw.abs().max()))
