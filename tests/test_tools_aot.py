"""The fused kernels built ahead of time for real GPUs (sm_90, sm_80), on this CPU.

The interpreter-run tests execute the kernels' Python; they cannot see what only Triton's compiler
checks (a non-constexpr global read inside a kernel) or what only ptxas decides (register spills,
shared memory). ``fastmt.tools.aot`` compiles every specialization the launchers produce down to a
cubin, with Triton's own compiler and ptxas, and reads each one's resources. ``pytest -s`` prints the
table.
"""

from __future__ import annotations

import ast
import importlib
import itertools
import os
import re
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: there is nothing to build")

from fastmt.kernels import hidden_mse, kl  # noqa: E402

from fastmt.tools import aot

_why = aot.toolchain_problem()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"cannot build GPU kernels here: {_why}")

ARCHS = (90, 80)


@pytest.fixture(scope="module")
def ci_build():
    start = time.perf_counter()
    rows = aot.run(ARCHS, level="ci", workers=min(8, max(2, os.cpu_count() or 2)))
    return rows, time.perf_counter() - start


def test_every_specialization_builds_for_sm90_and_sm80_without_spills(ci_build):
    rows, seconds = ci_build
    print("\n" + aot.format_table(rows) + "\n" + aot.summary(rows, seconds))
    bad = [r for r in rows if not r["ok"]]
    assert not bad, (f"{len(bad)} of {len(rows)} kernel builds would fail or spill on a GPU:\n"
                     + aot.format_table(bad) + "\n\n" + "\n\n".join(r["error"] or "" for r in bad if r["error"]))
    # Every kernel the launchers use, for every target, all the way to a cubin's resource report.
    assert {(r["kernel"], r["arch"]) for r in rows} == {(k, a) for k in KERNELS for a in ARCHS}
    assert all(r["regs"] and r["smem"] is not None and r["spill_stores"] == 0 for r in rows)


CLS_KERNELS = ("mt_kl_kernel", "mt_kl_scale_kernel", "mt_kl_small_kernel",
               "hidden_fwd_kernel", "hidden_de_kernel", "hidden_dw_kernel", "hidden_dx_kernel")
LM_KERNELS = ("lm_stats_kernel", "lm_grad_kernel")
KERNELS = CLS_KERNELS + LM_KERNELS


def test_lm_kernels_have_no_atomics_and_multiply_half_precision_on_tensor_cores(ci_build):
    """The causal-LM loss's two kernels, read from the SASS of every build: no global atomic or
    reduction (each program owns its rows' statistics, each G tile has one writer, and the weight's
    gradient is a GEMM); half precision multiplies with warpgroup MMAs on sm_90 (HGMMA) and HMMA on
    sm_80; exact float32 on FMA units."""
    rows, _ = ci_build
    lm = [r for r in rows if r["kernel"] in LM_KERNELS]
    assert {r["kernel"] for r in lm} == set(LM_KERNELS)
    assert not [(r["kernel"], r["case"]) for r in lm if r["sass"]["atomics"]]
    half = [r for r in lm if "S_FP32=0" in r["constexprs"]]
    assert half and all(r["sass"]["wgmma"] + r["sass"]["mma"] > 0 for r in half)
    # The big tiles (aligned rows) on sm_90: warpgroup MMAs; the small ones take warp-level HMMA.
    big = [r for r in half if r["arch"] == 90 and "BN=64" in r["constexprs"]]
    assert big and all(r["sass"]["wgmma"] > 0 for r in big)
    assert all(r["sass"]["mma"] > 0 for r in half if r["arch"] == 80)
    exact = [r for r in lm if "S_PREC=ieee" in r["constexprs"] and "S_FP32=1" in r["constexprs"]]
    assert exact and all(r["sass"]["wgmma"] == r["sass"]["mma"] == 0 for r in exact)


