"""The fastest path the machine supports, chosen when a flag is left to ``auto`` (the CLI's default).

``fastmt cofinetune`` and ``fastmt distill`` resolve, once the training set's size is known:

- ``--precision auto``: bf16 autocast where the hardware multiplies bf16 natively (a CUDA GPU that
  supports it, else fp16; a CPU with AVX-512 BF16 or AMX), fp32 elsewhere. On a CPU without them a
  bf16 matmul is emulated and many times slower than fp32 (``benches/NOTES.md``).
- ``--kernels auto``: the fused Triton kernels on CUDA, the reference losses on a CPU (where the
  kernels only run in Triton's interpreter).
- ``--compile`` left unset: compiled only when the job has at least ``COMPILE_MIN_STEPS`` steps,
  enough to repay a minute or more of compiling; ``--cuda-graphs`` follows compile on CUDA.
- ``--stack-teachers`` left unset: on CUDA whenever two teachers share an architecture; on a CPU only
  in bf16 (in fp32 the CPU's batched GEMM was slower than one GEMM per teacher).
- ``--cache-teachers`` left unset: ``auto`` when more than one epoch runs (one process), else off.
- ``--group-by-length`` left unset: on. Batches hold examples of similar length, so they carry
  little padding; uncompiled, each batch is padded to its own longest example (compiled, to the
  length buckets, which bound the number of graphs).

The choice is printed as one line. An explicit flag always wins; ``--precision fp32 --no-compile
--kernels reference --no-stack-teachers --cache-teachers off --no-group-by-length`` is the reference
path.

The one hardware reading behind these choices, whether the device multiplies bf16 natively, can be
forced: ``FASTMT_NATIVE_BF16=1`` takes the bf16 plan (on a CPU without AVX-512 BF16 it runs, emulated
and slow, but computes the same thing), ``FASTMT_NATIVE_BF16=0`` the plan of a device without bf16
(fp32 on a CPU, fp16 on a GPU). Python callers can pass ``native_bf16=`` to ``resolve`` instead. The
tests use it to run both plans on any machine.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from fastmt.errors import UsageError

log = logging.getLogger("fastmt")

AUTO = "auto"
CACHE_DEFAULT = "default"  # the CLI's --cache-teachers when not given: auto with several epochs
COMPILE_MIN_STEPS = 1000
NATIVE_BF16_ENV = "FASTMT_NATIVE_BF16"  # 1 / 0: force the bf16 reading below; unset: read the hardware


def forced_bf16() -> bool | None:
    """``FASTMT_NATIVE_BF16`` as a bool, or None when it is unset (read the hardware)."""
    value = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if not value:
        return None
    if value not in ("0", "1"):
        raise UsageError(f"{NATIVE_BF16_ENV}={value}: set it to 1 (bf16 plan), 0 (no-bf16 plan), or unset it")
    return value == "1"


def cpu_bf16(cpuinfo: str | None = None) -> tuple[bool, str]:
    """Whether this CPU multiplies bf16 natively, and why (from /proc/cpuinfo's flags on Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False, "CPU flags unknown"
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    have = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if have:
        return True, f"CPU has {'/'.join(have)}"
    return False, "CPU has no AVX-512 BF16 or AMX"


def native_bf16(device: torch.device, force: bool | None = None) -> tuple[bool, str]:
    """Whether ``device`` multiplies bf16 natively, and why: ``force`` when given, else
    ``FASTMT_NATIVE_BF16`` when set, else the hardware's own answer."""
    if force is None:
        force = forced_bf16()
        source = f"{NATIVE_BF16_ENV}={int(force)}" if force is not None else None
    else:
        source = f"native_bf16={force}"
    if force is not None:
        return force, f"forced by {source}"
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, "GPU supports bf16" if ok else "GPU has no bf16"
    return cpu_bf16()


def choose_precision(device: torch.device, force_bf16: bool | None = None) -> tuple[str, str]:
    ok, why = native_bf16(device, force_bf16)
    if ok:
        return "bf16", why
    return ("fp16" if device.type == "cuda" else "fp32"), why


def resolve(args, device: torch.device, steps: int, stackable: bool = False, data_parallel: bool = False,
            native_bf16: bool | None = None) -> str:
    """Replace every ``auto`` (or unset) setting of ``args`` with a concrete one; the one-line summary.
    ``native_bf16`` forces the hardware reading (default: ``FASTMT_NATIVE_BF16``, else the hardware)."""
    parts = []
    if args.precision == AUTO:
        args.precision, why = choose_precision(device, native_bf16)
        parts.append(f"precision {args.precision} ({why})")
    if getattr(args, "kernels", None) == AUTO:
        from fastmt import kernels

        args.kernels = "fused" if device.type == "cuda" and kernels.available(device) else "reference"
        parts.append(f"kernels {args.kernels}" + (" (CPU)" if device.type != "cuda" else ""))
    if args.compile is None:
        args.compile = steps >= COMPILE_MIN_STEPS
        parts.append(f"compile {'on' if args.compile else 'off'} ({steps} steps "
                     f"{'>=' if args.compile else '<'} {COMPILE_MIN_STEPS})")
    if hasattr(args, "cuda_graphs") and args.cuda_graphs is None:
        args.cuda_graphs = bool(args.compile) and device.type == "cuda"
        if device.type == "cuda":
            parts.append(f"CUDA graphs {'on' if args.cuda_graphs else 'off'}")
    if hasattr(args, "stack_teachers") and args.stack_teachers is None:
        args.stack_teachers = stackable and (device.type == "cuda" or args.precision == "bf16")
        if stackable:
            parts.append(f"stacked teachers {'on' if args.stack_teachers else 'off'}"
                         + ("" if args.stack_teachers else " (fp32 on a CPU)"))
    if getattr(args, "cache_teachers", None) == CACHE_DEFAULT:
        args.cache_teachers = AUTO if args.epochs > 1 and not data_parallel else None
        parts.append("teacher cache " + ("auto" if args.cache_teachers else
                                         "off (" + ("data-parallel" if data_parallel else "one epoch") + ")"))
    elif getattr(args, "cache_teachers", None) == "off":
        args.cache_teachers = None
    if getattr(args, "group_by_length", False) is None:
        args.group_by_length = True
        parts.append("length-grouped batches")
    return ", ".join(parts)


def widths(args, buckets: list[int]) -> list[int]:
    """The padded lengths batches may take: every length up to the longest bucket when batches are
    grouped by length and nothing is compiled (an eager step costs the same for any shape), else
    ``buckets`` (a compiled step makes one graph per shape)."""
    if getattr(args, "group_by_length", False) and not getattr(args, "compile", False):
        return list(range(1, max(buckets) + 1))
    return list(buckets)


def report(command: str, summary: str) -> None:
    if summary:
        log.info("%s path: %s", command, summary)
