"""The fastest path the machine supports, chosen when a flag is left to ``auto`` (the CLI's default).

One resolver, :func:`resolve`, for every training command: each command's rules are registered here
(``register``), and its task calls ``resolve(command, args, ...)`` once the training set's size is known.
``fastmt cofinetune`` resolves precision, compile and length grouping; ``fastmt distill`` all of the
following; ``fastmt distill-lm`` precision, kernels and compile:

- ``--precision auto``: bf16 autocast where the hardware multiplies bf16 natively (a CUDA GPU that
  supports it, else fp16; a CPU with AVX-512 BF16 or AMX), fp32 elsewhere. On a CPU without them a
  bf16 matmul is emulated and many times slower than fp32 (``benches/NOTES.md``).
- ``--kernels auto``: the fused Triton kernels on CUDA where they run there (Triton importable), else
  the reference losses (on a CPU the kernels only run in Triton's interpreter).
- ``--compile`` left unset: compiled only when the job has at least ``COMPILE_MIN_STEPS`` steps,
  enough to repay a minute or more of compiling; ``--cuda-graphs`` follows compile on CUDA.
- ``--stack-teachers`` left unset: on CUDA whenever two teachers share an architecture; on a CPU only
  in bf16 (in fp32 the CPU's batched GEMM was slower than one GEMM per teacher).
- ``--cache-teachers`` left unset: ``auto`` when more than one epoch runs (one process), else off. A
  data-parallel run uses no teacher cache, asked for or not (a warning says so when it was).
- distill-lm with ``--cache-teachers``: the step trains on the stored top-k through its own loss, so
  ``--kernels`` plays no part; the path line says so.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from fastmt.choices import AUTO
from fastmt.config.settings import CACHE_DEFAULT
from fastmt.errors import UsageError

log = logging.getLogger("fastmt")

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


# --------------------------------------------------------------------------------------------------
# The rules: each turns one setting left to ``auto`` (or None) into a concrete one, and says how in a
# few words for the path line (nothing where the setting was given).


@dataclass
class Facts:
    """What the rules read besides the settings, known once the data, the device and the teachers are."""

    device: torch.device
    steps: int  # optimizer steps of the whole run
    stackable: bool = False  # two or more teachers of one architecture could run as one stacked module
    data_parallel: bool = False  # the run has several processes (torchrun)
    # Whether fastmt.kernels runs its Triton kernels on the device (fastmt.engine.kernelchoice.fused_available);
    # asked on CUDA only.
    fused_available: Callable[[torch.device], bool] = lambda device: False
    native_bf16: bool | None = None  # force the hardware reading (default: FASTMT_NATIVE_BF16, else the hardware)


Rule = Callable[[Any, Facts], "str | None"]


def precision_rule(args, facts: Facts) -> str | None:
    """bf16 where the device multiplies it natively, else fp16 on a GPU, fp32 on a CPU."""
    if args.precision == AUTO:
        args.precision, why = choose_precision(facts.device, facts.native_bf16)
        return f"precision {args.precision} ({why})"
    return None


def kernels_rule(args, facts: Facts) -> str | None:
    """The fused kernels on CUDA where they run there, else the reference (on a CPU the kernels run
    only in Triton's interpreter)."""
    if args.kernels == AUTO:
        on_cuda = facts.device.type == "cuda"
        args.kernels = "fused" if on_cuda and facts.fused_available(facts.device) else "reference"
        return f"kernels {args.kernels}" + ("" if on_cuda else " (CPU)")
    return None


def lm_kernels_rule(args, facts: Facts) -> str | None:
    """distill-lm: ``kernels_rule``; but with --cache-teachers the step trains on the stored top-k
    through its own loss (``fastmt.tasks.lm.cached``), whatever --kernels says: the line says so."""
    said = kernels_rule(args, facts)
    if args.cache_teachers is None:
        return said
    return "--kernels not used with --cache-teachers (the top-k loss is its own)"


def compile_rule(args, facts: Facts) -> str | None:
    """Compiled only for jobs long enough to repay the compiling."""
    if args.compile is None:
        args.compile = facts.steps >= COMPILE_MIN_STEPS
        return (f"compile {'on' if args.compile else 'off'} ({facts.steps} steps "
                f"{'>=' if args.compile else '<'} {COMPILE_MIN_STEPS})")
    return None


def cuda_graphs_rule(args, facts: Facts) -> str | None:
    """CUDA graphs follow compile on CUDA."""
    if args.cuda_graphs is None:
        args.cuda_graphs = bool(args.compile) and facts.device.type == "cuda"
        if facts.device.type == "cuda":
            return f"CUDA graphs {'on' if args.cuda_graphs else 'off'}"
    return None


def stack_teachers_rule(args, facts: Facts) -> str | None:
    """Stacked on CUDA, and on a CPU in bf16 (in fp32 the CPU's batched GEMM was slower than one per teacher)."""
    if args.stack_teachers is None:
        args.stack_teachers = facts.stackable and (facts.device.type == "cuda" or args.precision == "bf16")
        if facts.stackable:
            return (f"stacked teachers {'on' if args.stack_teachers else 'off'}"
                    + ("" if args.stack_teachers else " (fp32 on a CPU)"))
    return None


def teacher_cache_rule(args, facts: Facts) -> str | None:
    """The teacher cache (``auto``) when more than one epoch runs in one process. Data-parallel runs use
    none, asked for or not: each process would need its own shard's outputs."""
    if args.cache_teachers == CACHE_DEFAULT:
        args.cache_teachers = AUTO if args.epochs > 1 and not facts.data_parallel else None
        return "teacher cache " + ("auto" if args.cache_teachers else
                                   "off (" + ("data-parallel" if facts.data_parallel else "one epoch") + ")")
    if args.cache_teachers is not None and facts.data_parallel:
        log.warning("--cache-teachers: not used in data-parallel runs; the teachers run every step")
        args.cache_teachers = None
    return None


def group_by_length_rule(args, facts: Facts) -> str | None:
    """Batches of similar lengths, so they carry little padding."""
    if args.group_by_length is None:
        args.group_by_length = True
        return "length-grouped batches"
    return None


# --------------------------------------------------------------------------------------------------
# The registry: each command's rules, in the order they apply (a later rule reads what an earlier one
# chose: stacking reads the precision, CUDA graphs the compile).

RULES: dict[str, tuple[Rule, ...]] = {}


def register(command: str, *rules: Rule) -> None:
    """Make ``rules`` the ones ``resolve`` applies, in this order, to ``command``'s settings."""
    RULES[command] = tuple(rules)


register("cofinetune", precision_rule, compile_rule, group_by_length_rule)
register("distill", precision_rule, kernels_rule, compile_rule, cuda_graphs_rule, stack_teachers_rule,
         teacher_cache_rule, group_by_length_rule)
register("distill-lm", precision_rule, lm_kernels_rule, compile_rule)


def resolve(command: str, args, device: torch.device, steps: int, *, stackable: bool = False,
            data_parallel: bool = False, fused_available: Callable[[torch.device], bool] | None = None,
            native_bf16: bool | None = None) -> str:
    """Replace every ``auto`` (or unset) setting of ``command``'s ``args`` with a concrete one, by the
    rules registered for it; the one-line summary of what was chosen. ``fused_available(device)``: whether
    the fused kernels run on ``device`` (asked on CUDA only; default: they do not). ``native_bf16``
    forces the hardware reading (default: ``FASTMT_NATIVE_BF16``, else the hardware)."""
    if command not in RULES:
        raise ValueError(f"fastmt.config.auto.resolve: no rules for {command!r} (known: {', '.join(RULES)})")
    facts = Facts(device, steps, stackable, data_parallel, native_bf16=native_bf16)
    if fused_available is not None:
        facts.fused_available = fused_available
    parts = [rule(args, facts) for rule in RULES[command]]
    return ", ".join(p for p in parts if p)


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