def test_hidden_backward_has_no_atomics_and_half_precision_runs_on_tensor_cores(ci_build):
    """Read from the SASS of every build: no global atomic or reduction instruction anywhere in the
    hidden loss (each output tile has one writer), and on sm_90 every half-precision and TF32 hidden
    kernel multiplies with warpgroup MMAs (HGMMA), sm_80 with HMMA; exact float32 on FMA units."""
    rows, _ = ci_build
    hidden = [r for r in rows if r["kernel"].startswith("hidden")]
    assert {r["kernel"] for r in hidden} == {k for k in KERNELS if k.startswith("hidden")}
    atomic = [(r["kernel"], r["case"], r["sass"]["atomics"]) for r in hidden if r["sass"]["atomics"]]
    assert not atomic, atomic
    big = 0
    for r in hidden:
        exact = "DOT_FP32=1" in r["constexprs"] and "PRECISION=ieee" in r["constexprs"]
        counts = r["sass"]
        if exact:
            assert counts["wgmma"] == counts["mma"] == 0, (r["kernel"], r["case"])  # exact float32: FMA
        elif r["arch"] == 80:
            assert counts["mma"] > 0, (r["kernel"], r["case"])
        elif "_M=128" in r["constexprs"] or "_R=128" in r["constexprs"]:
            big += 1  # Hopper-sized tiles: warpgroup MMAs (a 32-row tile of one-position rows uses HMMA)
            assert counts["wgmma"] > 0, (r["kernel"], r["case"])
        else:
            assert counts["wgmma"] + counts["mma"] > 0, (r["kernel"], r["case"])
    assert big >= 6


def test_kl_loads_16_bytes_where_rows_allow_it(ci_build):
    """Read from the SASS: with aligned rows, and blocks that give each thread 16 bytes of the student
    row, the KL row kernel in half precision loads the student and teacher blocks 128 bits at a time,
    in training and in evaluation, and training stores its gradient so; no KL kernel has atomics.
    Unaligned specializations keep element loads (and say so: ALIGNED=0)."""
    rows, _ = ci_build
    kl_rows = [r for r in rows if r["kernel"].startswith("mt_kl")]
    assert not [r for r in kl_rows if r["sass"]["atomics"]]
    def per_thread(r):  # elements of a student block each thread holds
        rows, vec = (int(re.search(rf"{k}=(\d+)", r["constexprs"]).group(1)) for k in ("ROWS", "VEC"))
        return rows * vec // (32 * r["num_warps"])

    aligned_half = [r for r in kl_rows if "ALIGNED=1" in r["constexprs"] and "VEC=8" in r["constexprs"]
                    and per_thread(r) >= 8]
    assert {r["kernel"] for r in aligned_half} == {"mt_kl_kernel"}
    assert {"WRITE_GRAD=1" in r["constexprs"] for r in aligned_half} == {True, False}
    for r in aligned_half:
        assert r["sass"]["loads"].get("128", 0) >= 2, (r["kernel"], r["case"], r["sass"])
        if "WRITE_GRAD=1" in r["constexprs"]:
            assert r["sass"]["stores"].get("128", 0) >= 1, (r["case"], r["sass"])
    for r in kl_rows:
        if "ALIGNED=0" in r["constexprs"]:
            assert "128" not in r["sass"]["loads"], (r["kernel"], r["case"], r["sass"])


def test_sass_counts_read_widths_and_atomics():
    sass = """
        /*0080*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0090*/              @!P0 LDG.E.U16 R9, desc[UR4][R6.64] ;
        /*00a0*/                   LDG.E.EL.64 R10, desc[UR4][R6.64] ;
        /*00b0*/                   LDG.E R12, desc[UR4][R6.64] ;
        /*00c0*/               @P1 RED.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R5 ;
        /*00d0*/                   ATOMG.E.ADD.F32.FTZ.RN.STRONG.GPU PT, R3, desc[UR4][R2.64], R5 ;
        /*00e0*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*00f0*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0100*/                   ATOMS.ADD R1, [R2], R3 ;
    """
    c = aot.sass_counts(sass)
    assert c["loads"] == {"128": 1, "16": 1, "64": 1, "32": 1} and c["stores"] == {"128": 1}
    assert c["atomics"] == 2 and c["wgmma"] == 1 and c["mma"] == 0  # ATOMS is shared memory


