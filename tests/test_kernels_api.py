"""The fused kernels (``fastmt.kernels``) against the one reference.

Each case draws inputs in float64, rounds them to the dtype under test, and compares the kernel's
value and gradients with the reference evaluated in float64 on the same rounded inputs. By default
the tensors live on the CPU and the kernels run in Triton's interpreter; ``FASTMT_TEST_DEVICE=cuda``
puts them on the GPU, where the kernels are compiled (inputs are still drawn on the CPU, so both
see the same numbers).
"""

from __future__ import annotations

import contextlib
import logging
import os

import pytest
import torch

import fastmt.kernels as fused
from fastmt import losses as ref

DEVICE = torch.device(os.environ.get("FASTMT_TEST_DEVICE", "cpu"))
if DEVICE.type not in ("cpu", "cuda"):
    raise ValueError(f"FASTMT_TEST_DEVICE={DEVICE}: use cpu or cuda")

pytestmark = [
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                       reason="FASTMT_TEST_DEVICE=cuda, but CUDA is not available here"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # the interpreter's numpy on masked -inf lanes
]



@pytest.fixture(autouse=True)
def _kernels_must_run(request):
    """Every test here fails unless the Triton kernels are what ran (never the reference fallback)."""
    from conftest import kernels_must_run

    with kernels_must_run(request, DEVICE):
        yield


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 5e-6, torch.float16: 3e-3, torch.bfloat16: 2e-2}

# On a GPU, float32 hidden-loss GEMMs run on TF32 tensor cores where torch allows TF32, and in cuBLAS
# (the reference itself) where it does not (``fastmt.kernels.hidden_products``). The tests here turn
# TF32 on there, so that the kernels are what runs, and judge float32 hidden results by TF32's rounding.
TF32 = DEVICE.type == "cuda"


@pytest.fixture(autouse=True)
def _tf32_on_a_gpu():
    if not TF32:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def hid_tol(dtype):
    """Norm-wise tolerance of the hidden loss: TF32 keeps fp16's 11 significant bits."""
    if TF32 and dtype in (torch.float32, torch.float64):
        return TOL[torch.float16]
    return TOL.get(dtype, 1e-4)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error over the largest magnitude (norm-wise relative error)."""
    got, want = got.double(), want.double()
    return float((got.detach() - want.detach()).abs().max() / want.abs().max().clamp_min(1e-30))


EPS32 = 2.0**-24
# The final rounding into the gradient's dtype: half an ulp, but a whole one for bfloat16 (Triton's
# interpreter truncates float32 to bfloat16; a GPU rounds to nearest).
OUT_REL = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-7, torch.float64: 2.0**-24}
TINY = {torch.float32: 1e-38, torch.float16: 2.0**-25, torch.bfloat16: 1e-38, torch.float64: 1e-300}


def kl_grad_scale(s, tl, weights, tau, labels, upstream, given_lse=False):
    """Per element of the student gradient, the size of the terms it is made of, each weighted by the
    size of its own exponent: ``q = exp(log q)`` carries the absolute error of ``log q`` (a float32
    ulp of it) as relative error, so ``|log q| q`` is what float32 can resolve of ``q``. With the
    teachers' log-sum-exps given (rounded to float32 apart from the logits), ``log p = t / tau - lse``
    is a difference of two float32 numbers: each carries its own ulp, ``(|t / tau| + |lse|) p``."""
    s, tl = s.double(), tl.double()
    if isinstance(weights, str):
        w = ref.teacher_weights(tl, labels, weights)
    elif weights is None:
        w = torch.ones(tl.shape[:2], dtype=torch.float64, device=s.device)
    else:
        w = weights.double()
    valid = torch.ones(s.shape[0], dtype=torch.bool, device=s.device) if labels is None else labels != -100
    w = torch.where(valid, w, 0.0)
    n_valid = max(int(valid.sum()), 1)
    log_q = torch.log_softmax(s / tau, -1)
    log_p = torch.log_softmax(tl / tau, -1)
    q, p = log_q.exp(), log_p.exp()
    term_q = w.sum(0)[:, None] * q * (1 + log_q.abs().nan_to_num(posinf=0.0))
    if given_lse:
        size_p = (tl / tau).abs() + torch.logsumexp(tl / tau, -1, keepdim=True).abs()
    else:
        size_p = log_p.abs().nan_to_num(posinf=0.0)
    term_p = (w[:, :, None] * p * (1 + size_p)).sum(0)
    return abs(upstream) * tau / n_valid * (term_q + term_p)


def hidden_grad_scales(hs, ht, w, b, mask, tw, upstream):
    """Per element of each gradient (student hidden, projection weight, bias), the sum of the
    magnitudes of the products it is made of: a dot product's float32 error is a few ulps of that."""
    hs, ht, w, b = hs.double(), ht.double(), w.double(), b.double()
    t, k, n, s, dt = ht.shape
    m = torch.ones(n, s, dtype=torch.float64, device=hs.device) if mask is None else mask.double()
    tw = torch.ones(t, n, dtype=torch.float64, device=hs.device) if tw is None else tw.double()
    z = m.sum() * dt
    # |residual| terms: |hs| |W| + |b| + |ht|, and the residual itself
    R = torch.einsum("knsd,tkde->tknse", hs.abs(), w.abs()) + b.abs()[:, :, None, None, :] + ht.abs()
    c = 2 * abs(upstream) / z * (tw[:, None, :, None, None] * m[None, None, :, :, None])  # [t,1,n,s,1]
    cR = c * R  # [t,k,n,s,dt]
    s_hs = torch.einsum("tknse,tkde->knsd", cR, w.abs())
    s_w = torch.einsum("knsd,tknse->tkde", hs.abs(), cR)
    s_b = cR.sum((2, 3))
    return s_hs, s_w, s_b


