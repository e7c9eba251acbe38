"""``fastmt memory``: peak GPU memory of a distillation step, phase by phase, reference vs fast.

Phases of one eager step (each phase's peak is read from the CUDA caching allocator, relative to
what was allocated before the step): teachers' forward, student forward, losses, backward,
optimizer. ``reference`` is fp32 with the reference losses; ``fast`` is fp16 with the fused kernels
(phases cannot be told apart inside one compiled graph, so both run eagerly here). Also: the largest
batch whose whole step fits a memory budget, a snapshot of one ``fast`` step that PyTorch's memory
viewer (https://pytorch.org/memory_viz) opens, a JSON report and a PNG bar chart.

Each mode's models are built once, on the GPU; the batch search changes only the inputs. A step's
peak grows linearly with the batch (fixed sequence length), so the search fits a line through the
steps it has run and aims at the budget, falling back to doubling and bisection: a handful of steps
per mode, within a time limit. Everything is printed, and the JSON rewritten, as soon as it is known.
"""

from __future__ import annotations

import gc
import math
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from fastmt.config.settings import DistillArgs, resolve_device
from fastmt.engine.fileio import atomic_path, write_json
from fastmt.engine.kernelchoice import loss_module
from fastmt.engine.machine import device_name
from fastmt.errors import FastmtError, UsageError
from fastmt.models.classifier import layer_maps
from fastmt.tasks.classification.step import DistillStep
from fastmt.engine.machine import git_sha
from fastmt.tools.bench import PRESETS, build_models

PHASES = ("teachers_forward", "student_forward", "losses", "backward", "optimizer")
MODES = {"reference": ("reference", "fp32"), "fast": ("fused", "fp16")}
MB = 2**20


def say(text: str = "") -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------------------------------
# One mode: models built once, inputs of any batch size


def _build(preset, mode: str, device, workdir: Path):
    """Step, optimizer and scaler of one mode; the models are made on ``device`` directly."""
    kernels, precision = MODES[mode]
    # Three BERT-base teachers initialised on the CPU and then copied over take many seconds; made
    # under the device context, their weights are drawn on the GPU.
    with torch.device(device):
        teachers, student = build_models(preset, device, workdir)
    losses_mod = loss_module(kernels)
    args = DistillArgs(train="-", dev="-", out="-", teachers="-", student_layers=preset.student_layers,
                       precision=precision, temperature=2.0, kernels=kernels)
    step = DistillStep(student, teachers, layer_maps(preset.student_layers, teachers), args, losses_mod, device)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=True)
    return step, opt, _scaler(mode, device)


def _scaler(mode: str, device) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(torch.device(device).type, enabled=MODES[mode][1] == "fp16")