def test_ci_set_holds_every_pair_of_axis_values():
    chosen = aot.cases("ci")
    for op, axes in (("kl", aot.KL_AXES), ("hidden", aot.HIDDEN_AXES), ("lm", aot.LM_AXES)):
        got = [c.p for c in chosen if c.op == op]
        for a, b in itertools.combinations(axes, 2):
            for va, vb in itertools.product(axes[a], axes[b]):
                assert any(r[a] == va and r[b] == vb for r in got), (op, a, va, b, vb)


def _old_neg_module(tmp_path: Path) -> str:
    """The KL kernel as it is now, with ``_NEG`` turned back into a plain float global; the module
    holds only the imports, constants and the kernel (the rest registers torch ops)."""
    src = Path(kl.__file__).read_text()
    m = re.search(r"^_NEG = tl\.constexpr\((.+)\)$", src, re.M)
    if m is None:
        pytest.skip("kernels/kl.py no longer defines _NEG as a tl.constexpr")
    src = src.replace(m.group(0), f"_NEG = {m.group(1)}")
    end = next(node.end_lineno for node in ast.parse(src).body
               if isinstance(node, ast.FunctionDef) and node.name == "_mt_kl_kernel")
    (tmp_path / "kl_old_neg.py").write_text("\n".join(src.splitlines()[:end]) + "\n")
    return "kl_old_neg"


