"""Ahead-of-time GPU build of the kernel specializations the launchers produce, on a CPU.

Triton's CPU interpreter runs a kernel's Python, not Triton's compiler, so a kernel that the
compiler rejects (a non-constexpr module global, say) or one that spills registers on a real GPU
passes every interpreted test. This module builds what a GPU run would build, with no GPU and no
CUDA driver:

1. Cases: inputs as meta tensors (shapes, dtypes, strides, no data) over the dtypes, weighting
   schemes, optional tensors and shapes the project launches (``KL_AXES``, ``HIDDEN_AXES``).
2. Launches: every case goes through the launchers' own ``kl_launch`` / ``kl_scale_launch`` /
   ``hidden_fwd_launch`` / ``hidden_bwd_launch``, which return the kernels' exact arguments,
   constexprs, warps and compile options: the launches that run on a GPU are the ones built here.
3. Specializations: Triton's own binder (``triton.runtime.jit``) turns those arguments into the
   signature, constexprs and attributes (16-byte divisibility of pointers and ints, ints equal to 1
   made constants) that ``JITFunction.run`` would compile, per target; equal ones are built once.
4. Build: ``triton.compile`` down to a cubin for sm_90 and sm_80, in worker processes that import
   Triton without ``TRITON_INTERPRET`` (once set, Triton's own standard library is interpreted and
   cannot be compiled) and without ``TRITON_ALLOW_NON_CONSTEXPR_GLOBALS`` (the build must pass
   without it). Each run uses a fresh temporary Triton cache unless ``cache_dir`` is given, so every
   row is a real build and carries ptxas's own log.
5. Resources: registers, stack frame and local memory from ``cuobjdump --dump-resource-usage`` on the
   cubin, spill stores/loads from ptxas's ``-v`` log, shared memory as Triton's allocation (what the
   launch requests) plus the cubin's static shared memory (1 KiB on sm_90, none on sm_80; counted,
   so the check errs on the safe side). A row fails on a build error, any spill,
   stack frame or local memory, or shared memory over the target's per-block opt-in limit.

Two sets of cases: ``full`` is the product of every axis (4704 cases, 3392 distinct specializations
per target: over an hour for both targets on two cores); ``ci`` holds every pair of values of any two
axes plus, for every dtype, the largest tiles with the most inputs (125 cases, 212 specializations per
target: about 5 minutes on two cores), and is what ``tests/test_tools_aot.py`` builds. A case is every
launch the launchers make for it: the KL in training (loss and gradient in one pass; row or one-program
kernels) and its backward's in-place scaling, the KL in evaluation, the hidden
forward, or the hidden backward's three kernels.

Besides resources, each row carries instruction counts read from the cubin's SASS (``sass_counts``):
global atomics, global loads and stores by width, tensor-core instructions, and the innermost loops'
lengths; the tests use them to hold properties a GPU would otherwise be needed to see (no atomics in
the hidden loss, 128-bit KL loads, HGMMA in half precision, the KL's instructions per column).

    python -m fastmt.tools.aot [--arch 90,80] [--set ci|full] [--workers N] [--json F]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import importlib
import io
import itertools
import json
import os
import pickle
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

try:  # Triton is optional: without it this module still loads, and toolchain_problem says why nothing builds
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

    from fastmt.kernels import hidden_mse, kl, lm_kl

    _NO_TRITON: str | None = None
except ImportError as e:
    _NO_TRITON = str(e)

# Per-block shared memory a kernel may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {90: 232448, 80: 166912}
WARP_SIZE = 32

KL_AXES: dict[str, list] = {
    "dtype": ["fp32", "fp16", "bf16", "fp64"],
    # A weight tensor or none, each with and without labels; the schemes always come with labels.
    "weights": ["tensor", "tensor+labels", "none", "none+labels", "paper", "softmax", "uniform"],
    "T": [1, 2, 3, 4, 8],
    "C": [2, 37, 1000, 30522, 50257],
    # 32: a full batch (strides divisible by 16); 7: a ragged last batch; 1: one example.
    "N": [32, 7, 1],
    "tau": [1.0, 2.0],  # temperature 1 is its own specialization (TAU_ONE)
}

HIDDEN_SHAPES: dict[str, tuple[int, int, int, int, int, int]] = {  # (T, K, N, S, Ds, Dt)
    "384>768": (2, 4, 32, 128, 384, 768),
    "768>768": (2, 4, 32, 128, 768, 768),
    "cls 384>768": (3, 6, 32, 1, 384, 768),  # hidden_loss=cls: one position per example
    "40>70": (3, 2, 4, 17, 40, 70),
    "12>20": (2, 2, 3, 5, 12, 20),
    "33>17 1 row": (2, 3, 1, 1, 33, 17),
    "16>16 K=1": (1, 1, 2, 3, 16, 16),
}

LM_SHAPES: dict[str, tuple[int, int, int, int]] = {  # (N tokens, D, Dt, V) of the causal-LM loss
    "2048x512>512 V=32000": (2048, 512, 512, 32000),
    "13x40>24 V=300": (13, 40, 24, 300),
}

LM_AXES: dict[str, list] = {
    "dtype": ["fp32", "fp16", "bf16"],
    "direction": ["forward", "reverse"],
    # paper: the untempered normaliser is folded too (NEED_U, at temperatures other than 1)
    "weights": ["paper", "uniform"],
    "T": [1, 2, 4],
    "tau": [1.0, 2.0],
    "shape": list(LM_SHAPES),
}

HIDDEN_AXES: dict[str, list] = {
    # fpXX: every tensor in that dtype (tests, ``fastmt check``); -amp: training under autocast, where
    # activations are half precision and the projection and teacher weights stay float32; fp32-tf32:
    # float32 where torch allows TF32 (the GPU plan for float32; without TF32 cuBLAS serves, the
    # exact-float32 kernels are built as the interpreter's plan).
    "dtype": ["fp32", "fp16", "bf16", "fp64", "fp16-amp", "bf16-amp", "fp32-tf32"],
    "mask": ["none", "int64", "bool"],
    "tw": [False, True],
    "shape": list(HIDDEN_SHAPES),
    "direction": ["bwd", "fwd"],  # backward first: the greedy cover's ties go to the heavier kernel
}


# ---------------------------------------------------------------------------------------------------
# Cases and their launches


@dataclass(frozen=True)
class Case:
    op: str  # "kl" or "hidden"
    params: tuple[tuple[str, Any], ...]

    @property
    def p(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def label(self) -> str:
        p = self.p
        if self.op == "kl":
            return f"kl {p['dtype']} {p['weights']} T={p['T']} C={p['C']} N={p['N']}"
        if self.op == "lm":
            return f"lm {p['dtype']} {p['direction']} {p['weights']} T={p['T']} tau={p['tau']} {p['shape']}"
        extras = [f"mask={p['mask']}"] if p["mask"] != "none" else []
        extras += ["tw"] if p["tw"] else []
        return " ".join([f"hidden-{p['direction']}", p["dtype"], p["shape"], *extras])


def _pairwise(axes: dict[str, list]) -> list[dict[str, Any]]:
    """A small set of axis combinations holding every pair of values of any two axes (greedy)."""
    names = list(axes)
    rows = [dict(zip(names, values)) for values in itertools.product(*axes.values())]
    pairs = [{(a, r[a], b, r[b]) for a, b in itertools.combinations(names, 2)} for r in rows]
    todo = set().union(*pairs)
    chosen = []
    while todo:
        best = max(range(len(rows)), key=lambda i: len(pairs[i] & todo))  # first best: deterministic
        chosen.append(rows[best])
        todo -= pairs[best]
    return chosen


def _product(axes: dict[str, list]) -> list[dict[str, Any]]:
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def cases(level: str = "ci") -> list[Case]:
    """The cases to build: ``full`` (every combination) or ``ci`` (pairwise plus the largest tiles)."""
    if level == "full":
        kl_rows, hid_rows, lm_rows = _product(KL_AXES), _product(HIDDEN_AXES), _product(LM_AXES)
    elif level == "ci":
        kl_rows, hid_rows, lm_rows = _pairwise(KL_AXES), _pairwise(HIDDEN_AXES), _pairwise(LM_AXES)
        # The most state per thread: four teachers, the untempered normaliser, every dtype and direction.
        for dtype in LM_AXES["dtype"]:
            for direction in LM_AXES["direction"]:
                lm_rows.append(dict(dtype=dtype, direction=direction, weights="paper", T=4, tau=2.0,
                                    shape="2048x512>512 V=32000"))
        # Registers grow with the tile and the dtype: every dtype at the largest tiles, with the most
        # inputs, whatever pairs the greedy cover happened to pick.
        for dtype in KL_AXES["dtype"]:
            for weights, tau in (("tensor+labels", 2.0), ("softmax", 1.0), ("softmax", 2.0)):
                for t, c in ((2, 30522), (4, 50257)):
                    kl_rows.append(dict(dtype=dtype, weights=weights, T=t, C=c, N=32, tau=tau))
        for dtype in HIDDEN_AXES["dtype"]:
            for direction in HIDDEN_AXES["direction"]:
                for shape in ("384>768", "40>70"):
                    hid_rows.append(dict(dtype=dtype, mask="int64", tw=True, shape=shape, direction=direction))
    else:
        raise ValueError(f"unknown set {level!r}: ci or full")
    out: list[Case] = []
    for op, rows in (("kl", kl_rows), ("hidden", hid_rows), ("lm", lm_rows)):
        for r in rows:
            case = Case(op, tuple(r.items()))
            if case not in out:
                out.append(case)
    return out


_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}


def launches_of(case: Case) -> list:
    """The launcher's own Launches for this case's inputs, in launch order, built from meta tensors."""
    p = case.p

    def meta(shape, dtype):
        return torch.empty(shape, dtype=dtype, device="meta")

    if case.op == "lm":
        dt = getattr(torch, _DTYPES[p["dtype"]])
        n, d, d_t, v = LM_SHAPES[p["shape"]]
        t, tau, reverse = p["T"], p["tau"], p["direction"] == "reverse"
        hs, ws, ht, wt = meta((n, d), dt), meta((v, d), dt), meta((t, n, d_t), dt), meta((t, v, d_t), dt)
        # As fastmt.kernels.lm_linear_kl_loss runs them: the statistics, then one chunk's gradient block.
        stats_run, stats = lm_kl.stats_launch(hs, ws, ht, wt, tau, reverse, p["weights"] == "paper")
        g_dtype = dt if dt in (torch.float16, torch.bfloat16) else torch.float32
        rows = lm_kl.chunk_rows(n, v, torch.empty((), dtype=g_dtype).element_size())
        g = meta((rows, v), g_dtype)
        grad_run = lm_kl.grad_launch(hs, ws, ht, wt, stats, meta((t, n), torch.float32), g, 0, rows, tau, reverse)
        return [stats_run, grad_run]

    if case.op == "kl":
        dt = getattr(torch, _DTYPES[p["dtype"]])
        t, n, c = p["T"], p["N"], p["C"]
        w = p["weights"]
        scheme = w if w in ("paper", "softmax", "uniform") else None
        weights = meta((t, n), dt) if w.startswith("tensor") else None
        labels = meta((n,), torch.int64) if scheme or w.endswith("+labels") else None
        # As fastmt.kernels.mt_kl_loss calls it (default ignore_index; the temperature's value is not
        # specialized, only whether it is 1).
        s, tl_ = meta((n, c), dt), meta((t, n, c), dt)
        # Training (the gradient made in the same pass, then scaled in place by backward) and evaluation.
        train, _, grad = kl.kl_launch(s, tl_, weights, scheme, p["tau"], labels, -100, with_grad=True)
        # Backward scales that gradient in place; float16's (kept in float32) is cast by torch instead.
        scale = kl.kl_scale_launch(grad, meta((), torch.float32), meta((), torch.float32)) if grad.dtype == dt else None
        evaluate, _, _ = kl.kl_launch(s, tl_, weights, scheme, p["tau"], labels, -100)
        return [x for x in (train, scale, evaluate) if x is not None]
    t, k, n, s, ds, dt_ = HIDDEN_SHAPES[p["shape"]]
    name = p["dtype"]
    act = getattr(torch, _DTYPES[name.split("-")[0]])
    par = torch.float32 if name.endswith("-amp") else act
    hs, ht = meta((k, n, s, ds), act), meta((t, k, n, s, dt_), act)
    w, b = meta((t, k, ds, dt_), par), meta((t, k, dt_), par)
    mask = None if p["mask"] == "none" else meta((n, s), getattr(torch, p["mask"]))
    tw = meta((t, n), par) if p["tw"] else None
    tf32 = name.endswith("-tf32")
    if p["direction"] == "fwd":
        launch, _ = hidden_mse.hidden_fwd_launch(hs, ht, w, b, mask, tw, tf32=tf32)
        return [launch] if launch is not None else []
    launches, *_ = hidden_mse.hidden_bwd_launch(meta((), torch.float32), hs, ht, w, b, mask, tw, tf32=tf32)
    return launches


# ---------------------------------------------------------------------------------------------------
# Specialization: Triton's JIT binder on the launch's arguments


@dataclass
class Spec:
    """One compilation: what ``JITFunction.run`` would pass to ``triton.compile`` for one target."""

    kernel: str  # "module:qualname", imported by the build worker
    arch: int
    signature: dict[str, str]
    constexprs: dict[tuple, Any]
    attrs: dict[tuple, Any]
    options: dict[str, Any]
    num_warps: int
    key: str  # the JIT's own in-memory cache key
    shown: dict[str, str] = field(default_factory=dict)  # readable constexprs and specialized ints
    cases: list[str] = field(default_factory=list)


def _python_fn(kernel):
    fn = getattr(kernel, "fn", None)
    if fn is None:
        raise TypeError(f"{kernel!r} is not a @triton.jit function")
    return fn


def kernel_ref(kernel) -> str:
    fn = _python_fn(kernel)
    return f"{fn.__module__}:{fn.__qualname__}"


_jits: dict[int, Any] = {}
_binders: dict[tuple[int, int], Any] = {}


def _jit_of(kernel):
    """A JITFunction for ``kernel``: itself, or under TRITON_INTERPRET (where @triton.jit returns an
    InterpretedFunction) one made from the same Python function and decorator arguments. Only its
    parameter list is used here; compiling happens in the workers."""
    if isinstance(kernel, JITFunction):
        return kernel
    if id(kernel) not in _jits:
        _jits[id(kernel)] = (kernel, JITFunction(_python_fn(kernel), **getattr(kernel, "kwargs", {})))
    return _jits[id(kernel)][1]


@functools.lru_cache(maxsize=None)
def _backend(arch: int):
    target = GPUTarget("cuda", arch, WARP_SIZE)
    return target, make_backend(target)


def specialize(launch, arch: int, label: str = "") -> Spec:
    """The compilation ``launch`` would trigger on an sm_``arch`` GPU, as ``JITFunction.run`` derives it."""
    if not hasattr(JITFunction, "_pack_args"):
        raise RuntimeError("fastmt.tools.aot follows Triton 3.6's JITFunction.run; this Triton has no _pack_args")
    jit = _jit_of(launch.kernel)
    _, backend = _backend(arch)
    bkey = (id(jit), arch)
    if bkey not in _binders:  # holds jit too, so its id is never reused while the binder is cached
        _binders[bkey] = (jit, create_function_from_signature(jit.signature, jit.params, backend))
    kwargs = dict(launch.constexprs, num_warps=launch.num_warps, **(launch.options or {}))
    # JITFunction.run adds these two before binding; they are part of the options and the key.
    kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound_args, specialization, options = _binders[bkey][1](*launch.args, **kwargs)
    key = compute_cache_key({}, specialization, options)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound_args, specialization, options)

    names = [p.name for p in jit.params]
    declared = {p.name for p in jit.params if p.is_constexpr}
    consts = " ".join(f"{names[k[0]]}={_short(v)}" for k, v in constexprs.items() if names[k[0]] in declared)
    ones = [f"{names[k[0]]}={v}" for k, v in constexprs.items() if names[k[0]] not in declared]
    ints = [names[k[0]] for k, v in attrs.items()
            if v and not signature[names[k[0]]].startswith("*")]
    ptrs_unaligned = [names[k[0]] for k, v in attrs.items() if not v and signature[names[k[0]]].startswith("*")]
    shown_ints = " ".join(filter(None, [
        " ".join(ones),
        ("%16:" + ",".join(ints)) if ints else "",
        ("unaligned:" + ",".join(ptrs_unaligned)) if ptrs_unaligned else "",
    ]))
    ptr_types = sorted({v[1:] for v in signature.values() if v.startswith("*")})
    return Spec(kernel_ref(launch.kernel), arch, signature, constexprs, attrs, dict(options.__dict__),
                launch.num_warps, key, {"constexprs": consts, "ints": shown_ints, "pointers": "/".join(ptr_types)},
                [label] if label else [])


def _short(v) -> str:
    return str(int(v)) if isinstance(v, bool) else str(v)


def plan(case_list: list[Case], archs=(90, 80)) -> list[Spec]:
    """One Spec per distinct compilation, each listing the cases that launch it."""
    specs: dict[tuple, Spec] = {}
    for case in case_list:
        for launch, arch in itertools.product(launches_of(case), archs):
            spec = specialize(launch, arch, case.label)
            k = (spec.kernel, arch, spec.key)
            if k in specs:
                if case.label not in specs[k].cases:  # (a chunked launch repeats its kernel)
                    specs[k].cases.append(case.label)
            else:
                specs[k] = spec
    return list(specs.values())


# ---------------------------------------------------------------------------------------------------
# Build workers


def _encode(obj) -> str:
    return base64.b64encode(pickle.dumps(obj)).decode("ascii") + "\n"


def _decode(line: str):
    return pickle.loads(base64.b64decode(line))


_USAGE = re.compile(r"([A-Z_]+(?:\[\d+\])?):(\d+)")
_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def _cubin_usage(cuobjdump: str, cubin: bytes, name: str, tmp: str) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", dir=tmp, delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(f.name)
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == f"Function {name}:" and i + 1 < len(lines):
            return {k: int(v) for k, v in _USAGE.findall(lines[i + 1])}
    raise RuntimeError(f"cuobjdump shows no resource usage for {name}:\n{out}")


_SASS_OP = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", re.M)


def _width(op: str) -> int:
    """Bits moved by one global load/store opcode (``LDG.E.128`` 128, ``LDG.E.U16`` 16, ``LDG.E`` 32)."""
    for part in op.split(".")[1:]:
        if part in ("128", "64"):
            return int(part)
        if part in ("U16", "S16"):
            return 16
        if part in ("U8", "S8"):
            return 8
    return 32


def sass_counts(sass: str) -> dict[str, Any]:
    """Instruction counts read from a kernel's SASS: global atomics and reductions (``ATOMG``, ``ATOM``,
    ``RED``), global loads and stores by width in bits, tensor-core instructions (``HGMMA``, ``HMMA``)."""
    ops = _SASS_OP.findall(sass)
    loads: dict[str, int] = {}
    stores: dict[str, int] = {}
    for op in ops:
        if op.startswith("LDG"):
            loads[str(_width(op))] = loads.get(str(_width(op)), 0) + 1
        elif op.startswith("STG"):
            stores[str(_width(op))] = stores.get(str(_width(op)), 0) + 1
    atomics = sum(1 for op in ops if op.split(".")[0] in ("ATOMG", "ATOM", "RED", "REDG"))
    # Tensor-core products: warpgroup MMAs (sm_90's wgmma) and warp-level MMAs.
    wgmma = sum(1 for op in ops if op.split(".")[0] == "HGMMA")
    mma = sum(1 for op in ops if op.split(".")[0] == "HMMA")
    return {"atomics": atomics, "loads": loads, "stores": stores, "wgmma": wgmma, "mma": mma, "instructions": len(ops),
            "loops": sass_loops(sass)}


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", re.M)


def sass_loops(sass: str) -> list[dict[str, Any]]:
    """The innermost loops of a kernel's SASS, in code order: a loop is a branch back to an earlier
    address, innermost when no other such range lies inside it. Each: its instruction count (the work
    one trip issues per warp) and its global loads by width in bits."""
    ins = [(int(a, 16), op, rest) for a, op, rest in _SASS_LINE.findall(sass)]
    back = []
    for addr, op, rest in ins:
        m = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if m and int(m.group(1), 16) < addr:
            back.append((int(m.group(1), 16), addr))
    loops = []
    for a, b in sorted(back):
        if any(a <= c and d <= b and (c, d) != (a, b) for c, d in back):
            continue
        body = [op for x, op, _ in ins if a <= x <= b]
        loads: dict[str, int] = {}
        for op in body:
            if op.startswith("LDG"):
                loads[str(_width(op))] = loads.get(str(_width(op)), 0) + 1
        loops.append({"instructions": len(body), "loads": loads})
    return loops


# ---------------------------------------------------------------------------------------------------
# The KL's instruction budget: what the row kernel may issue per column and still stream at the rate
# HBM feeds it (``tests/test_tools_aot.py`` holds it for sm_90).

# An H100 SXM: 132 SMs, 4 schedulers each issuing at most one warp instruction a clock; 1.755 GHz (the
# boost clock is 1.98 GHz; bandwidth-bound kernels commonly run lower); 2.9 TB/s measured by a
# device-to-device copy (about 87% of the 3.35 TB/s peak).
H100 = {"sms": 132, "schedulers": 4, "clock_hz": 1.755e9, "copy_bytes_s": 2.9e12}
# The share of copy bandwidth the KL must be able to sustain before instruction issue limits it.
KL_BANDWIDTH_SHARE = 0.55


def _constexpr(row: dict[str, Any], name: str) -> int:
    m = re.search(rf"\b{name}=(\d+)", row["constexprs"])
    if m is None:
        raise ValueError(f"{row['kernel']} has no constexpr {name}")
    return int(m.group(1))


def kl_per_column(row: dict[str, Any]) -> float:
    """Warp instructions the KL row kernel issues per column of a row, in its steady state: the
    innermost loops over whole aligned blocks (the ones with 128-bit loads), in code order the
    student's sweep, one teacher's (run T times) and, in training, the gradient's; each trip covers
    ``ROWS x VEC`` columns with ``num_warps`` warps."""
    if row["kernel"] != "mt_kl_kernel" or "ALIGNED=1" not in row["constexprs"]:
        raise ValueError("only an aligned build of the KL row kernel has whole-block loops")
    main = [lp["instructions"] for lp in row["sass"]["loops"] if "128" in lp["loads"]]
    grad = _constexpr(row, "WRITE_GRAD")
    if len(main) != 2 + grad:
        raise ValueError(f"expected {2 + grad} whole-block loops in {row['kernel']}, found {len(main)}")
    per_block = main[0] + _constexpr(row, "T") * main[1] + (main[2] if grad else 0)
    return per_block * row["num_warps"] / (_constexpr(row, "ROWS") * _constexpr(row, "VEC"))


def kl_budget(bytes_per_column: float, gpu: dict[str, float] = H100, share: float = KL_BANDWIDTH_SHARE) -> float:
    """Warp instructions per column that issue in the time ``share`` of ``gpu``'s copy bandwidth moves
    the column's bytes: above it, instruction issue, not HBM, sets the kernel's speed."""
    issue_rate = gpu["sms"] * gpu["schedulers"] * gpu["clock_hz"]
    return issue_rate * bytes_per_column / (share * gpu["copy_bytes_s"])


def kl_floors_ms(per_column: float, bytes_per_column: float, rows: int, cols: int,
                 gpu: dict[str, float] = H100) -> tuple[float, float]:
    """(issue floor, copy-bandwidth floor) in milliseconds for ``rows x cols`` logits."""
    issue = per_column * rows * cols / (gpu["sms"] * gpu["schedulers"] * gpu["clock_hz"])
    return 1e3 * issue, 1e3 * bytes_per_column * rows * cols / gpu["copy_bytes_s"]


def _sass(cuobjdump: str, cubin: bytes, tmp: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", dir=tmp, delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def _compile(spec: Spec, tmp: str, cuobjdump: str) -> dict[str, Any]:
    module, _, qualname = spec.kernel.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, JITFunction):
        raise RuntimeError(f"{spec.kernel} is {type(obj).__name__}, not a JITFunction (TRITON_INTERPRET set?)")
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # ptxas's -v log, printed by Triton when asked to dump it
        kernel = triton.compile(ASTSource(obj, spec.signature, spec.constexprs, spec.attrs),
                                target=GPUTarget("cuda", spec.arch, WARP_SIZE), options=spec.options)
    usage = _cubin_usage(cuobjdump, kernel.asm["cubin"], kernel.metadata.name, tmp)
    row: dict[str, Any] = {
        "regs": usage.get("REG"), "stack": usage.get("STACK", 0), "local": usage.get("LOCAL", 0),
        "smem_dynamic": int(kernel.metadata.shared), "smem_static": usage.get("SHARED", 0),
        "spill_stores": None, "spill_loads": None,
        "sass": sass_counts(_sass(cuobjdump, kernel.asm["cubin"], tmp)),
    }
    m = _PTXAS.search(log.getvalue())
    if m:
        row["spill_stores"], row["spill_loads"] = int(m.group(2)), int(m.group(3))
    m = _PTXAS_REGS.search(log.getvalue())
    if m and row["regs"] is None:
        row["regs"] = int(m.group(1))
    return row


def _worker() -> int:
    """Build loop: one encoded Spec per input line, one encoded result per output line."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything the compilers print goes to stderr, never into the protocol
    knobs.nvidia.dump_ptxas_log = True
    cuobjdump = knobs.nvidia.cuobjdump.path
    with tempfile.TemporaryDirectory(prefix="fastmt-aot-cubin-") as tmp:
        for line in sys.stdin:
            msg = _decode(line)
            if msg[0] == "path":
                sys.path[:0] = [p for p in msg[1] if p not in sys.path]
                continue
            spec: Spec = msg[1]
            start = time.perf_counter()
            try:
                result = _compile(spec, tmp, cuobjdump)
            except Exception as e:  # a build failure is a result, reported in its row
                result = {"error": f"{type(e).__name__}: {e}"}
            result["seconds"] = round(time.perf_counter() - start, 2)
            proto.write(_encode((msg[0], result)))
            proto.flush()
    return 0


