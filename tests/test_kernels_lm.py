"""The fused output layer + multi-teacher KL (``fastmt.kernels.lm_linear_kl_loss``) against its reference.

Inputs are drawn in float64 and rounded to the dtype under test; the reference
(``fastmt.losses.lm_linear_kl_loss``) then runs in float64 on the same rounded numbers, forming the
``N x V`` logits the kernel never forms. ``FASTMT_TEST_DEVICE=cuda`` runs the same cases on a GPU.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastmt.kernels as fused
from fastmt import losses as ref
from fastmt.kernels import lm_kl, lm_tiled

DEVICE = torch.device(os.environ.get("FASTMT_TEST_DEVICE", "cpu"))

pytestmark = [
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                       reason="FASTMT_TEST_DEVICE=cuda, but CUDA is not available here"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # the interpreter's numpy on masked -inf lanes
]

# Gradients, element by element: within ULPS units of EPS of the size of the terms each entry is made
# of, plus its final rounding into the dtype (half an ulp; a whole one for bfloat16, which Triton's
# interpreter truncates). The terms: d logits = sum_i w_i (q - p_i) (forward) or sum_i w_i q (log q -
# log p_i - KL_i) (reverse), each probability weighted by the size of its base-2 exponent (the
# exponent's rounding is what a probability's error is made of), summed over |w| |x| as the GEMMs
# sum them. float32: measured worst 1.35 units, bound 8; half dtypes: G is rounded to the dtype
# before its GEMMs (measured 0.05 of a unit), bound 2. Norm-wise, TOL (float32 only for short rows).
EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
ULPS = {torch.float32: 8, torch.float16: 2, torch.bfloat16: 2}
FINAL = {torch.float32: 0.5, torch.float16: 0.5, torch.bfloat16: 1.0}
TOL = {torch.float32: 5e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}
LOSS_TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _kernels_must_run(request):
    """Every test here fails unless the Triton kernels are what ran (never the reference fallback)."""
    from conftest import kernels_must_run

    with kernels_must_run(request, DEVICE):
        yield


@pytest.fixture(autouse=True)
def _exact_float32():
    """float32 products exact on a GPU too (the bounds are float32's): TF32 off, whatever ran before."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().detach(), want.double().detach()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _case(n, d, widths, v, dtype, seed, ignore=(1,)):
    """Student ``[n,d]`` / ``[v,d]``, teachers of the given widths, next tokens with ``ignore`` rows
    set to -100; logits of a few units, like a trained LM's."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, d, generator=g, dtype=torch.float64)
    ws = torch.randn(v, d, generator=g, dtype=torch.float64) * 1.5 / d**0.5
    hts = [torch.randn(n, w, generator=g, dtype=torch.float64) for w in widths]
    wts = [torch.randn(v, w, generator=g, dtype=torch.float64) * 2.0 / w**0.5 for w in widths]
    y = torch.randint(0, v, (n,), generator=g)
    y[[i for i in ignore if i < n]] = -100
    to = lambda x: x.to(dtype).to(DEVICE)  # noqa: E731
    return to(hs), to(ws), [to(h) for h in hts], [to(w) for w in wts], y.to(DEVICE)


def _logit_terms(hs, ws, hts, wts, y, weights, tau, direction):
    """Per entry of d loss / d student logits, the size of what it is made of (see EPS above), float64."""
    z = hs.double() @ ws.double().t()
    tz = torch.stack([h.double() @ w.double().t() for h, w in zip(hts, wts)])
    if isinstance(weights, torch.Tensor):
        w = weights.double()
    else:
        w = ref.teacher_weights(tz, y, weights) if weights is not None else torch.ones(tz.shape[:2], dtype=z.dtype)
    valid = (y != -100).to(torch.float64).cpu()
    w = w.cpu() * valid
    lq, lp = torch.log_softmax(z.cpu() / tau, -1), torch.log_softmax(tz.cpu() / tau, -1)
    q, p = lq.exp(), lp.exp()
    size = 1 + (lq.abs() + lp.abs()) / 0.6931471805599453  # [T,N,V]: the base-2 exponents
    if direction == "forward":
        terms = (w[:, :, None] * (q + p) * size).sum(0)
    else:
        kl = (q * (lq - lp)).sum(-1, keepdim=True)
        terms = (w[:, :, None] * q * ((lq - lp).abs() + kl.abs() + 1) * size).sum(0)
    return terms * tau / valid.sum().clamp_min(1)


def _within_bound(got, want, terms, dtype, what):
    got, want = got.double().cpu(), want.double().cpu()
    bound = ULPS[dtype] * EPS[dtype] * terms + FINAL[dtype] * EPS[dtype] * 2 * want.abs()
    ratio = ((got - want).abs() / bound.clamp_min(1e-300)).max().item()
    assert ratio <= 1.0, f"{what}: an entry is off by {ratio:.3g}x its bound"


def _loss_bound(hs, ws, hts, wts, y, weights, tau, dtype, want):
    """How far the float32 loss may be from float64's: LOSS_TOL of it, plus float32's rounding of the
    log-sum-exps it is a difference of (each a sum over V columns, so log2(V) roundings deep), weighted
    as the loss weights them. A 262,144-token row's log-sum-exps are ~13: on a GPU their rounding
    alone is 1e-5 of a loss of 3."""
    z = (hs.double() @ ws.double().t()).cpu() / tau
    tz = torch.stack([(h.double() @ w.double().t()).cpu() for h, w in zip(hts, wts)]) / tau
    mags = torch.logsumexp(z, -1).abs()[None] + torch.logsumexp(tz, -1).abs()  # [T,N]
    if isinstance(weights, torch.Tensor):
        w = weights.double().cpu()
    elif weights is None:
        w = torch.ones_like(mags)
    else:
        w = ref.teacher_weights(tz * tau, y.cpu(), weights)
    valid = (y != -100).double().cpu()
    spread = (w * mags * valid).sum() * tau * tau / valid.sum().clamp_min(1)
    v = ws.shape[0]
    return LOSS_TOL[dtype] * max(1.0, abs(want)) + float(spread) * math.log2(v) * EPS[torch.float32]


def _compare(hs, ws, hts, wts, y, weights, tau, direction, dtype, chunk_bytes=None, backend=None):
    a, b = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    loss = fused.lm_linear_kl_loss(a, b, hts, wts, y, weights, tau, direction=direction, chunk_bytes=chunk_bytes,
                                   backend=backend)
    loss.backward()
    a64, b64 = hs.double().requires_grad_(), ws.double().requires_grad_()
    w64 = weights.double() if isinstance(weights, torch.Tensor) else weights
    want = ref.lm_linear_kl_loss(a64, b64, [h.double() for h in hts], [w.double() for w in wts], y, w64, tau,
                                 direction=direction)
    want.backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert a.grad.dtype == dtype and b.grad.dtype == dtype
    bound = _loss_bound(hs, ws, hts, wts, y, weights, tau, dtype, float(want))
    assert abs(float(loss) - float(want)) <= bound, f"loss off by {abs(float(loss) - float(want)):.3g} > {bound:.3g}"
    terms = _logit_terms(hs, ws, hts, wts, y, weights, tau, direction)  # [N,V]
    _within_bound(a.grad, a64.grad, terms @ ws.double().abs().cpu(), dtype, "d student_hidden")
    _within_bound(b.grad, b64.grad, terms.t() @ hs.double().abs().cpu(), dtype, "d student_weight")
    if ws.shape[0] <= 16384:
        assert rel_err(a.grad, a64.grad) < TOL[dtype], "d student_hidden"
        assert rel_err(b.grad, b64.grad) < TOL[dtype], "d student_weight"
    return a.grad, b.grad


# (N tokens, student width, teacher widths, vocabulary): odd sizes, teachers of different widths,
# rows and vocabulary that are not multiples of any tile.
SHAPES = [(5, 16, (16,), 37), (13, 40, (24, 40), 300), (33, 24, (16, 48, 24), 1000)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# The backends that run Triton kernels: chunks of rows (the default) and vocabulary tiles. The reverse
# KL over chunks of rows runs the reference's formula on each chunk (no kernel: marked no_launch).
BACKEND_DIRECTIONS = [pytest.param("chunks", "forward", id="chunks-forward"),
                      pytest.param("chunks", "reverse", id="chunks-reverse", marks=pytest.mark.no_launch),
                      pytest.param("triton", "forward", id="triton-forward"),
                      pytest.param("triton", "reverse", id="triton-reverse")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-D{s[1]}-T{len(s[2])}-V{s[3]}")
@pytest.mark.parametrize("backend,direction", BACKEND_DIRECTIONS)
@pytest.mark.parametrize("weights", ["paper", "softmax", "uniform", "tensor", None])
def test_matches_reference(weights, backend, direction, shape, dtype):
    n, d, widths, v = shape
    hs, ws, hts, wts, y = _case(n, d, widths, v, dtype, seed=n + v)
    if weights == "tensor":
        weights = torch.rand(len(widths), n, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    tau = 2.0 if v != 300 else 1.0  # both the tempered and the temperature-1 paths
    _compare(hs, ws, hts, wts, y, weights, tau, direction, dtype, backend=backend)


@pytest.mark.parametrize("backend,direction", BACKEND_DIRECTIONS)
def test_chunks_of_rows_give_the_one_chunk_result(backend, direction):
    """Chunks of 16 rows (5 chunks of 70 rows) against one: the same gradients."""
    hs, ws, hts, wts, y = _case(70, 24, (16, 32), 123, torch.float32, seed=2, ignore=(0, 5, 69))
    one = _compare(hs, ws, hts, wts, y, "paper", 2.0, direction, torch.float32, backend=backend, chunk_bytes=2**30)
    many = _compare(hs, ws, hts, wts, y, "paper", 2.0, direction, torch.float32, chunk_bytes=16 * 123 * 4,
                    backend=backend)
    for x, z in zip(one, many):
        assert rel_err(z, x) < 1e-6


class _Sizes(TorchDispatchMode):
    """The largest tensor any torch op makes inside the block (kernels' outputs are made by torch too)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else [out]:
            # uint8: the interpreter's byte copies of the inputs' storage (no such copies on a GPU)
            if isinstance(x, torch.Tensor) and x.dtype != torch.uint8:
                self.largest = max(self.largest, x.numel())
        return out


def test_never_forms_tokens_by_vocabulary_logits():
    """Forward and backward with 3 teachers: nothing as large as one model's ``N x V`` logits is made
    (the gradient block is 16 of the 96 rows). The same recorder sees the reference make them."""
    n, v = 96, 500
    hs, ws, hts, wts, y = _case(n, 16, (16, 16, 16), v, torch.float32, seed=4)  # every input < N x V
    ht, wt = lm_kl.stack_teachers(hts), lm_kl.stack_teachers(wts)
    a, b = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    with _Sizes() as sizes:
        loss = fused.lm_linear_kl_loss(a, b, ht, wt, y, "softmax", 2.0, chunk_bytes=16 * v * 4)
        loss.backward()
    assert sizes.largest < n * v, sizes.largest
    assert sizes.largest >= 16 * v  # the gradient block itself: the recorder does see kernel outputs
    with _Sizes() as seen:
        ref.lm_linear_kl_loss(hs.double().requires_grad_(), ws.double(), ht.double(), wt.double(), y, "softmax", 2.0)
    assert seen.largest >= 3 * n * v


def test_tied_input_and_output_embeddings():
    """The student's output matrix is its input embedding: the weight's gradient is the head's plus the
    lookup's, as with the reference."""
    g = torch.Generator().manual_seed(8)
    v, d, n = 211, 24, 19
    ids = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    hts = [torch.randn(n, 32, generator=g).to(DEVICE), torch.randn(n, 16, generator=g).to(DEVICE)]
    wts = [torch.randn(v, 32, generator=g).to(DEVICE) / 4, torch.randn(v, 16, generator=g).to(DEVICE) / 3]
    y = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    grads = []
    for loss_fn, dtype in ((fused.lm_linear_kl_loss, torch.float32), (ref.lm_linear_kl_loss, torch.float64)):
        emb = torch.nn.Embedding(v, d).to(dtype)
        with torch.no_grad():
            emb.weight.copy_(torch.randn(v, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
        emb = emb.to(DEVICE)
        h = torch.tanh(emb(ids) @ mix.to(dtype).to(DEVICE))
        loss = loss_fn(h, emb.weight, [x.to(dtype) for x in hts], [x.to(dtype) for x in wts], y, "paper", 2.0)
        loss.backward()
        grads.append(emb.weight.grad)
    assert rel_err(grads[0], grads[1]) < TOL[torch.float32]
    assert grads[1][ids].abs().sum() > 0


def test_every_row_ignored_is_zero_with_zero_gradients():
    hs, ws, hts, wts, y = _case(9, 16, (16, 24), 50, torch.float32, seed=6)
    y[:] = -100
    a, b = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    loss = fused.lm_linear_kl_loss(a, b, hts, wts, y, "paper", 2.0)
    loss.backward()
    assert float(loss) == 0.0 and not a.grad.any() and not b.grad.any()


def test_262144_token_vocabulary():
    """A Gemma-sized vocabulary (262,144): the online statistics over 4,096 tiles, both teachers."""
    hs, ws, hts, wts, y = _case(3, 16, (16, 16), 262_144, torch.float32, seed=9, ignore=())
    _compare(hs, ws, hts, wts, y, "softmax", 2.0, "forward", torch.float32)


@pytest.mark.no_launch
def test_teachers_must_share_the_vocabulary():
    hs, ws, hts, wts, y = _case(4, 16, (16,), 40, torch.float32, seed=1)
    with pytest.raises(ValueError, match="vocabulary of 41 tokens and the student 40"):
        fused.lm_linear_kl_loss(hs, ws, hts, [torch.zeros(41, 16, device=DEVICE)], y)


@pytest.mark.no_launch
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("weights", ["paper", "softmax", "uniform"])
def test_torch_tiles_where_triton_cannot_run(weights, direction, monkeypatch):
    """Without the Triton kernels (a CPU without the interpreter), ``lm_linear_kl_loss`` runs the same
    algorithm in torch over vocabulary tiles (here 64 columns: 5 tiles of a 300-token vocabulary, the
    last one partial), within the same element-wise bounds."""
    monkeypatch.setattr(fused, "available", lambda device=None: False)
    monkeypatch.setattr(lm_tiled, "TILE", 64)
    calls = []
    real = lm_tiled.tiled_stats
    monkeypatch.setattr(lm_tiled, "tiled_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    hs, ws, hts, wts, y = _case(13, 40, (24, 40), 300, torch.float32, seed=11)
    _compare(hs, ws, hts, wts, y, weights, 2.0, direction, torch.float32)
    assert calls == [1]


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compiles_without_a_graph_break(backend):
    """A step that calls the fused loss compiles in one graph (``fullgraph=True``): the loss is a
    torch.library custom op; values and gradients equal the eager call's."""
    import torch._dynamo

    torch._dynamo.reset()
    hs, ws, hts, wts, y = _case(13, 24, (16, 24), 100, torch.float32, seed=12)
    ht, wt = lm_kl.stack_teachers(hts), lm_kl.stack_teachers(wts)

    def step(h, w):
        return fused.lm_linear_kl_loss(torch.tanh(h), w, ht, wt, y, "softmax", 2.0)

    got, want = [], []
    for fn, out in ((torch.compile(step, fullgraph=True, backend=backend), got), (step, want)):
        a, b = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        loss = fn(a, b)
        loss.backward()
        out += [loss.detach(), a.grad, b.grad]
    for x, z in zip(got, want):
        assert torch.allclose(x, z, rtol=1e-5, atol=1e-7)


# The fixed names: fastmt.losses.mt_token_kl_loss and fastmt.kernels.mt_linear_kl_loss, the teachers given
# as logits (the student's never formed) or as hidden states and output matrices.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,direction", [
    pytest.param("chunks", "forward", id="kernel-forward"),
    pytest.param("torch", "forward", id="torch-forward", marks=pytest.mark.no_launch),
    pytest.param("torch", "reverse", id="torch-reverse", marks=pytest.mark.no_launch)])  # the reverse has no kernel
@pytest.mark.parametrize("weighting", ["paper", "uniform", "tensor"])
def test_linear_kl_from_teacher_logits(weighting, backend, direction, dtype):
    n, d, v = 21, 24, 300
    hs, ws, hts, wts, y = _case(n, d, (16, 32), v, dtype, seed=21, ignore=(2, 7))
    tz = torch.stack([h.double() @ w.double().t() for h, w in zip(hts, wts)]).to(dtype)  # the teachers' logits
    if weighting == "tensor":
        weighting = torch.rand(2, n, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    a, b = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    loss = fused.mt_linear_kl_loss(a, b, tz, y, weighting, 2.0, direction, chunk_bytes=16 * v * 4 * 3,
                                   backend=backend)
    loss.backward()
    a64, b64 = hs.double().requires_grad_(), ws.double().requires_grad_()
    w64 = weighting.double() if isinstance(weighting, torch.Tensor) else weighting
    want = ref.mt_token_kl_loss(a64 @ b64.t(), tz.double(), y, w64, 2.0, direction)
    want.backward()
    assert a.grad.dtype == dtype and b.grad.dtype == dtype
    assert abs(float(loss) - float(want)) <= LOSS_TOL[dtype] * max(1.0, abs(float(want)))
    eye = torch.eye(v, dtype=dtype, device=DEVICE)  # teacher i's logits as "hidden states" times an identity
    terms = _logit_terms(hs, ws, list(tz.unbind(0)), [eye, eye], y, weighting, 2.0, direction)
    _within_bound(a.grad, a64.grad, terms @ ws.double().abs().cpu(), dtype, "d hidden")
    _within_bound(b.grad, b64.grad, terms.t() @ hs.double().abs().cpu(), dtype, "d weight")


def test_fixed_names_agree_with_the_lm_names():
    hs, ws, hts, wts, y = _case(9, 16, (16, 16), 50, torch.float32, seed=22)
    ht, wt = lm_kl.stack_teachers(hts), lm_kl.stack_teachers(wts)
    via_hidden = fused.mt_linear_kl_loss(hs, ws, None, y, "softmax", 2.0, teacher_hidden=ht, teacher_weight=wt)
    assert torch.equal(via_hidden, fused.lm_linear_kl_loss(hs, ws, ht, wt, y, "softmax", 2.0))
    z, tz = hs.double() @ ws.double().t(), torch.bmm(ht.double(), wt.double().transpose(1, 2))
    assert torch.equal(ref.mt_token_kl_loss(z, tz, y, "softmax", 2.0, "reverse"),
                       ref.lm_kl_loss(z, tz, y, "softmax", 2.0, -100, "reverse"))
    with pytest.raises(ValueError, match="teacher_hidden and teacher_weight"):
        fused.mt_linear_kl_loss(hs, ws, None, y)
    with pytest.raises(ValueError, match="vocabulary of 51 tokens and the student 50"):
        fused.mt_linear_kl_loss(hs, ws, torch.zeros(2, 9, 51, device=DEVICE), y)


@pytest.mark.no_launch  # no rows: nothing to launch
@pytest.mark.parametrize("backend", ["chunks", "triton"])
def test_no_rows_is_zero_with_zero_gradients(backend):
    hs, ws, hts, wts, y = _case(3, 16, (16, 24), 50, torch.float32, seed=7)
    a, b = hs[:0].clone().requires_grad_(), ws.clone().requires_grad_()
    loss = fused.lm_linear_kl_loss(a, b, [h[:0] for h in hts], wts, y[:0], "paper", 2.0, backend=backend)
    loss.backward()
    assert float(loss) == 0.0 and a.grad.shape == (0, 16) and not b.grad.any()