def _meta(shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def test_a_non_constexpr_global_is_a_build_failure(tmp_path, monkeypatch):
    """The same checker reports the old ``_NEG = -1.0e30`` (and any kernel written that way) as a
    failed build, with Triton's NameError: the failure the first H100 run hit."""
    import aot_old_global

    monkeypatch.syspath_prepend(str(tmp_path))  # the build workers get this process's sys.path
    old_kl = importlib.import_module(_old_neg_module(tmp_path))
    s, t = _meta((32, 30522), torch.float16), _meta((2, 32, 30522), torch.float16)
    launch, _, _ = kl.kl_launch(s, t, None, "paper", 2.0, _meta((32,), torch.int64), -100)
    toy = kl.Launch(aot_old_global.old_global_kernel, (1,), (_meta((64,)), 40), {"BLOCK": 64}, 4)
    specs = [aot.specialize(launch._replace(kernel=old_kl._mt_kl_kernel), 90, "kl with the old _NEG"),
             aot.specialize(toy, 80, "plain float global")]
    rows = aot.build(specs, workers=2)
    print("\n" + aot.format_table(rows))
    for row, name in zip(rows, ("_NEG", "_FLOOR")):
        assert not row["ok"] and row["problems"][0].startswith("build failed")
        assert "NameError" in row["error"] and f"Cannot access global variable {name}" in row["error"], row["error"]
    if os.environ.get("TRITON_INTERPRET") == "1":
        # ... while the interpreter, which every other kernel test uses, runs it without a word.
        x = torch.arange(8, dtype=torch.float32) - 4
        aot_old_global.old_global_kernel[(1,)](x, 8, BLOCK=64)
        assert torch.equal(x, torch.arange(8, dtype=torch.float32) - 4)


class _NoGpuDriver:
    """The driver calls ``JITFunction.run`` makes before compiling, answered as an sm_90 GPU would."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, aot.WARP_SIZE)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _jit(kernel):
    from triton.runtime.jit import JITFunction

    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)


def _real_and_meta(shapes_dtypes, seed=0):
    g = torch.Generator().manual_seed(seed)
    real = [None if sd is None else torch.randn(sd[0], generator=g).to(sd[1]) if sd[1].is_floating_point
            else torch.randint(0, 2, sd[0], generator=g).to(sd[1]) for sd in shapes_dtypes]
    return real, [None if x is None else torch.empty_like(x, device="meta") for x in real]


KL_REAL = [  # (T, N, C, dtype, weights: "tensor" / scheme / None, labels)
    (1, 32, 37, torch.float32, "tensor", False),  # T == 1 becomes a constant; N*C and N divisible by 16
    (3, 7, 1000, torch.float16, "softmax", True),
    (2, 5, 64, torch.float32, None, True),  # C divisible by 16
    (4, 3, 4097, torch.float64, "paper", True),
]
HIDDEN_REAL = [  # (T, K, N, S, Ds, Dt, dtype, mask dtype, tw)
    (2, 2, 3, 5, 12, 20, torch.float32, torch.int64, True),
    (1, 1, 2, 3, 16, 16, torch.float16, torch.bool, False),  # K == 1, Ds/Dt divisible by 16
    (2, 3, 1, 1, 33, 17, torch.float32, None, True),  # one row: N == S == R == 1
    (2, 2, 4, 16, 32, 48, torch.float16, None, False),
]


def test_specialization_is_what_a_real_launch_compiles(monkeypatch):
    """Real tensors through the real launchers into ``JITFunction.run`` itself (a stand-in driver, and
    Triton's pre-compile hook to stop before compiling) give the signature, constexprs, attributes
    and options that ``aot.specialize`` derives from meta tensors of the same shapes."""
    from triton import knobs
    from triton.runtime.driver import driver

    seen = []

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        seen.append(compile)
        return True  # handled: JITFunction.run returns before compiling or launching

    for mod, name in (((kl if k.startswith("mt_kl") else hidden_mse), f"_{k}") for k in CLS_KERNELS):
        monkeypatch.setattr(mod, name, _jit(getattr(mod, name)))
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", hook)
    saved = driver._active
    driver.set_active(_NoGpuDriver(90))
    try:
        pairs = []
        for t, n, c, dtype, weights, with_labels in KL_REAL:
            real, meta = _real_and_meta([((n, c), dtype), ((t, n, c), dtype),
                                         ((t, n), dtype) if weights == "tensor" else None,
                                         ((n,), torch.int64) if with_labels else None])
            scheme = weights if isinstance(weights, str) and weights != "tensor" else None
            for with_grad in (False, True):
                _, grad = kl.kl_forward(real[0], real[1], real[2], scheme, 2.0, real[3], -100, with_grad=with_grad)
                launch, _, meta_grad = kl.kl_launch(meta[0], meta[1], meta[2], scheme, 2.0, meta[3], -100,
                                                    with_grad=with_grad)
                pairs.append((f"kl T={t} N={n} C={c} {dtype} grad={with_grad}", launch))
            kl.kl_scale_(grad, torch.full((), 2.0), torch.ones(()))
            launch = kl.kl_scale_launch(meta_grad, _meta(()), _meta(()))
            pairs.append((f"kl-scale T={t} N={n} C={c} {dtype}", launch))
        for t, k, n, s, ds, dt, dtype, mdt, with_tw in HIDDEN_REAL:
            real, meta = _real_and_meta([((k, n, s, ds), dtype), ((t, k, n, s, dt), dtype), ((t, k, ds, dt), dtype),
                                         ((t, k, dt), dtype), ((n, s), mdt) if mdt else None,
                                         ((t, n), dtype) if with_tw else None, ((), torch.float32)])
            hidden_mse.hidden_forward(*real[:6])
            pairs.append((f"hidden-fwd {t, k, n, s, ds, dt} {dtype}", hidden_mse.hidden_fwd_launch(*meta[:6])[0]))
            hidden_mse.hidden_backward(real[6], *real[:6])
            pairs += [(f"hidden-bwd {t, k, n, s, ds, dt} {dtype}", launch)
                      for launch in hidden_mse.hidden_bwd_launch(meta[6], *meta[:6])[0]]
    finally:
        driver._active = saved
    assert len(seen) == len(pairs)
    for got, (label, launch) in zip(seen, pairs):
        spec = aot.specialize(launch, 90, label)
        assert got["signature"] == spec.signature, label
        assert got["constants"] == spec.constexprs, label
        assert got["configs"] == [spec.attrs], label
        for opt in ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion"):
            assert got[opt] == spec.options[opt], (label, opt)
    # What that means for one launch, spelled out: T == 1 is compiled in as a constant, every pointer
    # (a fresh allocation) is 16-byte aligned, and of the ints only N (32) and N*C (1184) divide by 16.
    first = aot.specialize(pairs[0][1], 90)
    assert first.shown["ints"] == "T=1 %16:N,stride_ti,stride_wi"
    assert all(spec == [["tt.divisibility", 16]] for k, spec in first.attrs.items()
               if first.signature[list(first.signature)[k[0]]].startswith("*"))


def test_misaligned_input_is_a_different_specialization():
    """Meta tensors keep a view's offset, so an input that starts off a 16-byte boundary specializes
    (and would compile) differently; the ahead-of-time set covers fresh, aligned allocations."""
    s = torch.empty(8 * 37 + 1, device="meta")[1:].view(8, 37)
    launch, _, _ = kl.kl_launch(s, _meta((2, 8, 37)), None, None, 1.0, None, -100)
    assert "unaligned:s_ptr" in aot.specialize(launch, 90).shown["ints"]


def test_nothing_in_the_project_allows_non_constexpr_globals():
    """Kernels must build as they are: the escape hatch may be named only where the build strips it."""
    root = Path(__file__).resolve().parents[1]
    allowed = {root / "fastmt" / "tools" / "aot.py", Path(__file__).resolve()}
    name = "TRITON_ALLOW_NON_CONSTEXPR" + "_GLOBALS"
    hits = []
    for sub in ("fastmt", "kernels", "tests", "benches", ".ci"):
        for path in sorted((root / sub).rglob("*")):
            if path.is_file() and path.resolve() not in allowed and path.suffix not in (".pyc", ".png", ".jsonl"):
                if name in path.read_text(errors="ignore"):
                    hits.append(str(path.relative_to(root)))
    for path in root.glob("*"):
        if path.is_file() and name in path.read_text(errors="ignore"):
            hits.append(path.name)
    assert not hits, f"{name} appears in {hits}"


_ITEM = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}


def test_kl_issues_few_enough_instructions_per_column_to_stream_at_the_bandwidth_budget():
    """Counted in the sm_90 SASS of the KL row kernel at 3 teachers over a 30522-word vocabulary (the
    softmax weights: the most work per column), at temperature 1 and 2, in training and evaluation,
    with the teachers' statistics computed or given (a teacher cache): the whole-block loops issue
    at most the warp instructions per column that an H100 can issue in the time 55% of its copy
    bandwidth moves that column's bytes (``aot.kl_budget``). Above it the kernel would be bound by
    instruction issue, not by HBM."""
    specs, what = [], []
    for name, tau, grad, given in itertools.product(("bf16", "fp16"), (1.0, 2.0), (True, False), (False, True)):
        dt = getattr(torch, aot._DTYPES[name])
        s, t, y = _meta((32, 30522), dt), _meta((3, 32, 30522), dt), _meta((32,), torch.int64)
        lse = _meta((2, 3, 32)) if given else None
        launch, _, g = kl.kl_launch(s, t, None, "softmax", tau, y, -100, teacher_lse=lse, with_grad=grad)
        label = f"{name} tau={tau:g} {'training' if grad else 'evaluation'}{' teacher_lse' if given else ''}"
        specs.append(aot.specialize(launch, 90, label))
        # Bytes per column: the student and 3 teachers read once, the gradient written once (float16's in float32).
        what.append((label, dt.itemsize * 4 + (g.element_size() if grad else 0)))
    rows = aot.build(specs, workers=2)
    bad = [r for r in rows if not r["ok"]]
    assert not bad, aot.format_table(bad)
    lines, over = [], []
    for r, (label, bytes_col) in zip(rows, what):
        per_col, budget = aot.kl_per_column(r), aot.kl_budget(bytes_col)
        issue_ms, copy_ms = aot.kl_floors_ms(per_col, bytes_col, 8192, 30522)
        lines.append(f"{label:34} {per_col:5.2f} warp instructions per column, budget {budget:5.2f}; "
                     f"N=8192: issue floor {issue_ms:.2f} ms, copy floor {copy_ms:.2f} ms")
        if per_col > budget:
            over.append(lines[-1])
    print("\n" + "\n".join(lines))
    assert len(rows) == 16 and not over, "\n".join(over)