def _batch(preset, step, batch: int, device, seed: int = 0):
    """Inputs and labels of ``batch`` rows (token ids drawn on the CPU: the same rows on any device)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, preset.vocab, (batch, preset.seq), generator=g).to(device)
    inputs = {step.teachers.keys[0]: {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                      "token_type_ids": torch.zeros_like(ids)}}
    labels = torch.randint(0, preset.classes, (batch,), generator=g).to(device)
    return inputs, labels


def _setup(preset, mode: str, device, workdir: Path, batch: int | None = None):
    """``(step, opt, scaler, inputs, labels)`` of one mode at ``batch`` (default: the preset's)."""
    step, opt, scaler = _build(preset, mode, device, workdir)
    inputs, labels = _batch(preset, step, batch or preset.batch, device)
    return step, opt, scaler, inputs, labels


def _phased_step(step, opt, scaler, inputs, labels) -> dict[str, float]:
    """One step; returns each phase's peak (MB above what was allocated before the step)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    peaks = {}

    def mark(name):
        torch.cuda.synchronize()
        peaks[name] = (torch.cuda.max_memory_allocated() - base) / MB
        torch.cuda.reset_peak_memory_stats()

    torch.cuda.reset_peak_memory_stats()
    t_logits, t_hidden = step.teacher_outputs(inputs)
    mark("teachers_forward")
    s_logits, s_hidden = step.student_forward(inputs)
    mark("student_forward")
    loss, _ = step.losses_from(inputs, labels, s_logits, s_hidden, t_logits, t_hidden)
    mark("losses")
    scaler.scale(loss).backward()
    del loss, s_logits, s_hidden, t_logits, t_hidden
    mark("backward")
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    mark("optimizer")
    return peaks


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    # cuBLAS workspaces and Triton launches report a failed allocation as a plain RuntimeError.
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text or "ALLOC_FAILED" in text)


class _Mode:
    """A mode built once; ``peak_mb(batch)`` runs one step at that batch and returns its absolute peak."""

    def __init__(self, preset, mode: str, device, workdir: Path):
        self.preset, self.mode, self.device = preset, mode, device
        self.step, self.opt, self.scaler = _build(preset, mode, device, workdir)

    def phases(self, batch: int) -> dict[str, float]:
        inputs, labels = _batch(self.preset, self.step, batch, self.device)
        return _phased_step(self.step, self.opt, self.scaler, inputs, labels)

    def peak_mb(self, batch: int) -> float | None:
        """Peak allocated MB of one whole step (optimizer state included), or None when it ran out of memory."""
        try:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated() / MB
            peak = base + max(self.phases(batch).values())
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            if not _is_oom(e):
                raise
            peak = None
        if peak is None:
            # Out here the exception and its frames are gone; what the step held is garbage now.
            self.opt.zero_grad(set_to_none=True)
            self.scaler = _scaler(self.mode, self.device)  # a step cut short may leave it mid-update
            gc.collect()
        torch.cuda.empty_cache()  # every probe starts from the same empty cache
        return peak

    def close(self) -> None:
        self.step = self.opt = self.scaler = None
        gc.collect()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# The batch search


def search_largest(peak_of: Callable[[int], float | None], start: int, budget_mb: float, cap: int,
                   max_probes: int = 6, grain: int | None = None, time_limit_s: float | None = None,
                   clock: Callable[[], float] = time.monotonic, log: Callable[[str], None] | None = None) -> dict:
    """Largest batch (a multiple of ``grain``, at most ``cap``) whose step peak stays within ``budget_mb``.

    ``peak_of(batch)`` runs one step and returns its peak MB, or None when it ran out of memory.
    The next batch tried is where the line through the two largest completed steps meets the budget
    (peak memory is linear in the batch), kept strictly inside the bracket found so far; doubling
    while only one step has completed, bisection when the line points outside the bracket. It stops
    when the bracket is one grain wide, at ``cap``, after ``max_probes`` steps, or before a step that
    would end past ``time_limit_s`` (estimated from the last step, scaled by batch size).
    """
    if grain is None:
        grain = 16 if start % 16 == 0 else 1  # multiples of 16 keep the kernels' shape specialisations
    start = max(grain, min(start, cap) // grain * grain)
    t0 = clock()
    lo, hi = 0, None  # largest batch known to fit; smallest known not to
    done: list[tuple[int, float]] = []  # (batch, peak) of steps that completed
    probes: list[dict] = []
    stopped = "max probes"
    b = start
    while True:
        t = clock()
        peak = peak_of(b)
        seconds = clock() - t
        fits = peak is not None and peak <= budget_mb
        probes.append({"batch": b, "peak_mb": peak, "fits": fits, "s": seconds})
        if log:
            what = "out of memory" if peak is None else f"{peak:9.0f} MB  {'fits' if fits else 'over budget'}"
            log(f"    batch {b:6d}: {what}  ({seconds:.1f} s)")
        if peak is not None:
            done.append((b, peak))
        if fits:
            lo = b
        else:
            hi = b
        nxt = _next_batch(lo, hi, done, budget_mb, cap, grain)
        if nxt is None:
            stopped = "at the cap" if hi is None and lo > 0 else "resolved"
            break
        if len(probes) >= max_probes:
            break
        if time_limit_s is not None:
            expected = seconds * max(1.0, nxt / b)
            if clock() - t0 + expected > time_limit_s:
                stopped = "time limit"
                break
        b = nxt
    return {"largest_batch": lo, "first_failing_batch": hi, "predicted_batch": _predict(done, budget_mb),
            "grain": grain, "cap": cap, "probes": probes, "stopped": stopped, "search_s": clock() - t0}


def _predict(done: list[tuple[int, float]], budget_mb: float) -> float | None:
    """Where the line through the two largest completed steps reaches the budget."""
    if len(done) < 2:
        return None
    (b1, p1), (b2, p2) = sorted(set(done))[-2:]
    if b2 == b1 or p2 <= p1:
        return None
    return b2 + (budget_mb - p2) * (b2 - b1) / (p2 - p1)


def _next_batch(lo: int, hi: int | None, done, budget_mb: float, cap: int, grain: int) -> int | None:
    lower = lo + grain
    upper = cap // grain * grain if hi is None else hi - grain
    if lower > upper:
        return None
    guess = _predict(done, budget_mb)
    if guess is None:
        guess = 2 * max(lo, grain) if hi is None else (lo + hi) / 2
    elif hi is None:
        guess = min(guess, 32 * max(lo, grain))  # a line fitted on small batches, trusted only so far
    elif not lower < guess < upper:
        guess = (lo + hi) / 2  # the line points outside the bracket: it is wrong here, halve instead
    return int(min(max(math.floor(guess / grain) * grain, lower), upper))


# ---------------------------------------------------------------------------------------------------
# Snapshot, chart, report


def compact_snapshot(snapshot: dict, max_bytes: int) -> tuple[bytes | None, int | None]:
    """The allocator snapshot pickled within ``max_bytes``: repeated frame strings shared, then
    stack frames cut to fewer levels until it fits. Returns (bytes, frames kept per stack; None for
    all), or (None, None) when even stacks of no frames do not fit."""
    frames_lists: list[list] = []

    def walk(x):
        if isinstance(x, dict):
            fr = x.get("frames")
            if isinstance(fr, list):
                for f in fr:
                    if isinstance(f, dict):
                        for k, v in f.items():
                            if isinstance(v, str):
                                f[k] = sys.intern(v)  # pickled once, referenced after
                frames_lists.append(fr)
            for v in x.values():
                if isinstance(v, (dict, list)):
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                if isinstance(v, (dict, list)):
                    walk(v)

    walk(snapshot)
    for depth in (None, 24, 8, 3, 0):
        if depth is not None:
            for fr in frames_lists:
                del fr[depth:]
        data = pickle.dumps(snapshot)  # the default protocol, as torch.cuda.memory._dump_snapshot writes
        if len(data) <= max_bytes:
            return data, depth
    return None, None


def plot(report: dict, path: Path) -> None:
    import matplotlib  # optional dependency: fastmt[plot]

    matplotlib.use("Agg")  # before pyplot is imported: no display needed
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if m in report["modes"]]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.38
    for j, mode in enumerate(modes):
        vals = [report["modes"][mode]["phases_mb"][ph] for ph in PHASES]
        ax.bar([i + j * width for i in range(len(PHASES))], vals, width, label=mode)
    ax.set_xticks([i + width / 2 for i in range(len(PHASES))], PHASES, fontsize=8)
    ax.set_ylabel("peak MB above step start")
    ax.set_title(f"fastmt memory --preset {report['preset']} on {report['device']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def format_table(report: dict) -> str:
    modes = [m for m in MODES if m in report["modes"]]
    head = f"{'phase':18s} " + " ".join(f"{m:>12s}" for m in modes)
    lines = [f"fastmt memory --preset {report['preset']} (batch {report['batch']}) on {report['device']}: "
             "peak MB above step start", head, "-" * len(head)]
    for ph in PHASES:
        lines.append(f"{ph:18s} " + " ".join(f"{report['modes'][m]['phases_mb'][ph]:12.1f}" for m in modes))
    lines.append(f"{'whole step (abs.)':18s} " + " ".join(f"{report['modes'][m]['step_peak_mb']:12.1f}" for m in modes))
    if all("largest_batch" in report["modes"][m] for m in modes):
        lines.append(f"{'largest batch':18s} " + " ".join(f"{report['modes'][m]['largest_batch']:12d}" for m in modes)
                     + f"   (budget {report['budget_mb']:.0f} MB)")
    return "\n".join(lines)


def _search_line(mode: str, s: dict, budget_mb: float) -> str:
    lo, hi = s["largest_batch"], s["first_failing_batch"]
    line = f"  {mode}: largest batch within {budget_mb:.0f} MB: {lo}"
    if s["stopped"] == "at the cap":
        line += " (the search's cap; larger batches not tried)"
    elif hi is not None:
        line += f" ({hi} does not fit)" if hi - lo <= s["grain"] else f" ({hi} does not fit; between them not tried)"
    else:
        line += " (no larger batch tried)"
    if s["predicted_batch"] is not None and s["stopped"] != "resolved":
        line += f"; the steps' line reaches the budget at ~{s['predicted_batch']:.0f}"
    line += f"; {len(s['probes'])} steps, {s['search_s']:.1f} s, stopped: {s['stopped']}"
    return line


def run_memory(device_name: str = "cpu", preset_name: str = "tiny", out: str | None = None,
               budget_gb: float | None = None, search_s: float = 10.0, snapshot_mb: float = 15.0) -> dict | None:
    if preset_name not in PRESETS:
        raise UsageError(f"--preset {preset_name}: choose one of {', '.join(PRESETS)}")
    if not search_s >= 0:
        raise UsageError(f"--search-s {search_s}: must be zero or more seconds")
    if not snapshot_mb >= 0:
        raise UsageError(f"--snapshot-mb {snapshot_mb}: must be zero (no snapshot) or more")
    device = resolve_device(device_name)
    if device.type != "cuda":
        print("fastmt memory: peak memory by phase is read from the CUDA allocator, and this run is on the CPU; "
              "use --device cuda on a machine with a GPU")
        return None
    total_mb = torch.cuda.get_device_properties(device).total_memory / MB
    budget_mb = budget_gb * 1024 if budget_gb else 0.9 * total_mb
    return measure(PRESETS[preset_name], preset_name, device, Path(out or "memory-report"), budget_mb,
                   search_s=search_s, snapshot_mb=snapshot_mb)


def measure(preset, preset_name: str, device, out_dir: Path, budget_mb: float, search_s: float = 10.0,
            snapshot_mb: float = 15.0, max_batch: int = 8192, max_probes: int = 6) -> dict:
    """The report: both modes' phases, a snapshot, each mode's largest batch; printed and written as it goes."""
    t_start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"device": device_name(device), "preset": preset_name, "batch": preset.batch,
              "seq": preset.seq, "torch": torch.__version__, "git_sha": git_sha(), "budget_mb": budget_mb,
              "complete": False, "modes": {}}
    json_path, png_path = out_dir / "memory.json", out_dir / "memory.png"
    say(f"fastmt memory --preset {preset_name} (batch {preset.batch} x {preset.seq} tokens) on {report['device']}, "
        f"torch {torch.__version__}; largest-batch budget {budget_mb:.0f} MB")
    chart = ""
    with tempfile.TemporaryDirectory(prefix="fastmt-memory-") as tmp:
        for mode in MODES:
            t0 = time.perf_counter()
            m = _Mode(preset, mode, device, Path(tmp))
            build_s = time.perf_counter() - t0
            step_peak = None
            try:
                m.phases(preset.batch)  # warm-up: optimizer state, kernel and library caches
                phases = m.phases(preset.batch)
                step_peak = m.peak_mb(preset.batch)
            except RuntimeError as e:
                if not _is_oom(e):
                    raise
            if step_peak is None:
                raise FastmtError(f"fastmt memory: {mode} runs out of GPU memory at the preset's batch "
                                  f"({preset.batch}); nothing to compare on this GPU")
            row = {"kernels": MODES[mode][0], "precision": MODES[mode][1], "phases_mb": phases,
                   "peak_mb": max(phases.values()), "step_peak_mb": step_peak, "build_s": build_s}
            report["modes"][mode] = row
            say(f"{mode} ({row['kernels']} losses, {row['precision']}): built in {build_s:.1f} s; "
                "peak MB above step start by phase:")
            say("  " + "  ".join(f"{ph} {phases[ph]:.1f}" for ph in PHASES)
                + f"  | whole step {step_peak:.1f} MB allocated")
            if mode == "fast" and snapshot_mb > 0:
                row["snapshot"] = _snapshot(m, preset.batch, out_dir / "snapshot-fast.pickle", snapshot_mb)
                say(f"  snapshot: {row['snapshot']['note']}")
            write_json(json_path, report)
            chart = _chart(report, png_path)
            s = search_largest(m.peak_mb, preset.batch, budget_mb, max_batch, max_probes=max_probes,
                               time_limit_s=search_s, log=say)
            row["largest_batch"] = s["largest_batch"]
            row["search"] = s
            say(_search_line(mode, s, budget_mb))
            write_json(json_path, report)
            m.close()
            del m
    report["complete"] = True
    report["total_s"] = time.perf_counter() - t_start
    write_json(json_path, report)
    say(format_table(report))
    say(f"report {json_path}{chart}; {report['total_s']:.0f} s in all")
    return report


def _chart(report: dict, path: Path) -> str:
    try:
        plot(report, path)
    except ImportError:
        return " (no chart: matplotlib is not installed)"
    return f", chart {path}"


def _snapshot(m: _Mode, batch: int, path: Path, max_mb: float) -> dict:
    """Record one step's allocations (Python stacks only: C++ frames take long to symbolise) and
    write them for https://pytorch.org/memory_viz, no larger than ``max_mb``."""
    torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python", max_entries=200_000)
    try:
        m.phases(batch)
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    data, depth = compact_snapshot(snap, int(max_mb * MB))
    if data is None:
        return {"path": None, "note": f"not written: over {max_mb:g} MB even without stack frames"}
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    kept = "whole stacks" if depth is None else f"stacks cut to {depth} frames"
    return {"path": path.name, "bytes": len(data), "frames_kept": depth,
            "note": f"{path} ({len(data) / MB:.1f} MB, {kept}; open it at https://pytorch.org/memory_viz)"}