# The kernels compute in float32: a few float32 ulps of the terms an element is made of. The hidden
# backward keeps its intermediate dE in the student's dtype for half-precision inputs (as on a GPU,
# where the products read it on tensor cores), so each gradient term carries dE's one rounding:
# relative 2^-11 (half an fp16 ulp), 2^-8 for bf16 on a GPU, 2^-7 in the interpreter (it truncates
# float32 to bf16). Bounds: twice the largest of these.
K_KL = 8 * EPS32


def kl_out_rel(dtype, upstream):
    """The KL gradient's roundings into its dtype: the forward writes it for an upstream gradient of 1,
    and backward scales it in place by any other (a second rounding), except float16's, which is kept
    in float32 until backward rounds it once."""
    roundings = 2 if upstream != 1 and dtype != torch.float16 else 1
    return (1 + OUT_REL[dtype]) ** roundings - 1
K_HID = {torch.float16: 2 * 2.0**-11, torch.bfloat16: 2 * 2.0**-7}
# TF32 rounds both operands of each product to 11 significant bits (relative 2^-11 each): 2^-10 a
# product; twice that.
K_TF32 = 2 * 2.0**-10


def hid_k(dtype):
    if TF32 and dtype in (torch.float32, torch.float64):
        return K_TF32
    return K_HID.get(dtype, K_KL)


def assert_elementwise(got, want, scale, dtype, k, name="", out_rel=None):
    """``|got - want| <= OUT_REL * |want| + k * scale + TINY`` for every element: the final rounding
    into ``dtype`` plus ``k`` (relative rounding) of the size of the terms each element is made of.
    Beside the norm-wise checks: a wrong value in one small entry (a rare class of a large vocabulary)
    is invisible next to the largest entry, but not here."""
    got, want, scale = got.double(), want.double(), scale.double()
    err = (got - want).abs()
    bound = (OUT_REL[dtype] if out_rel is None else out_rel) * want.abs() + k * scale + TINY[dtype]
    worst = float((err / bound).max())
    assert worst <= 1.0, f"{name}: an element is off by {worst:.2f}x its bound (max |err| {float(err.max()):.3e})"
    return worst