def _cost(spec: Spec) -> float:
    # Slowest first, so the workers finish together: backward kernels and wide tiles build slowest.
    names = list(spec.signature)
    c = {names[k[0]]: v for k, v in spec.constexprs.items()}
    tile = 1
    for k in ("T_PAD", "BLOCK_C", "BLOCK_R", "BLOCK_D", "BLOCK_K"):
        tile *= int(c.get(k, 1))
    return (4.0 if "bwd" in spec.kernel else 1.0) * tile


def build(specs: list[Spec], workers: int | None = None, cache_dir: str | None = None,
          progress=None) -> list[dict[str, Any]]:
    """Compile every Spec in worker processes; one row per Spec, in the order given."""
    if not specs:
        return []
    workers = max(1, min(workers or min(2, os.cpu_count() or 1), len(specs)))
    with contextlib.ExitStack() as stack:
        if cache_dir is None:
            cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="fastmt-aot-cache-"))
        env = dict(os.environ, TRITON_CACHE_DIR=cache_dir, PYTHONUNBUFFERED="1")
        for var in ("TRITON_INTERPRET", "TRITON_ALLOW_NON_CONSTEXPR_GLOBALS"):
            env.pop(var, None)
        jobs: queue.Queue = queue.Queue()
        for i in sorted(range(len(specs)), key=lambda i: -_cost(specs[i])):
            jobs.put(i)
        results: dict[int, dict[str, Any]] = {}
        lock = threading.Lock()

        def start():
            p = subprocess.Popen([sys.executable, "-m", "fastmt.tools.aot", "--worker"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, env=env, text=True)
            p.stdin.write(_encode(("path", list(sys.path))))
            p.stdin.flush()
            return p

        def feed():
            proc = start()
            try:
                while True:
                    try:
                        i = jobs.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        proc.stdin.write(_encode((i, specs[i])))
                        proc.stdin.flush()
                        line = proc.stdout.readline()
                    except BrokenPipeError:
                        line = ""
                    if not line:  # the worker died (a crash in the compiler): report it, go on with a new one
                        code = proc.wait()
                        res = {"error": f"build worker exited with status {code}"}
                        proc = start()
                    else:
                        _, res = _decode(line)
                    with lock:
                        results[i] = res
                        if progress:
                            progress(len(results), len(specs))
            finally:
                proc.stdin.close()
                proc.wait()

        threads = [threading.Thread(target=feed, daemon=True) for _ in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return [_row(spec, results[i]) for i, spec in enumerate(specs)]


def _row(spec: Spec, res: dict[str, Any]) -> dict[str, Any]:
    row = {
        "kernel": spec.kernel.rpartition(":")[2].strip("_"), "arch": spec.arch, "case": spec.cases[0] if spec.cases else "",
        "cases": len(spec.cases), "pointers": spec.shown.get("pointers", ""), "constexprs": spec.shown.get("constexprs", ""),
        "ints": spec.shown.get("ints", ""), "num_warps": spec.num_warps, "regs": None, "smem_dynamic": None,
        "smem_static": None, "spill_stores": None, "spill_loads": None, "stack": None, "local": None,
        "sass": None, "error": None, "seconds": None,
    }
    row.update(res)
    row["smem"] = None if row["smem_dynamic"] is None else row["smem_dynamic"] + (row["smem_static"] or 0)
    row["limit"] = SHARED_LIMIT.get(spec.arch)
    row["problems"] = problems(row)
    row["ok"] = not row["problems"]
    return row


def problems(row: dict[str, Any]) -> list[str]:
    """Why a built row fails (empty when it passes)."""
    if row.get("error"):
        return ["build failed: " + _last_lines(row["error"], 3)]
    out = []
    if row.get("spill_stores") or row.get("spill_loads"):
        out.append(f"spills {row['spill_stores']} B stored / {row['spill_loads']} B loaded")
    if row.get("stack"):
        out.append(f"stack frame {row['stack']} B")
    if row.get("local"):
        out.append(f"local memory {row['local']} B")
    if row.get("limit") is None:
        out.append(f"no shared-memory limit known for sm_{row['arch']}")
    elif row.get("smem") is None or row["smem"] > row["limit"]:
        out.append(f"shared memory {row['smem']} B > {row['limit']} B")
    return out


def _last_lines(text: str, n: int) -> str:
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])


