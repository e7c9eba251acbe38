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
from fastmt.data import DataError, read_dataset

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
    student, teacher, labels, weights, tau = case
    if isinstance(weights, str):
        labels = torch.full_like(labels, -100)
        out = losses.mt_kl_loss(student, teacher, weights=weights, temperature=tau, labels=labels)
        assert float(out) == 0.0


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


@FUZZ
@given(hidden_case())
def test_hidden_loss_is_finite_or_refused(case):
    sh, th, w, b, mask, weights = case
    args = [x.clone().requires_grad_(True) for x in (sh, w, b)]
    try:
        out = losses.mt_hidden_loss(args[0], th, args[1], args[2], mask=mask, weights=weights)
    except ValueError as e:
        assert "mask" in str(e)  # the one refusal here: no unmasked position at all
        assert int(mask.sum()) == 0
        return
    out.backward()
    assert torch.isfinite(out) and out >= 0
    assert all(torch.isfinite(x.grad).all() for x in args)


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
    import os

    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs CUDA or the Triton interpreter")
    from fastmt import kernels

    student, teacher, labels, weights, tau = case
    assume(bool((labels != -100).any()))
    s_ref = student.clone().requires_grad_(True)
    ref = losses.mt_kl_loss(s_ref, teacher, weights=weights, temperature=tau, labels=labels)
    ref.backward()
    s_k = student.clone().requires_grad_(True)
    out = kernels.mt_kl_loss(s_k, teacher, weights=weights, temperature=tau, labels=labels)
    out.backward()
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
