"""Kernel benchmarks: the fused losses against eager, compiled and Liger baselines, side by side.

    python benches/bench_kernels.py                      # GPU: the target shapes, bf16 and fp16
    python benches/bench_kernels.py --quick              # CPU (Triton interpreter): tiny shapes, a smoke
    python benches/bench_kernels.py --dtypes bf16 --modes full   # the short set the GPU suite runs

For each op x provider x mode (fwd, bwd, full) x dtype x shape it records median/p20/p80 ms
(``triton.testing.do_bench`` on CUDA, wall-clock quantiles on the CPU), GB/s from the bytes the op
must move and their share of this device's measured copy bandwidth, and peak extra memory, and
appends one JSON line per measurement to ``benches/results/kernels.jsonl`` (``--out`` to change).

Providers: ``fused`` (``fastmt.kernels``), ``eager`` (``fastmt.losses``), ``compiled``
(``torch.compile`` of ``fastmt.losses``), ``liger`` (one Liger-Kernel KL call per teacher, uniform
teacher weights; only where ``liger_kernel`` imports, KL only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The checkout this script sits in, installed or not, is the code it measures.
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fastmt.engine.machine import git_sha, percentiles  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Case:
    op: str  # "mt_kl_loss" or "mt_hidden_loss"
    shape: dict
    dtype: torch.dtype
    temperature: float | None = None  # the KL's (None: TEMPERATURE)


def device_name(device: torch.device) -> str:
    from fastmt.engine.machine import device_name as name

    return name(device) + ("" if device.type == "cuda" else " (Triton interpreter)")


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Measured device copy bandwidth (read + write bytes per second) of a large tensor copy."""
    n = (256 << 20) // 4 if device.type == "cuda" else (32 << 20) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms, _, _ = timed(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def timed(fn, device: torch.device, reps: int = 5) -> tuple[float, float, float]:
    """(p50, p20, p80) milliseconds."""
    if device.type == "cuda":
        from triton.testing import do_bench

        p50, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return p50, p20, p80
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return percentiles(times)


# ---------------------------------------------------------------------------------------------------
# Inputs, the bytes each op must move, and the providers