# ---------------------------------------------------------------------------------------------------
# Report


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ["kernel", "sm", "case (first of n)", "n", "pointers", "constexprs", "specialized ints", "warps", "regs",
            "smem B", "spill/stack B", "result"]
    body = []
    for r in rows:
        spill = "-" if r.get("error") else f"{(r['spill_stores'] or 0) + (r['spill_loads'] or 0) + (r['stack'] or 0) + (r['local'] or 0)}"
        body.append([
            r["kernel"], str(r["arch"]), r["case"], str(r["cases"]), r["pointers"], r["constexprs"], r["ints"],
            str(r["num_warps"]), "-" if r["regs"] is None else str(r["regs"]),
            "-" if r["smem"] is None else str(r["smem"]), spill,
            "ok" if r["ok"] else "FAIL: " + "; ".join(r["problems"]),
        ])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    widths[-1] = 0
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    lines = [fmt(head), fmt(["-" * w for w in widths[:-1]] + ["------"])]
    lines += [fmt(b) for b in body]
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]], seconds: float | None = None) -> str:
    if not rows:
        return "nothing built"
    built = [r for r in rows if not r.get("error")]
    fails = [r for r in rows if not r["ok"]]
    archs = sorted({r["arch"] for r in rows}, reverse=True)
    per_arch = ", ".join(f"{sum(r['arch'] == a for r in rows)} for sm_{a}" for a in archs)
    parts = [f"{len(rows)} builds ({per_arch}) from {sum(r['cases'] for r in rows) // max(1, len(archs))} cases"]
    if built:
        top_r = max(built, key=lambda r: r["regs"] or 0)
        top_s = max(built, key=lambda r: r["smem"] or 0)
        parts.append(f"max registers {top_r['regs']} ({top_r['case']}, sm_{top_r['arch']})")
        parts.append(f"max shared {top_s['smem']} B ({top_s['case']}, sm_{top_s['arch']})")
        spilled = [r for r in built if any(r.get(k) for k in ("spill_stores", "spill_loads", "stack", "local"))]
        parts.append(f"spills/stack/local in {len(spilled)}")
    parts.append(f"{len(fails)} failed")
    if seconds is not None:
        parts.append(f"{seconds:.0f} s")
    return "; ".join(parts)


