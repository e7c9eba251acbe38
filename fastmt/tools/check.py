"""``fastmt check``: the fused kernels against the reference and float64, values and every gradient.

For each case the inputs are drawn in float64 and rounded to the dtype under test; the "truth" is
the reference (``fastmt.losses``) evaluated in float64 on those rounded inputs. The table shows the
norm-wise relative error (max |error| / max |truth|) of the fused kernel and, for scale, of the
reference run in the same dtype. A case passes when every fused error is under its dtype's tolerance, or no larger than 1.5x the
reference's own error in that dtype (where the dtype itself cannot hold more digits).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from fastmt import losses
from fastmt.config.settings import resolve_device
from fastmt.engine import machine
from fastmt.engine.fileio import write_json
from fastmt.errors import UsageError

TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DTYPE_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    errors: dict[str, float]  # fused vs truth, per output
    ref_errors: dict[str, float]  # reference in the same dtype vs truth
    tol: float
    seconds: float
    ok: bool = field(init=False)

    def __post_init__(self) -> None:
        # Within tolerance, or no worse than the reference itself in that dtype: some error is the
        # dtype's, not the kernel's (a converged gradient near fp16's subnormals, fp32 cancellation).
        self.ok = all(e == e and (e < self.tol or e <= 1.5 * self.ref_errors[k]) for k, e in self.errors.items())


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _fused():
    """``fastmt.kernels``, imported here rather than at the top: Triton reads ``TRITON_INTERPRET`` when the
    kernels are defined, and :func:`run_check` sets it first for a check on the CPU."""
    import fastmt.kernels as kernels

    return kernels


def _run(fn, inputs: list[torch.Tensor], upstream: float):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    loss = fn(*xs)
    grads = torch.autograd.grad(upstream * loss, xs)
    return loss, grads


def kl_case(t: int, n: int, c: int, dtype, device, seed: int = 0) -> Row:
    kernels = _fused()
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, c, generator=g, dtype=torch.float64) * 3).to(dtype).to(device)
    tl = (torch.randn(t, n, c, generator=g, dtype=torch.float64) * 3).to(dtype).to(device)
    labels = torch.randint(0, c, (n,), generator=g).to(device)
    labels[::5] = -100

    def call(mod, s_, tl_):
        return lambda x: mod.mt_kl_loss(x, tl_, "paper", temperature=2.0, labels=labels)

    t0 = time.perf_counter()
    f_loss, (f_grad,) = _run(call(kernels, s, tl), [s], 1.7)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    r_loss, (r_grad,) = _run(call(losses, s, tl), [s], 1.7)
    w_loss, (w_grad,) = _run(call(losses, s.double(), tl.double()), [s.double()], 1.7)
    return Row("mt_kl_loss", f"T={t} N={n} C={c}", DTYPE_NAME[dtype],
               {"loss": _rel(f_loss, w_loss), "d_student": _rel(f_grad, w_grad)},
               {"loss": _rel(r_loss, w_loss), "d_student": _rel(r_grad, w_grad)}, TOL[dtype], dt)


def hidden_case(t: int, k: int, n: int, s: int, ds: int, dt_: int, dtype, device, seed: int = 0,
                converged: bool = False) -> Row:
    kernels = _fused()
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(k, n, s, ds, generator=g, dtype=torch.float64)
    w = torch.randn(t, k, ds, dt_, generator=g, dtype=torch.float64) * ds**-0.5
    b = torch.randn(t, k, dt_, generator=g, dtype=torch.float64) * 0.1
    if converged:  # teacher = projection of the student + 1e-3 noise
        ht = torch.einsum("knsd,tkde->tknse", hs, w) + b[:, :, None, None, :]
        ht = ht + 1e-3 * torch.randn(ht.shape, generator=g, dtype=torch.float64)
    else:
        ht = torch.randn(t, k, n, s, dt_, generator=g, dtype=torch.float64)
    mask = (torch.rand(n, s, generator=g) > 0.25).long()
    mask[:, 0] = 1
    tw = torch.rand(t, n, generator=g, dtype=torch.float64)
    hs, ht, w, b, tw = (x.to(dtype).to(device) for x in (hs, ht, w, b, tw))
    mask = mask.to(device)

    def call(mod, ht_, tw_):
        return lambda x, ww, bb: mod.mt_hidden_loss(x, ht_, ww, bb, mask, tw_)

    t0 = time.perf_counter()
    f_loss, f_grads = _run(call(kernels, ht, tw), [hs, w, b], -0.6)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    r_loss, r_grads = _run(call(losses, ht, tw), [hs, w, b], -0.6)
    w_loss, w_grads = _run(call(losses, ht.double(), tw.double()), [hs.double(), w.double(), b.double()], -0.6)
    names = ("loss", "d_student", "d_proj_w", "d_proj_b")
    fused = dict(zip(names, [_rel(f_loss, w_loss)] + [_rel(a, e) for a, e in zip(f_grads, w_grads)]))
    ref = dict(zip(names, [_rel(r_loss, w_loss)] + [_rel(a, e) for a, e in zip(r_grads, w_grads)]))
    tol = TOL[dtype]
    label = f"T={t} K={k} N*S={n}x{s} Ds={ds} Dt={dt_}" + (" converged" if converged else "")
    return Row("mt_hidden_loss", label, DTYPE_NAME[dtype], fused, ref, tol, elapsed)


def cases(device: torch.device, quick: bool = False):
    """The sweep: odd sizes, a 2-class head, a GPT-2-sized vocabulary, and the converged regime."""
    gpu = device.type == "cuda"
    kl_shapes = [(3, 64, 2), (3, 33, 37), (2, 7, 1000), (3, 5, 50257)]
    if gpu:
        kl_shapes += [(3, 512, 30522), (4, 129, 50257)]
    hid_shapes = [(2, 2, 3, 17, 40, 70), (3, 4, 2, 13, 64, 48), (1, 3, 5, 1, 33, 17)]
    if gpu:
        hid_shapes += [(3, 4, 8, 128, 768, 768)]
    if quick:
        kl_shapes, hid_shapes = kl_shapes[:2] + [kl_shapes[3]], hid_shapes[:2]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape in kl_shapes:
            yield lambda shape=shape, dtype=dtype: kl_case(*shape, dtype, device, seed=sum(shape))
        for shape in hid_shapes:
            yield lambda shape=shape, dtype=dtype: hidden_case(*shape, dtype, device, seed=sum(shape))
        yield lambda dtype=dtype: hidden_case(2, 2, 4, 9, 48, 40, dtype, device, seed=7, converged=True)


def format_table(rows: list[Row]) -> str:
    cols = ("loss", "d_student", "d_proj_w", "d_proj_b")
    head = f"{'op':15s} {'shape':38s} {'dtype':5s} " + " ".join(f"{c:>10s}" for c in cols) + f" {'ref worst':>9s} {'tol':>7s}  ok"
    out = [head, "-" * len(head)]
    for r in rows:
        errs = " ".join(f"{r.errors[c]:10.2e}" if c in r.errors else f"{'':>10s}" for c in cols)
        out.append(f"{r.op:15s} {r.shape:38s} {r.dtype:5s} {errs} {max(r.ref_errors.values()):9.1e} {r.tol:7.0e}  {'PASS' if r.ok else 'FAIL'}")
    return "\n".join(out)


def run_check(device_name: str = "cpu", quick: bool = False, json_out: str | None = None) -> int:
    """Run the sweep, print the table; returns the number of failing cases."""
    device = resolve_device(device_name)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        if "fastmt.kernels" in sys.modules or "triton" in sys.modules:
            raise UsageError("--device cpu: set TRITON_INTERPRET=1 before Triton is imported to check the kernels on the CPU")
        os.environ["TRITON_INTERPRET"] = "1"  # Triton reads it when the kernels are defined
    kernels = _fused()
    if not kernels.available(device):
        raise UsageError("fastmt check: Triton is not importable here; pip install triton")
    rows = []
    # The interpreter's numpy warns about -inf - -inf in masked-off lanes, which are discarded.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton")

    crashed: list[str] = []

    def save(complete: bool) -> None:
        # After every case: a run stopped by a time limit (or a crash) keeps what it checked.
        if json_out:
            write_json(json_out, {"device": _device_name(device), "torch": torch.__version__, "complete": complete,
                                  "rows": [asdict(r) for r in rows], "crashed": crashed})

    for k, make in enumerate(tqdm(list(cases(device, quick)), desc="check", leave=False, file=sys.stderr)):
        try:
            rows.append(make())
        except Exception as e:  # noqa: BLE001 - one case that cannot run must not hide the others
            traceback.print_exc()
            crashed.append(f"case {k}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
            print(f"fastmt check: {crashed[-1]}", file=sys.stderr, flush=True)
        save(False)
    print(f"fused kernels vs float64 truth (norm-wise relative error), device {_device_name(device)}, "
          f"torch {torch.__version__}")
    print(format_table(rows))
    failed = sum(not r.ok for r in rows) + len(crashed)
    print(f"{len(rows) - (failed - len(crashed))}/{len(rows) + len(crashed)} cases pass"
          + (f"; {len(crashed)} could not run: " + "; ".join(crashed) if crashed else ""))
    save(True)
    return failed


def _device_name(device: torch.device) -> str:
    return machine.device_name(device) + (", Triton interpreter" if device.type != "cuda" else "")