def _kl_case(t, n, c, dtype, scheme, ignore, seed, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, c, generator=g, dtype=torch.float64) * spread).to(dtype)
    tl = (torch.randn(t, n, c, generator=g, dtype=torch.float64) * spread).to(dtype)
    labels = torch.randint(0, c, (n,), generator=g)
    if ignore:
        labels[::3] = -100
    weights = scheme
    if scheme == "tensor":
        weights = torch.rand(t, n, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    return s.to(DEVICE), tl.to(DEVICE), labels.to(DEVICE), weights


KL_SHAPES = [(1, 4, 2), (3, 7, 5), (2, 9, 37), (3, 5, 1000), (4, 3, 4097), (2, 2, 50257), (6, 5, 300), (8, 3, 4099)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", KL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scheme", [None, "paper", "softmax", "uniform", "tensor"])
def test_kl_matches_reference(shape, dtype, scheme):
    t, n, c = shape
    s, tl, labels, weights = _kl_case(t, n, c, dtype, scheme, ignore=True, seed=c + n)
    use_labels = labels if scheme is not None or n % 2 else None
    upstream = 2.5
    s_f = s.clone().requires_grad_()
    loss = fused.mt_kl_loss(s_f, tl, weights, temperature=2.0, labels=use_labels)
    (grad,) = torch.autograd.grad(upstream * loss, s_f)
    s_r = s.double().requires_grad_()
    w_r = weights.double() if isinstance(weights, torch.Tensor) else weights
    want = ref.mt_kl_loss(s_r, tl.double(), w_r, temperature=2.0, labels=use_labels)
    (grad_want,) = torch.autograd.grad(upstream * want, s_r)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == dtype
    assert rel_err(loss, want) < TOL[dtype]
    assert rel_err(grad, grad_want) < TOL[dtype]
    scale = kl_grad_scale(s, tl, w_r, 2.0, use_labels, upstream)
    assert_elementwise(grad, grad_want, scale, dtype, K_KL, "grad", kl_out_rel(dtype, upstream))
    assert abs(float(loss) - float(want)) <= 16 * EPS32 * abs(float(want)) + 1e-30  # float32 loss: a few ulps


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("scheme", [None, "paper", "softmax"])
def test_kl_aligned_blocks_with_head_and_tail(dtype, temperature, scheme):
    """Rows of 4099 classes, 8 per teacher: every row starts at a different offset from a 16-byte
    boundary, so each has an unaligned head, whole aligned blocks, and a tail. Temperature 1 takes
    its own path (one log-sum-exp per teacher). A view that starts one element in cannot take the
    aligned path and must give the same numbers."""
    from fastmt.kernels import kl

    t, n, c = 3, 8, 4099
    s, tl, labels, weights = _kl_case(t, n, c, dtype, scheme, ignore=True, seed=5)
    launch, _, _ = kl.kl_launch(s, tl, None, scheme, temperature, labels, -100)
    assert launch.constexprs["ALIGNED"] and launch.constexprs["TAU_ONE"] == (temperature == 1.0)
    block = launch.constexprs["ROWS"] * launch.constexprs["VEC"]
    assert c // block >= 2  # whole blocks between head and tail
    s_f = s.clone().requires_grad_()
    loss = fused.mt_kl_loss(s_f, tl, weights, temperature=temperature, labels=labels)
    (grad,) = torch.autograd.grad(3.0 * loss, s_f)
    s_r = s.double().requires_grad_()
    want = ref.mt_kl_loss(s_r, tl.double(), weights, temperature=temperature, labels=labels)
    (grad_want,) = torch.autograd.grad(3.0 * want, s_r)
    assert rel_err(loss, want) < TOL[dtype] and rel_err(grad, grad_want) < TOL[dtype]

    buf = torch.empty(n * c + 1, dtype=dtype, device=DEVICE)
    s_off = buf[1:].view(n, c)
    s_off.copy_(s)
    assert not kl.kl_launch(s_off, tl, None, scheme, temperature, labels, -100)[0].constexprs["ALIGNED"]
    s_o = s_off.requires_grad_()
    loss_o = fused.mt_kl_loss(s_o, tl, weights, temperature=temperature, labels=labels)
    (grad_o,) = torch.autograd.grad(3.0 * loss_o, s_o)
    # Only the order of the float32 sums differs: one rounding step of the gradient's dtype at most.
    assert rel_err(loss_o, loss) < 1e-6 and rel_err(grad_o, grad) < (1e-6 if dtype == torch.float32 else TOL[dtype] / 10)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("scheme", [None, "paper", "softmax", "uniform", "tensor"])
@pytest.mark.parametrize("shape", [(3, 64, 2), (8, 33, 64), (1, 5, 3), (5, 40, 7)], ids=lambda s: "x".join(map(str, s)))
def test_kl_classification_kernel_matches_row_kernel_and_reference(shape, scheme, temperature, monkeypatch):
    """Classification sizes take the one-launch kernels (several rows per step, the row count and the
    loss inside); the row kernels, forced by a zero size limit, and the reference agree with them."""
    from fastmt.kernels import kl

    t, n, c = shape
    s, tl, labels, weights = _kl_case(t, n, c, torch.float32, scheme, ignore=True, seed=n + c)
    assert kl.small_config(n, c, t) is not None

    def run():
        s_f = s.clone().requires_grad_()
        loss = fused.mt_kl_loss(s_f, tl, weights, temperature=temperature, labels=labels)
        return loss, torch.autograd.grad(-1.5 * loss, s_f)[0]

    loss, grad = run()
    monkeypatch.setattr(kl, "SMALL_ELEMS", 0)
    assert kl.small_config(n, c, t) is None
    loss_rows, grad_rows = run()
    s_r = s.double().requires_grad_()
    w_r = weights.double() if isinstance(weights, torch.Tensor) else weights
    want = ref.mt_kl_loss(s_r, tl.double(), w_r, temperature=temperature, labels=labels)
    (grad_want,) = torch.autograd.grad(-1.5 * want, s_r)
    for got, g in ((loss, grad), (loss_rows, grad_rows)):
        assert rel_err(got, want) < 1e-5 and rel_err(g, grad_want) < 1e-5
    assert rel_err(loss, loss_rows) < 1e-6 and rel_err(grad, grad_rows) < 1e-6


@contextlib.contextmanager
def launcher_ops():
    """Record the Triton kernels launched inside the block and the torch ops the launchers run
    around them (the interpreter's own copies inside a launch are not counted)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastmt.kernels import kl

    launched, ops, inside = [], [], [False]
    real_call = kl.Launch.__call__

    def call(self):
        launched.append(self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else str(self.kernel))
        inside[0] = True
        try:
            real_call(self)
        finally:
            inside[0] = False

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside[0]:
                ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    kl.Launch.__call__ = call
    try:
        with Record():
            yield launched, ops
    finally:
        kl.Launch.__call__ = real_call


def test_kl_classification_sizes_are_one_launch_each_way():
    """A classification-size loss is one kernel launch in training (the loss and its gradient, with no
    torch computation around it: only allocations), and backward one launch that scales the gradient
    in place by the upstream gradient. The row kernel counts valid rows and sums the loss with torch
    ops; evaluation writes no gradient."""
    from fastmt.kernels import kl

    allocations = {"empty.memory_format", "empty_like.default", "new_empty.default", "view.default"}
    s, tl, labels, _ = _kl_case(3, 64, 2, torch.float32, None, ignore=True, seed=9)
    with launcher_ops() as (launched, ops):
        loss, grad = kl.kl_forward(s, tl, None, "paper", 1.0, labels, -100, with_grad=True)
    assert launched == ["_mt_kl_small_kernel"]
    assert set(ops) <= allocations, ops
    assert loss.shape == () and grad.shape == s.shape
    done, up = torch.ones((), device=DEVICE), torch.tensor(2.0, device=DEVICE)
    before = grad.clone()
    with launcher_ops() as (launched, ops):
        kl.kl_scale_(grad, up, done)
    assert launched == ["_mt_kl_scale_kernel"] and set(ops) <= allocations | {"copy_.default"}, ops
    assert torch.equal(grad, before * 2.0) and float(done) == 2.0
    kl.kl_scale_(grad, up, done)  # the same upstream again: nothing changes
    assert torch.equal(grad, before * 2.0)

    s, tl, labels, _ = _kl_case(3, 8, 100, torch.float32, None, ignore=True, seed=9)
    with launcher_ops() as (launched, ops):
        loss, grad = kl.kl_forward(s, tl, None, "paper", 1.0, labels, -100)
    assert launched == ["_mt_kl_kernel"] and {"ne.Scalar", "sum.default"} <= set(ops) and grad is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("scheme", [None, "paper", "softmax", "tensor"])
@pytest.mark.parametrize("shape", [(3, 7, 1000), (2, 5, 4099), (3, 40, 7)], ids=lambda s: "x".join(map(str, s)))
def test_kl_with_the_teachers_statistics_given(shape, scheme, temperature, dtype):
    """A teacher cache hands the kernel each example's teacher log-sum-exps
    (``fastmt.losses.teacher_lse``): the kernel then skips them and must give the reference's value
    and gradient all the same; statistics that are off move the loss (they are read, not recomputed)."""
    t, n, c = shape
    s, tl, labels, weights = _kl_case(t, n, c, dtype, scheme, ignore=True, seed=n * c)
    lse = ref.teacher_lse(tl, temperature)
    assert lse.shape == (2, t, n) and lse.dtype == torch.float32
    s_f = s.clone().requires_grad_()
    loss = fused.mt_kl_loss(s_f, tl, weights, temperature=temperature, labels=labels, teacher_lse=lse)
    (grad,) = torch.autograd.grad(1.5 * loss, s_f)
    s_r = s.double().requires_grad_()
    w_r = weights.double() if isinstance(weights, torch.Tensor) else weights
    want = ref.mt_kl_loss(s_r, tl.double(), w_r, temperature=temperature, labels=labels)
    (grad_want,) = torch.autograd.grad(1.5 * want, s_r)
    assert rel_err(loss, want) < TOL[dtype] and rel_err(grad, grad_want) < TOL[dtype]
    scale = kl_grad_scale(s, tl, w_r, temperature, labels, 1.5, given_lse=True)
    assert_elementwise(grad, grad_want, scale, dtype, K_KL, "grad", kl_out_rel(dtype, 1.5))
    off = fused.mt_kl_loss(s, tl, weights, temperature=temperature, labels=labels, teacher_lse=lse + 0.25)
    assert abs(float(off) - float(loss)) > 1e-3 * abs(float(loss))


@pytest.mark.no_launch
def test_kl_teacher_statistics_of_the_wrong_shape_are_refused():
    s, tl, labels, _ = _kl_case(2, 4, 6, torch.float32, None, ignore=False, seed=3)
    with pytest.raises(ValueError, match=r"teacher_lse must be float32 \[2, T, N\]"):
        fused.mt_kl_loss(s, tl, "paper", labels=labels, teacher_lse=torch.zeros(2, 4, 2, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kl_backward_twice_through_one_graph(dtype):
    """The gradient is made in the forward for an upstream gradient of 1 and scaled in place by
    backward, then handed out without a copy: the first backward is exact, and a second one through
    the same graph (``retain_graph``) is refused in words rather than answered from a buffer autograd
    may have kept as the leaf's ``.grad``. float16's gradient waits in float32 and backward rounds it
    into a new tensor: there a second backward is exact."""
    s, tl, labels, _ = _kl_case(3, 6, 300, dtype, "paper", ignore=True, seed=12)
    s_f = s.clone().requires_grad_()
    loss = fused.mt_kl_loss(s_f, tl, "paper", temperature=2.0, labels=labels)
    (2.0 * loss).backward(retain_graph=True)
    s_r = s.double().requires_grad_()
    want = ref.mt_kl_loss(s_r, tl.double(), "paper", temperature=2.0, labels=labels)
    (g1,) = torch.autograd.grad(2.0 * want, s_r)
    assert rel_err(s_f.grad, g1) < TOL[dtype]
    if dtype == torch.float16:  # kept in float32 and rounded into a new tensor: nothing handed out
        (-3.0 * loss).backward()
        assert rel_err(s_f.grad, -0.5 * g1) < TOL[dtype]
        return
    with pytest.raises(RuntimeError, match="second backward through the same graph"):
        (-3.0 * loss).backward()


@pytest.mark.parametrize("programs", [1, 3])
def test_kl_persistent_programs_take_every_row(programs, monkeypatch):
    """Fewer programs than rows (the grid is held to the rows L2 can keep in flight): each program
    takes rows in turn, and every row's loss and gradient come out as the reference's."""
    from fastmt.kernels import kl

    s, tl, labels, _ = _kl_case(3, 7, 300, torch.float32, "softmax", ignore=True, seed=13)
    row_bytes = 300 * 4 * 5
    l2 = int(programs * row_bytes / kl.L2_SHARE) + 1  # room for this many rows in flight, on any device
    monkeypatch.setattr(kl, "MIN_PROGRAMS_PER_SM", 0)  # L2 alone decides
    monkeypatch.setattr(kl, "_device_caps", lambda device: (kl.DEFAULT_SMS, l2))
    launch, _, _ = kl.kl_launch(s, tl, None, "softmax", 2.0, labels, -100, with_grad=True)
    assert launch.grid == (programs,)
    s_f = s.clone().requires_grad_()
    loss = fused.mt_kl_loss(s_f, tl, "softmax", temperature=2.0, labels=labels)
    (grad,) = torch.autograd.grad(loss, s_f)
    s_r = s.double().requires_grad_()
    want = ref.mt_kl_loss(s_r, tl.double(), "softmax", temperature=2.0, labels=labels)
    (grad_want,) = torch.autograd.grad(want, s_r)
    assert rel_err(loss, want) < TOL[torch.float32] and rel_err(grad, grad_want) < TOL[torch.float32]


@pytest.mark.no_launch
def test_kl_programs_fit_the_rows_in_flight_to_l2_and_fill_the_sms():
    from fastmt.kernels import kl

    cpu = torch.device("cpu")
    floor = kl.MIN_PROGRAMS_PER_SM * kl.DEFAULT_SMS
    row = 30522 * 2 * 5  # bf16: the student, 3 teachers, the gradient: 103 rows fit 60% of 50 MiB
    assert kl.kl_programs(8192, row, cpu, 8) == max(floor, int(kl.L2_SHARE * kl.DEFAULT_L2) // row)
    assert kl.kl_programs(8192, 128256 * 4 * 4, cpu, 8) == floor  # 2 MB float32 rows: 15 would fit L2
    assert kl.kl_programs(8192, 60000, cpu, 8) == int(kl.L2_SHARE * kl.DEFAULT_L2) // 60000  # 524: L2 decides
    assert kl.kl_programs(8192, 200, cpu, 4) == kl.DEFAULT_SMS * 16  # short rows: as many as the SMs hold
    assert kl.kl_programs(5, row, cpu, 8) == 5 and kl.kl_programs(3, 10**9, cpu, 8) == 3


def test_kl_evaluation_makes_no_gradient():
    """Without autograd (evaluation, ``no_grad``) the kernel writes the loss only."""
    from fastmt.kernels import kl

    s, tl, labels, _ = _kl_case(2, 4, 100, torch.float32, None, ignore=False, seed=3)
    seen = []
    real = kl.kl_forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kl, "kl_forward", lambda *a, **k: seen.append(a[-1] if len(a) > 8 else k.get("with_grad")) or real(*a, **k))
        with torch.no_grad():
            fused.mt_kl_loss(s.requires_grad_(), tl, "paper", labels=labels)
        fused.mt_kl_loss(s.detach(), tl, "paper", labels=labels)
    assert seen == [False, False]


def test_kl_ignored_rows_do_not_count():
    s, tl, labels, _ = _kl_case(2, 6, 5, torch.float32, None, ignore=False, seed=1)
    labels[:3] = -100
    s_f = s.clone().requires_grad_()
    loss = fused.mt_kl_loss(s_f, tl, "paper", labels=labels)
    (grad,) = torch.autograd.grad(loss, s_f)
    assert torch.all(grad[:3] == 0) and torch.any(grad[3:] != 0)
    kept = fused.mt_kl_loss(s[3:], tl[:, 3:], "paper", labels=labels[3:])
    assert float(loss) == pytest.approx(float(kept), rel=1e-6)
    all_ignored = fused.mt_kl_loss(s, tl, "paper", labels=torch.full((6,), -100, device=DEVICE))
    assert float(all_ignored) == 0.0


def test_kl_minus_inf_masked_classes():
    s, tl, labels, _ = _kl_case(3, 5, 7, torch.float32, None, ignore=False, seed=2)
    tl[:, :, 0] = float("-inf")  # masked for every teacher...
    s[:, 0] = float("-inf")  # ... and for the student
    tl[1, :, 3] = float("-inf")  # masked for one teacher only
    s_f = s.clone().requires_grad_()
    loss = fused.mt_kl_loss(s_f, tl, "softmax", temperature=1.5, labels=labels.clamp_min(1))
    (grad,) = torch.autograd.grad(loss, s_f)
    s_r = s.double().requires_grad_()
    want = ref.mt_kl_loss(s_r, tl.double(), "softmax", temperature=1.5, labels=labels.clamp_min(1))
    (grad_want,) = torch.autograd.grad(want, s_r)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert rel_err(loss, want) < 1e-5 and rel_err(grad, grad_want) < 1e-5


def _hidden_case(t, k, n, s, ds, dt, dtype, seed, mask=True, weights=True):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(k, n, s, ds, generator=g, dtype=torch.float64).to(dtype)
    ht = torch.randn(t, k, n, s, dt, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(t, k, ds, dt, generator=g, dtype=torch.float64) * ds**-0.5).to(dtype)
    b = (torch.randn(t, k, dt, generator=g, dtype=torch.float64) * 0.1).to(dtype)
    m = (torch.rand(n, s, generator=g) > 0.3).long() if mask else None
    if m is not None:
        m[:, 0] = 1
    tw = torch.rand(t, n, generator=g, dtype=torch.float64).to(dtype) if weights else None
    return tuple(x.to(DEVICE) if x is not None else None for x in (hs, ht, w, b, m, tw))


HIDDEN_SHAPES = [(1, 1, 2, 3, 16, 16), (2, 2, 3, 5, 12, 20), (3, 2, 4, 17, 40, 70), (2, 3, 1, 1, 33, 17)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", HIDDEN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask, weights", [(False, False), (True, False), (True, True)])
def test_hidden_matches_reference(shape, dtype, mask, weights):
    hs, ht, w, b, m, tw = _hidden_case(*shape, dtype, seed=sum(shape), mask=mask, weights=weights)
    upstream = -0.75
    xs = [x.clone().requires_grad_() for x in (hs, w, b)]
    loss = fused.mt_hidden_loss(xs[0], ht, xs[1], xs[2], m, tw)
    grads = torch.autograd.grad(upstream * loss, xs)
    xr = [x.double().requires_grad_() for x in (hs, w, b)]
    want = ref.mt_hidden_loss(xr[0], ht.double(), xr[1], xr[2], m, tw.double() if tw is not None else None)
    grads_want = torch.autograd.grad(upstream * want, xr)
    assert loss.dtype == torch.float32
    assert rel_err(loss, want) < hid_tol(dtype)
    scales = hidden_grad_scales(hs, ht, w, b, m, tw, upstream)
    for name, g, gw, x, sc in zip(("hs", "proj_weight", "proj_bias"), grads, grads_want, xs, scales):
        assert g.dtype == x.dtype, name
        assert rel_err(g, gw) < hid_tol(dtype), name
        assert_elementwise(g, gw, sc, dtype, hid_k(dtype), name)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_hidden_backward_in_chunks_matches_reference(dtype):
    """A dE budget of ~1/4 of the rows: five chunks (the last one short), every gradient still within
    tolerance of the float64 reference and of the one-chunk run. The student hidden state is a non-contiguous view, as a transposed activation would be."""
    from fastmt.kernels import hidden_mse

    t, k, n, s, ds, dt = 3, 2, 4, 17, 40, 70
    hs, ht, w, b, m, tw = _hidden_case(t, k, n, s, ds, dt, dtype, seed=11)
    hs = hs.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides of a transposed tensor
    assert not hs.is_contiguous()
    item = 2 if dtype in (torch.float16, torch.bfloat16) else 4  # dE's dtype: the student's for half, else float32
    budget = 16 * t * k * dt * item  # 16 rows per chunk
    launches, *_ = hidden_mse.hidden_bwd_launch(torch.ones(()), hs, ht, w, b, m, tw, budget=budget)
    chunks = [launch.args[7:9] for launch in launches if launch.kernel is hidden_mse._hidden_de_kernel]
    assert len(chunks) == 5 and chunks[-1] == (64, n * s - 64)
    upstream = torch.tensor(-0.75, device=DEVICE)
    got = hidden_mse.hidden_backward(upstream, hs, ht, w, b, m, tw, budget=budget)
    whole = hidden_mse.hidden_backward(upstream, hs, ht, w, b, m, tw)
    xr = [x.double().requires_grad_() for x in (hs, w, b)]
    want = ref.mt_hidden_loss(xr[0], ht.double(), xr[1], xr[2], m, tw.double())
    grads_want = torch.autograd.grad(float(upstream) * want, xr)
    tol = hid_tol(dtype)
    for name, g, gw, x in zip(("hs", "proj_weight", "proj_bias"), got, grads_want, (hs, w, b)):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert rel_err(g, gw) < tol, name
    for g, h in zip(got, whole):  # chunking changes summation order only
        assert rel_err(g, h) < (1e-5 if dtype in (torch.float32, torch.float64) else tol)


def hidden_loss_error_bound(hs, ht, w, b, loss, lam=6.0):
    """A bound on the float32 error of the hidden loss, from the size of its terms.

    The loss is ``c * sum r^2`` with residuals ``r = hs @ W + b - ht`` summed over ``m = ds + 2``
    terms of total size ``R = |hs| @ |W| + |b| + |ht|``. Each of a residual's ``m`` roundings errs by at
    most ``u R`` (``u = 2^-24``), which moves the loss by at most ``2 c |r| u R``; each of the ``N``
    additions of the final sum by at most ``u * loss``. Rounding errors modelled as independent with
    mean zero (the standard probabilistic model), Hoeffding's inequality bounds their sum by
    ``lam * sqrt(sum of squared maxima)`` except with probability ``2 exp(-lam^2 / 2)`` (3e-8 at 6).
    No single machine's result enters it."""
    hs, ht, w, b = hs.double(), ht.double(), w.double(), b.double()
    r = torch.einsum("knsd,tkde->tknse", hs, w) + b[:, :, None, None, :] - ht
    R = torch.einsum("knsd,tkde->tknse", hs.abs(), w.abs()) + b.abs()[:, :, None, None, :] + ht.abs()
    c = float(loss) / float((r**2).sum())
    m = hs.shape[-1] + 2
    var = (2 * c * EPS32) ** 2 * m * float((r**2 * R**2).sum()) + r.numel() * (EPS32 * float(loss)) ** 2
    return lam * var**0.5


@pytest.mark.no_launch
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("shape", HIDDEN_SHAPES + [(3, 4, 8, 512, 384, 768)], ids=lambda s: "x".join(map(str, s)))
def test_hidden_plan_is_the_same_on_the_cpu_and_on_a_gpu(shape, dtype):
    """What the tests here check on the CPU is what a GPU runs: the same launches, grids, tiles,
    chunks and buffer dtypes. The only difference allowed is the interpreter's bf16 (multiplied as
    float32, which is exact for bf16 values), in the DOT_FP32 flag. Meta tensors give the launches a
    GPU would make (nothing runs)."""
    from fastmt.kernels import hidden_mse

    def plan(device):
        hs, ht, w, b, m, tw = _hidden_case(*shape, torch.float32, seed=1)
        hs, ht, w, b = (x.to(dtype).to(device) for x in (hs, ht, w, b))
        m, tw = m.to(device), tw.to(dtype).to(device)
        budget = 256 * shape[0] * shape[1] * shape[-1]  # a few chunks where there are many rows
        launches, dhs, dw, db = hidden_mse.hidden_bwd_launch(torch.ones((), device=device), hs, ht, w, b, m, tw,
                                                             budget=budget)
        fwd, _ = hidden_mse.hidden_fwd_launch(hs, ht, w, b, m, tw)
        out = []
        for launch in [fwd, *launches]:
            meta = {k: v for k, v in launch.constexprs.items() if k != "DOT_FP32"}
            tensors = [a.dtype for a in launch.args if isinstance(a, torch.Tensor)]
            ints = [a for a in launch.args if isinstance(a, int)]
            out.append((launch.kernel.fn.__name__, tuple(launch.grid), tuple(sorted(meta.items())), launch.num_warps,
                        tuple(tensors), tuple(ints)))
        flags = {launch.constexprs["DOT_FP32"] for launch in [fwd, *launches]}
        return out, (dhs.dtype, dw.dtype, db.dtype), flags

    cpu, gpu = plan("cpu"), plan("meta")
    assert cpu[:2] == gpu[:2]
    half = dtype in (torch.float16, torch.bfloat16)
    assert gpu[2] == {not half}  # a GPU multiplies half precision on tensor cores
    assert cpu[2] == {not half or dtype == torch.bfloat16}


# A mark, not a skip inside the test: skipped before the fixtures run, so no launch is expected.
_NO_TF32 = pytest.mark.skipif(TF32, reason="float32 on a GPU: TF32 keeps 11 bits, none of a residual 1e-3 of its "
                              "terms; with TF32 off the reference's cuBLAS GEMMs run, not these kernels")


@pytest.mark.parametrize("dtype", [pytest.param(d, marks=_NO_TF32) if d == torch.float32 else d for d in DTYPES],
                         ids=str)
def test_hidden_converged_regime_keeps_its_digits(dtype):
    # Teacher = projection of the student + 1e-3 noise: the loss is ~1e-6 of the squares it would be
    # the difference of, had the square been expanded (Gram matrices), which would leave no correct
    # digit in float32 (an ulp of those squares is ~2x the loss). Values and gradients must stay within
    # bounds derived from float32 and the size of their terms.
    g = torch.Generator().manual_seed(7)
    t, k, n, s, ds, dt = 2, 2, 4, 9, 48, 40
    hs = torch.randn(k, n, s, ds, generator=g, dtype=torch.float64) * 4
    w = torch.randn(t, k, ds, dt, generator=g, dtype=torch.float64) * ds**-0.5
    b = torch.randn(t, k, dt, generator=g, dtype=torch.float64)
    ht = torch.einsum("knsd,tkde->tknse", hs, w) + b[:, :, None, None, :]
    ht = ht + 1e-3 * torch.randn(ht.shape, generator=g, dtype=torch.float64)
    hs, ht, w, b = (x.to(dtype).to(DEVICE) for x in (hs, ht, w, b))
    xs = [x.clone().requires_grad_() for x in (hs, w, b)]
    got = fused.mt_hidden_loss(xs[0], ht, xs[1], xs[2])
    grads = torch.autograd.grad(got, xs)
    xr = [x.double().requires_grad_() for x in (hs, w, b)]
    want = ref.mt_hidden_loss(xr[0], ht.double(), xr[1], xr[2])
    grads_want = torch.autograd.grad(want, xr)
    if dtype == torch.float32:
        assert float(want) < 1e-5
    bound = hidden_loss_error_bound(hs, ht, w, b, want.detach())
    assert bound < 1e-2 * float(want)  # the bound itself keeps two digits or more
    assert abs(float(got) - float(want)) <= bound
    # Gradients: element-wise, a few ulps of the terms each entry is made of (as for random inputs;
    # a gradient ~1e-7 sits in float16's subnormals, which TINY covers).
    scales = hidden_grad_scales(hs, ht, w, b, None, None, 1.0)
    for name, gr, gw, sc in zip(("hs", "proj_weight", "proj_bias"), grads, grads_want, scales):
        assert_elementwise(gr, gw, sc, dtype, K_HID.get(dtype, K_KL), name)
        assert rel_err(gr, gw) < 3e-2, name


def test_no_gradient_into_teacher_tensors():
    s, tl, labels, _ = _kl_case(2, 4, 6, torch.float32, None, ignore=False, seed=3)
    tl.requires_grad_()
    s.requires_grad_()
    fused.mt_kl_loss(s, tl, "paper", labels=labels).backward()
    assert tl.grad is None and s.grad is not None
    hs, ht, w, b, m, tw = _hidden_case(2, 1, 2, 3, 16, 16, torch.float32, seed=4)
    ht.requires_grad_()
    tw.requires_grad_()
    w.requires_grad_()
    fused.mt_hidden_loss(hs, ht, w, b, m, tw).backward()
    assert ht.grad is None and tw.grad is None and w.grad is not None


@pytest.mark.no_launch
def test_bad_arguments_raise_like_the_reference():
    def randn(*shape):
        return torch.randn(*shape, device=DEVICE)

    s = randn(4, 3)
    with pytest.raises(ValueError, match="teacher_logits"):
        fused.mt_kl_loss(s, randn(2, 5, 3))
    with pytest.raises(ValueError, match="weights"):
        fused.mt_kl_loss(s, randn(2, 4, 3), weights="best", labels=torch.zeros(4, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="proj_weight"):
        fused.mt_hidden_loss(randn(1, 2, 3, 8), randn(1, 1, 2, 3, 8), randn(1, 1, 9, 8), randn(1, 1, 8))


def test_compiled_step_equals_eager_without_graph_break():
    hs, ht, w, b, m, tw = _hidden_case(2, 2, 3, 5, 16, 24, torch.float32, seed=5)
    s, tl, labels, _ = _kl_case(2, 3, 11, torch.float32, None, ignore=True, seed=6)

    def step(s, hs, w, b):
        kd = fused.mt_kl_loss(s, tl, "paper", temperature=2.0, labels=labels)
        hid = fused.mt_hidden_loss(hs, ht, w, b, m, tw)
        return kd + 0.5 * hid

    def run(fn):
        xs = [x.clone().requires_grad_() for x in (s, hs, w, b)]
        loss = fn(*xs)
        return loss.detach(), torch.autograd.grad(loss, xs)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    eager_loss, eager_grads = run(step)
    comp_loss, comp_grads = run(compiled)
    torch.testing.assert_close(comp_loss, eager_loss)
    for a, e in zip(comp_grads, eager_grads):
        torch.testing.assert_close(a, e)
    explained = torch._dynamo.explain(step)(*[x.clone().requires_grad_() for x in (s, hs, w, b)])
    assert explained.graph_break_count == 0 and explained.graph_count == 1


@pytest.mark.no_launch
def test_fallback_without_cuda_or_interpreter(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(fused, "_warned", False)
    s, tl, labels = (x.cpu() for x in _kl_case(2, 4, 6, torch.float32, None, ignore=False, seed=8)[:3])
    with caplog.at_level(logging.WARNING, logger="fastmt"):
        a = fused.mt_kl_loss(s, tl, "paper", labels=labels)
        fused.mt_kl_loss(s, tl, "paper", labels=labels)
    assert torch.equal(a, ref.mt_kl_loss(s, tl, "paper", labels=labels))
    assert sum("running the reference" in r.message for r in caplog.records) == 1


@pytest.mark.no_launch
def test_fastmt_check_passes_on_this_machine(tmp_path):
    from conftest import run_cli

    r = run_cli("check", "--quick", "--device", DEVICE.type, "--json", tmp_path / "check.json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL" not in r.stdout and "cases pass" in r.stdout
    import json

    rows = json.loads((tmp_path / "check.json").read_text())["rows"]
    assert {r["dtype"] for r in rows} == {"fp32", "fp16", "bf16"} and all(r["ok"] for r in rows)


@pytest.mark.parametrize("scale", [1e2, 1e4])
def test_kl_large_logits_keep_their_digits(scale):
    """Logits with a large offset per row (softmax ignores it): the kernel must not lose the digits of
    the answer to the offset. It keeps logits relative to their running maxima; adding a log-sum-exp
    onto a maximum of 1e4 and subtracting it again would cost about 1e-3 of every result."""
    g = torch.Generator().manual_seed(7)
    off_t = torch.randn(2, 16, 1, generator=g, dtype=torch.float64) * scale
    off_s = torch.randn(16, 1, generator=g, dtype=torch.float64) * scale
    t = (torch.randn(2, 16, 37, generator=g, dtype=torch.float64) * 2 + off_t).float()
    s = (torch.randn(16, 37, generator=g, dtype=torch.float64) * 2 + off_s).float()
    labels = torch.randint(0, 37, (16,), generator=g).to(DEVICE)
    t, s = t.to(DEVICE), s.to(DEVICE)
    s_ref = s.double().requires_grad_(True)  # the reference sees exactly the float32 inputs
    want = ref.mt_kl_loss(s_ref, t.double(), weights="paper", temperature=1.0, labels=labels)
    want.backward()
    s_k = s.clone().requires_grad_(True)
    out = fused.mt_kl_loss(s_k, t, weights="paper", temperature=1.0, labels=labels)
    out.backward()
    assert abs(float(out.detach()) - float(want.detach())) <= 2e-6 * abs(float(want.detach()))
    assert float((s_k.grad.double() - s_ref.grad).norm()) <= 2e-6 * float(s_ref.grad.norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kl_a_262144_wide_row(dtype):
    """The widest vocabulary the README names (256k): one row per example, streamed in blocks."""
    t, n, c = 2, 2, 262144
    s, tl, labels, _ = _kl_case(t, n, c, dtype, "paper", ignore=False, seed=21)
    s_f = s.clone().requires_grad_()
    loss = fused.mt_kl_loss(s_f, tl, "paper", temperature=2.0, labels=labels)
    (grad,) = torch.autograd.grad(loss, s_f)
    s_r = s.double().requires_grad_()
    want = ref.mt_kl_loss(s_r, tl.double(), "paper", temperature=2.0, labels=labels)
    (grad_want,) = torch.autograd.grad(want, s_r)
    assert rel_err(loss, want) < TOL[dtype] and rel_err(grad, grad_want) < TOL[dtype]
    assert_elementwise(grad, grad_want, kl_grad_scale(s, tl, "paper", 2.0, labels, 1.0), dtype, K_KL, "grad")


@pytest.mark.parametrize("shape", [(3, 64, 2), (3, 8, 100)], ids=["one-launch", "row-kernels"])
def test_kl_reads_nothing_back_to_the_host(shape):
    """The KL loss and its gradient never read a device value on the host (no ``.item()``, no
    ``.tolist()``, no data-dependent shape): on a GPU each would stall the stream."""
    t, n, c = shape
    s, tl, labels, _ = _kl_case(t, n, c, torch.float32, "paper", ignore=True, seed=4)
    s = s.requires_grad_()
    with launcher_ops() as (launched, ops):
        loss = fused.mt_kl_loss(s, tl, "paper", temperature=2.0, labels=labels)
        (grad,) = torch.autograd.grad(loss, s)
    reads = [op for op in ops if op in ("_local_scalar_dense.default", "nonzero.default", "masked_select.default")]
    assert launched and reads == [], reads
    assert grad.shape == s.shape


@pytest.mark.no_launch
def test_float32_hidden_gemms_run_on_tf32_or_cublas_on_a_gpu(monkeypatch):
    """Never slower than the reference by construction: float32 on a GPU runs the hidden GEMMs on TF32
    tensor cores where torch allows TF32, else in cuBLAS (the reference); exact-float32 Triton tiles
    (FMA units) only in the CPU interpreter."""
    from fastmt.kernels import hidden_mse

    monkeypatch.setattr(fused, "available", lambda device=None: True)
    before = torch.backends.cuda.matmul.allow_tf32  # a property of torch's: set and put back by hand
    try:
        for allow, want in ((False, "cublas"), (True, "tf32")):
            torch.backends.cuda.matmul.allow_tf32 = allow
            assert fused.hidden_products(torch.float32, "cuda") == want
            assert fused.hidden_products(torch.float64, "cuda") == want
            assert fused.hidden_products(torch.float16, "cuda") == fused.hidden_products(torch.bfloat16, "cuda") == "half"
            assert fused.hidden_products(torch.float32, "cpu") == "ieee"  # the interpreter: exact float32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    # The TF32 plan: float32 operands and dE, tensor-core tiles, tl.dot's input_precision "tf32".
    hs, ht, w, b, m, tw = (torch.empty(x.shape, dtype=x.dtype, device="meta") for x in
                           _hidden_case(3, 4, 8, 64, 384, 768, torch.float32, seed=1))
    launches, *_ = hidden_mse.hidden_bwd_launch(torch.ones((), device="meta"), hs, ht, w, b, m, tw, tf32=True)
    fwd, _ = hidden_mse.hidden_fwd_launch(hs, ht, w, b, m, tw, tf32=True)
    for launch in [fwd, *launches]:
        assert launch.constexprs["DOT_FP32"] and launch.constexprs["PRECISION"] == "tf32"
    assert fwd.constexprs["BLOCK_R"] == fwd.constexprs["BLOCK_D"] == 128
    exact, _ = hidden_mse.hidden_fwd_launch(hs, ht, w, b, m, tw, tf32=False)
    assert exact.constexprs["PRECISION"] == "ieee" and exact.constexprs["BLOCK_R"] == 64