def run(archs=(90, 80), level: str = "ci", workers: int | None = None, cache_dir: str | None = None,
        progress=None) -> list[dict[str, Any]]:
    """Enumerate, specialize and build; the rows of the table."""
    return build(plan(cases(level), archs), workers=workers, cache_dir=cache_dir, progress=progress)


def toolchain_problem() -> str | None:
    """Why no build can run here (None when Triton and its NVIDIA tools are usable)."""
    if _NO_TRITON is not None:
        return f"Triton is not importable ({_NO_TRITON})"
    try:
        knobs.nvidia.ptxas.path, knobs.nvidia.cuobjdump.path
    except RuntimeError as e:
        return f"Triton's NVIDIA tools are not usable here ({e})"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastmt.tools.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="90,80", help="GPU targets, comma separated (default 90,80)")
    ap.add_argument("--set", dest="level", default="full", choices=["ci", "full"],
                    help="full: every combination of the axes (default); ci: pairwise cover plus the largest tiles")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="build processes (default: CPU count)")
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--cache-dir", help="Triton cache to build in (default: a fresh temporary one)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return _worker()
    why = toolchain_problem()
    if why:
        print(f"cannot build: {why}", file=sys.stderr)
        return 1
    archs = tuple(int(x) for x in a.arch.split(",") if x.strip())
    unknown = [x for x in archs if x not in SHARED_LIMIT]
    if unknown:
        print(f"no shared-memory limit known for sm_{unknown[0]}; known: {sorted(SHARED_LIMIT)}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    specs = plan(cases(a.level), archs)
    print(f"triton {triton.__version__}: building {len(specs)} kernel specializations for "
          f"{', '.join(f'sm_{x}' for x in archs)} with {a.workers} workers", flush=True)

    def progress(done, total):
        if done == total or done % max(1, total // 20) == 0:
            print(f"  {done}/{total} built, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    rows = build(specs, workers=a.workers, cache_dir=a.cache_dir, progress=progress)
    print(format_table(rows))
    print(summary(rows, time.perf_counter() - start))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"triton": triton.__version__, "archs": list(archs), "set": a.level, "rows": rows}, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