def make_inputs(case: Case, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = case.dtype
    if case.op == "mt_kl_loss":
        t, n, c = case.shape["T"], case.shape["N"], case.shape["C"]
        s = (torch.randn(n, c, generator=g) * 2).to(device, dt)
        tl = (torch.randn(t, n, c, generator=g) * 2).to(device, dt)
        labels = torch.randint(0, c, (n,), generator=g).to(device)
        return {"s": s, "t": tl, "labels": labels}
    t, k, r, ds, dtt = (case.shape[x] for x in ("T", "K", "R", "Ds", "Dt"))
    hs = torch.randn(k, 1, r, ds, generator=g).to(device, dt)
    ht = torch.randn(t, k, 1, r, dtt, generator=g).to(device, dt)
    w = (torch.randn(t, k, ds, dtt, generator=g) * ds**-0.5).to(device, dt)
    b = torch.zeros(t, k, dtt).to(device, dt)
    mask = torch.ones(1, r, dtype=torch.long, device=device)
    return {"hs": hs, "ht": ht, "w": w, "b": b, "mask": mask}


def bytes_moved(case: Case, mode: str) -> int:
    """Bytes any implementation must move (each input read once, each output written once)."""
    e = torch.finfo(case.dtype).bits // 8
    if case.op == "mt_kl_loss":
        t, n, c = case.shape["T"], case.shape["N"], case.shape["C"]
        fwd = (1 + t) * n * c * e  # logits in
        full = fwd + n * c * e  # ... and the student gradient out
        return {"fwd": fwd, "bwd": full - fwd, "full": full}[mode]
    t, k, r, ds, dtt = (case.shape[x] for x in ("T", "K", "R", "Ds", "Dt"))
    inputs = (k * r * ds + t * k * r * dtt + t * k * ds * dtt + t * k * dtt) * e
    grads = (k * r * ds + t * k * ds * dtt + t * k * dtt) * e
    return {"fwd": inputs, "bwd": inputs + grads, "full": inputs + grads}[mode]


def bytes_fused(case: Case, mode: str) -> int | None:
    """Bytes the fused KL kernels move by design: the forward reads every logit, the backward reads
    them again and writes the gradient (nothing of size N x C is kept in between)."""
    if case.op != "mt_kl_loss":
        return None
    e = torch.finfo(case.dtype).bits // 8
    t, n, c = case.shape["T"], case.shape["N"], case.shape["C"]
    fwd = (1 + t) * n * c * e
    bwd = fwd + n * c * e
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def flops(case: Case, mode: str) -> int | None:
    """Matmul FLOPs of the hidden loss any implementation must do: the projection forward, dW and
    d hs backward (the fused backward also recomputes the projection: one more forward's worth)."""
    if case.op != "mt_hidden_loss":
        return None
    t, k, r, ds, dtt = (case.shape[x] for x in ("T", "K", "R", "Ds", "Dt"))
    one = 2 * t * k * r * ds * dtt
    return {"fwd": one, "bwd": 2 * one, "full": 3 * one}[mode]


TEMPERATURE = 2.0  # --temperature; at 1 (training's default) the fused KL shares its log-sum-exps


def provider_fn(name: str, case: Case, x: dict, temperature: float | None = None):
    """A callable computing the loss with autograd-ready inputs, or None where unavailable."""
    from fastmt import kernels, losses

    temperature = TEMPERATURE if temperature is None else temperature
    if case.op == "mt_kl_loss":
        if name == "liger":
            try:
                from liger_kernel.transformers.functional import liger_kl_div
            except ImportError:
                return None

            def liger(s, t):
                log_q = torch.log_softmax(s.float() / temperature, dim=-1)
                total = 0.0
                for i in range(t.shape[0]):  # one Liger KL per teacher, uniform weights
                    log_p = torch.log_softmax(t[i].float() / temperature, dim=-1)
                    total = total + liger_kl_div(log_q, log_p, reduction="batchmean", log_target=True)
                return temperature**2 * total

            return liger
        mod = kernels if name == "fused" else losses
        weights = None if name == "liger" else "paper"

        def kl(s, t):
            return mod.mt_kl_loss(s, t, weights, temperature=temperature, labels=x["labels"])

        return torch.compile(kl, fullgraph=True) if name == "compiled" else kl
    if name == "liger":
        return None
    mod = kernels if name == "fused" else losses

    def hidden(hs, w, b):
        return mod.mt_hidden_loss(hs, x["ht"], w, b, x["mask"])

    return torch.compile(hidden, fullgraph=True) if name == "compiled" else hidden


def measure(case: Case, provider: str, mode: str, device: torch.device, copy_gbps: float) -> dict | None:
    x = make_inputs(case, device)
    fn = provider_fn(provider, case, x, case.temperature)
    if fn is None:
        return None
    grads_of = [x["s"]] if case.op == "mt_kl_loss" else [x["hs"], x["w"], x["b"]]
    args = [x["s"], x["t"]] if case.op == "mt_kl_loss" else [x["hs"], x["w"], x["b"]]
    for a in grads_of:
        a.requires_grad_(mode != "fwd")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0

    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(*args)
    elif mode == "bwd":
        loss = fn(*args)

        def run():
            for a in grads_of:
                a.grad = None
            loss.backward(retain_graph=True)
    else:
        def run():
            for a in grads_of:
                a.grad = None
            fn(*args).backward()

    run()  # warm-up (and compile)
    p50, p20, p80 = timed(run, device)
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else None
    nbytes = bytes_moved(case, mode)
    gbps = nbytes / (p50 * 1e-3) / 1e9
    moved = bytes_fused(case, mode) if provider == "fused" else None
    fl = flops(case, mode)
    import triton

    return {
        "op": case.op, "provider": provider, "mode": mode, "dtype": str(case.dtype).replace("torch.", ""),
        "shape": case.shape,
        "temperature": (TEMPERATURE if case.temperature is None else case.temperature) if case.op == "mt_kl_loss" else None,
        "ms_p50": p50, "ms_p20": p20, "ms_p80": p80, "gbps": gbps,
        "copy_share": gbps / copy_gbps, "bytes": nbytes,
        "gbps_moved": moved / (p50 * 1e-3) / 1e9 if moved else None, "bytes_moved": moved,
        "tflops": fl / (p50 * 1e-3) / 1e12 if fl else None,
        "peak_mb": peak_mb, "device": device_name(device),
        "torch": torch.__version__, "triton": triton.__version__, "git_sha": git_sha(),
    }


def default_cases(quick: bool, dtypes: tuple[str, ...] = ("bf16", "fp16"),
                  temperatures: tuple[float, ...] = (None,)) -> list[Case]:
    """The benchmark's cases; the KL ones once per temperature (the KL forward's cost depends on it:
    at 1 the tempered and untempered statistics are one and the same)."""
    if quick:  # CPU interpreter: keeps the script working, says nothing about speed
        return [*(Case("mt_kl_loss", {"T": 3, "N": 8, "C": 37}, torch.float32, tau) for tau in temperatures),
                Case("mt_hidden_loss", {"T": 2, "K": 2, "R": 24, "Ds": 32, "Dt": 48}, torch.float32)]
    cases = []
    for dt in (DTYPES[d] for d in dtypes):
        cases += [*(Case("mt_kl_loss", {"T": 3, "N": 8192, "C": 30522}, dt, tau) for tau in temperatures),
                  Case("mt_kl_loss", {"T": 3, "N": 64, "C": 2}, dt),
                  Case("mt_hidden_loss", {"T": 3, "K": 4, "R": 8192, "Ds": 768, "Dt": 768}, dt)]
    return cases


def run(cases: list[Case], providers: list[str], modes: list[str], device: torch.device, out: Path | None) -> list[dict]:
    copy_gbps = copy_bandwidth_gbps(device)
    rows = []
    for case in cases:
        for mode in modes:
            for provider in providers:
                try:
                    row = measure(case, provider, mode, device, copy_gbps)
                except torch.cuda.OutOfMemoryError:
                    row = {"op": case.op, "provider": provider, "mode": mode, "shape": case.shape, "error": "out of memory"}
                    torch.cuda.empty_cache()
                except Exception as e:  # one provider failing (e.g. Liger under the CPU interpreter) is a row
                    msg = str(e).strip().splitlines()[-1][:200] if str(e).strip() else ""
                    row = {"op": case.op, "provider": provider, "mode": mode, "shape": case.shape,
                           "error": f"{type(e).__name__}: {msg}"}
                if row is None:
                    continue
                row["copy_gbps"] = copy_gbps
                rows.append(row)
                print(format_row(row), flush=True)
                if out is not None:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with open(out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    print_ratios(rows)
    return rows


def format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['op']:15s} {r['provider']:9s} {r['mode']:4s} {json.dumps(r['shape'])}: {r['error']}"
    peak = f"{r['peak_mb']:8.1f}" if r["peak_mb"] is not None else "       -"
    extra = ""
    if r.get("gbps_moved"):
        extra += f" | {r['gbps_moved']:8.1f} GB/s moved ({100 * r['gbps_moved'] / r['copy_gbps']:5.1f}%)"
    if r.get("tflops"):
        extra += f" | {r['tflops']:7.1f} TFLOP/s"
    shape = json.dumps(r["shape"]) + (f" tau={r['temperature']:g}" if r.get("temperature") is not None else "")
    return (f"{r['op']:15s} {r['provider']:9s} {r['mode']:4s} {r['dtype']:8s} {shape:48s} "
            f"{r['ms_p50']:9.3f} ms [{r['ms_p20']:.3f}, {r['ms_p80']:.3f}] {r['gbps']:8.1f} GB/s "
            f"({100 * r['copy_share']:5.1f}% of copy) peak {peak} MB{extra}")


def print_ratios(rows: list[dict]) -> None:
    """Speed-up of `fused` over every other provider measured in this run, per op/mode/dtype/shape."""
    by = {}
    for r in rows:
        if "error" not in r:
            key = (r["op"], r["mode"], r["dtype"], json.dumps(r["shape"]), r.get("temperature"))
            by.setdefault(key, {})[r["provider"]] = r["ms_p50"]
    print("\nfused speed-up (other p50 / fused p50), same run:")
    for (op, mode, dtype, shape, tau), times in by.items():
        if "fused" not in times:
            continue
        ratios = ", ".join(f"{p} {t / times['fused']:.2f}x" for p, t in times.items() if p != "fused")
        at = f" at temperature {tau:g}" if tau is not None else ""
        print(f"  {op:15s} {mode:4s} {dtype:8s} {shape}{at}: {ratios}")


def main(argv: list[str] | None = None) -> int:
    global TEMPERATURE
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes (the CPU smoke)")
    p.add_argument("--providers", default="fused,eager,compiled,liger")
    p.add_argument("--modes", default="fwd,bwd,full")
    p.add_argument("--dtypes", default="bf16,fp16", help="of the GPU shapes: bf16, fp16 or both")
    p.add_argument("--temperature", default="1,2",
                   help="of the KL loss: one value, or several separated by commas, each measured (default 1,2; "
                        "the small-class KL case runs at the first)")
    p.add_argument("--out", default=str(ROOT / "benches" / "results" / "kernels.jsonl"), help="JSONL to append to ('' for none)")
    a = p.parse_args(argv)
    dtypes = tuple(d for d in a.dtypes.split(",") if d)
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        p.error(f"--dtypes {a.dtypes}: choose from {', '.join(DTYPES)}")
    try:
        temperatures = tuple(float(x) for x in a.temperature.split(",") if x.strip())
    except ValueError:
        temperatures = ()
    if not temperatures or not all(t > 0 and math.isfinite(t) for t in temperatures):
        p.error(f"--temperature {a.temperature}: positive numbers separated by commas, e.g. 1,2")
    TEMPERATURE = temperatures[0]
    device = torch.device(a.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        import warnings

        warnings.filterwarnings("ignore", category=RuntimeWarning)  # interpreter numpy on masked lanes
    run(default_cases(a.quick or device.type == "cpu", dtypes, temperatures), a.providers.split(","), a.modes.split(","),
        device, Path(a.out) if a.out else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
