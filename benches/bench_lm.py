"""The causal-LM distillation loss, side by side: time and peak memory of one training pass.

    python benches/bench_lm.py --device cuda --vocab 32000,128256 --tokens 8192 --dim 4096 --teachers 2

Each provider computes the multi-teacher loss from the student's last hidden states and output
matrix and the teachers' (forward and backward, the gradient for the student's hidden states and
output matrix), on the same inputs:

- ``fused``: ``fastmt.kernels.lm_linear_kl_loss`` as it runs by default where its Triton kernels run:
  chunks of rows, cuBLAS GEMMs writing float32 logits, the KL row kernel (``fastmt.kernels.lm_chunks``;
  never forms the ``tokens x vocab`` logits; CUDA, or the CPU interpreter for tiny sizes)
- ``triton-tiles``: the same loss with ``backend="triton"``: vocabulary tiles in Triton kernels that
  never leave registers (``fastmt.kernels.lm_kl``; least memory, recomputes the logits for the gradient)
- ``tiled``: the same algorithm in torch over vocabulary tiles (``fastmt.kernels.lm_tiled``: what
  ``lm_linear_kl_loss`` runs where Triton cannot, e.g. a CPU without the interpreter)
- ``eager``: ``fastmt.losses.lm_linear_kl_loss``, the reference (forms every model's logits)
- ``compiled``: that reference under ``torch.compile``
- ``liger``: Liger-Kernel's chunked fused-linear distillation loss (``LigerFusedLinearJSDLoss``,
  ``beta=0``: the forward KL of one teacher, no hard loss), run once per teacher and summed, as a
  multi-teacher user of it would. It takes one teacher, so it has no per-token teacher weights.

Rows (JSON lines, ``--out``) give the median of ``--reps`` timed passes after ``--warmup`` and the
peak memory the pass adds to what its inputs hold (CUDA: the allocator's peak; CPU: the process's
peak resident memory, each provider in a process of its own). The table prints each provider's time
and memory against ``fused`` at each vocabulary size. A provider that fails is an error row.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

PROVIDERS = ("fused", "triton-tiles", "tiled", "eager", "compiled", "liger")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def inputs(a, v: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = DTYPES[a.dtype]

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(device)

    hs = rand(a.tokens, a.dim)
    ws = rand(v, a.dim, scale=a.dim**-0.5)
    ht = rand(a.teachers, a.tokens, a.teacher_dim)
    wt = rand(a.teachers, v, a.teacher_dim, scale=a.teacher_dim**-0.5)
    y = torch.randint(0, v, (a.tokens,), generator=g).to(device)
    y[: a.tokens // 8] = -100  # a prompt: positions that count nowhere
    return hs, ws, ht, wt, y


def make(provider: str, a, device: torch.device):
    """``fn(hs, ws, ht, wt, y) -> loss`` for one provider."""
    if provider in ("fused", "triton-tiles"):
        import fastmt.kernels as fused

        if not fused.available(device):
            raise RuntimeError("the Triton kernels do not run here (CUDA, or TRITON_INTERPRET=1 on the CPU)")
        backend = "chunks" if provider == "fused" else "triton"
        chunk = int(a.chunk_mb * 2**20) if a.chunk_mb and provider == "fused" else None
        return lambda hs, ws, ht, wt, y: fused.lm_linear_kl_loss(hs, ws, ht, wt, y, a.weights, a.temperature,
                                                                 chunk_bytes=chunk, backend=backend)
    if provider == "tiled":
        from fastmt.kernels import lm_common, lm_tiled

        return lambda hs, ws, ht, wt, y: lm_tiled.lm_linear_kl(hs, ws, ht, wt, y, a.weights, a.temperature, -100,
                                                               False, lm_common.CHUNK_BYTES, "torch")
    from fastmt import losses

    def eager(hs, ws, ht, wt, y):
        return losses.lm_linear_kl_loss(hs, ws, ht, wt, y, a.weights, a.temperature)

    if provider == "eager":
        return eager
    if provider == "compiled":
        return torch.compile(eager, dynamic=False)
    if provider == "liger":
        from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDLoss

        loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0,
                                       temperature=a.temperature, compiled=device.type == "cuda")
        return lambda hs, ws, ht, wt, y: sum(loss(hs, ws, ht[i], wt[i], y) for i in range(ht.shape[0]))
    raise ValueError(f"unknown provider {provider!r}: choose from {', '.join(PROVIDERS)}")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(provider: str, v: int, a, device: torch.device) -> dict:
    row = dict(provider=provider, vocab=v, chunk_mb=a.chunk_mb if provider == "fused" else None, tokens=a.tokens, dim=a.dim, teacher_dim=a.teacher_dim,
               teachers=a.teachers, dtype=a.dtype, device=device.type, weights=a.weights,
               temperature=a.temperature)
    try:
        hs, ws, ht, wt, y = inputs(a, v, device)
        fn = make(provider, a, device)
        hs.requires_grad_(), ws.requires_grad_()

        def one():
            hs.grad = ws.grad = None
            loss = fn(hs, ws, ht, wt, y)
            loss.backward()
            return loss

        _sync(device)
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        loss = one()  # the first pass: compiles what compiles
        _sync(device)
        row["first_s"] = time.perf_counter() - start
        row["loss"] = float(loss)
        for _ in range(a.warmup):
            one()
        times = []
        for _ in range(a.reps):
            _sync(device)
            t0 = time.perf_counter()
            one()
            _sync(device)
            times.append(time.perf_counter() - t0)
        times.sort()
        row["ms_p50"] = 1e3 * times[len(times) // 2]
        row["ms_min"] = 1e3 * times[0]
        if a.profile:  # where the pass's time goes: one more pass under torch's profiler, its top kernels
            from torch.profiler import ProfilerActivity, profile

            kinds = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=kinds) as prof:
                one()
                _sync(device)
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(f"\n{provider}, V={v}: the pass under the profiler\n"
                  + prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60), flush=True)
        if provider == "fused":  # whether cuBLAS wrote the float32 logits from half inputs (else: rounded)
            from fastmt.kernels import lm_common

            row["fp32_out_gemm"] = lm_common.fp32_out_gemm(device.type)
        if device.type == "cuda":
            row["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:  # the process's peak resident memory over the inputs' (each provider runs in its own process)
            row["peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss) / 2**20
    except Exception as e:  # noqa: BLE001 - a failing provider is a row, the others still run
        row["error"] = f"{type(e).__name__}: {e}"[:400]
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _child(a, provider: str, v: int) -> dict:
    """One provider in a fresh process (CPU: peak resident memory is per process)."""
    args = [sys.executable, __file__, "--one", provider, "--vocab", str(v)] + [
        f"--{k.replace('_', '-')}={getattr(a, k)}" for k in
        ("device", "tokens", "dim", "teacher_dim", "teachers", "dtype", "weights", "temperature", "warmup", "reps",
         "chunk_mb")]
    done = subprocess.run(args, capture_output=True, text=True)
    lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
    if done.returncode != 0 or not lines:
        return dict(provider=provider, vocab=v, error=(done.stderr.strip().splitlines() or ["no output"])[-1][:400])
    return json.loads(lines[-1])


def table(rows: list[dict], a_base: str = "fused") -> str:
    """Each row's time and memory against ``a_base``'s at the same vocabulary size."""
    out = [f"{'vocab':>7} {'provider':<12} {'ms p50':>9} {'peak MB':>9} {'time vs ' + a_base:>14} "
           f"{'memory vs ' + a_base:>16}"]
    for v in sorted({r["vocab"] for r in rows}):
        here = [r for r in rows if r["vocab"] == v]
        f = next((r for r in here if r["provider"] == a_base and "error" not in r), None)
        for r in here:
            if "error" in r:
                out.append(f"{v:>7} {r['provider']:<12} error: {r['error']}")
                continue
            speed = f"{r['ms_p50'] / f['ms_p50']:.2f}x" if f else "-"
            mem = f"{r['peak_mb'] / f['peak_mb']:.2f}x" if f and f["peak_mb"] > 0 else "-"
            out.append(f"{v:>7} {r['provider']:<12} {r['ms_p50']:>9.2f} {r['peak_mb']:>9.1f} {speed:>14} {mem:>16}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vocab", default="32000,64000,128000", help="comma-separated vocabulary sizes")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--dim", type=int, default=512, help="the student's width")
    p.add_argument("--teacher-dim", type=int, default=None, help="the teachers' width (default: --dim)")
    p.add_argument("--teachers", type=int, default=2)
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--weights", default="paper", help="paper, softmax or uniform")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--chunk-mb", type=float, default=0,
                   help="fused: MiB one chunk of rows may take (default: the library's, 1024)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--profile", action="store_true",
                   help="after timing, one pass under torch's profiler: its top kernels (on a CPU: in-process only)")
    p.add_argument("--out", default=None, help="append the rows here (JSON lines)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.teacher_dim = a.teacher_dim or a.dim
    a.dtype = a.dtype or ("bf16" if a.device.startswith("cuda") else "fp32")
    device = torch.device(a.device)
    vocabs = [int(x) for x in a.vocab.split(",") if x]
    if a.one:
        print(json.dumps(measure(a.one, vocabs[0], a, device)))
        return 0
    rows = []
    for v in vocabs:
        for provider in a.providers.split(","):
            row = measure(provider, v, a, device) if device.type == "cuda" else _child(a, provider, v)
            rows.append(row)
            shown = f"error: {row['error']}" if "error" in row else f"{row['ms_p50']:.2f} ms, {row['peak_mb']:.1f} MB"
            print(f"  V={v} {provider}: {shown}", flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\nLM distillation loss, forward + backward: {a.tokens} tokens, D={a.dim}, Dt={a.teacher_dim}, "
          f"{a.teachers} teachers, {a.dtype}, on {where}")
    base = next((p for p in ("fused", "tiled") if p in a.providers.split(",")), a.providers.split(",")[0])
    print(table(rows, base))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
