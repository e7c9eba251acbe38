"""``fastmt bench --profile``: where a training step's time goes, phase by phase, and which kernels.

A mode already built and warmed up by ``fastmt bench`` runs its step in the same pieces the training
loop runs, with a timestamp between them:

    teachers' forward | student forward | losses | backward | optimizer

Compiled modes run the student's forward and the losses as one graph, so those two are one phase
there ("student forward + losses"). On CUDA the timestamps are CUDA events (device time between
them, nothing synchronises inside the step); on a CPU they are wall-clock reads. The per-phase
figure is the median over the profiled steps; the phases add up to the step (launch gaps included,
in the phase that follows them).

Then ``torch.profiler`` records a few whole steps and lists the top kernels by device time (CUDA), or
the top operators by their own CPU time (CPU).
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

PHASES_EAGER = ("teachers' forward", "student forward", "losses", "backward", "optimizer")
PHASES_COMPILED = ("teachers' forward", "student forward + losses", "backward", "optimizer")


class _Clock:
    """Timestamps between phases: CUDA events on a GPU (read after the step), wall clock on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def spans_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [1e3 * (b - a) for a, b in zip(self.marks, self.marks[1:])]


def profiled_step(m, clock: _Clock) -> list[float]:
    """One training step of a prepared mode (``fastmt.tools.bench.PreparedMode``) in its phases: ms each."""
    st = m.step
    clock.marks.clear()
    if st.cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()
    clock.mark()
    t_logits, t_hidden = st.teacher_outputs(m.inputs)
    clock.mark()
    if m.mode.compile:
        loss, _ = st._student(m.inputs, m.labels, t_logits, t_hidden)
        clock.mark()
    else:
        s_logits, s_hidden = st.student_forward(m.inputs)
        clock.mark()
        loss, _ = st.losses_from(m.inputs, m.labels, s_logits, s_hidden, t_logits, t_hidden)
        clock.mark()
    m.backward(loss)
    clock.mark()
    m.update(loss)
    clock.mark()
    return clock.spans_ms()


def top_ops(m, steps: int = 3, limit: int = 10) -> list[dict]:
    """The ``limit`` kernels (CUDA) or operators (CPU) that took the most time over ``steps`` steps,
    per step: name, ms, calls, share of the recorded total."""
    cuda = m.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            m.one_step()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        if cuda:
            us = getattr(ev, "self_device_time_total", None)
            if us is None:
                us = getattr(ev, "self_cuda_time_total", 0)
        else:
            us = ev.self_cpu_time_total
        if us and us > 0:
            rows.append({"name": ev.key, "ms": us / 1e3 / steps, "calls": ev.count / steps})
    total = sum(r["ms"] for r in rows) or 1.0
    rows.sort(key=lambda r: -r["ms"])
    for r in rows:
        r["share"] = r["ms"] / total
    return rows[:limit]


def profile_mode(m, steps: int = 10, top: int = 10) -> dict:
    """Median ms per phase over ``steps`` steps, their sum, and the top kernels/operators."""
    names = PHASES_COMPILED if m.mode.compile else PHASES_EAGER
    clock = _Clock(m.device)
    samples = [profiled_step(m, clock) for _ in range(max(1, steps))]
    med = torch.tensor(samples, dtype=torch.float64).median(dim=0).values.tolist()
    phases = [{"phase": n, "ms": v} for n, v in zip(names, med)]
    total = sum(med)
    for ph in phases:
        ph["share"] = ph["ms"] / total if total > 0 else 0.0
    return {"mode": m.mode.name, "clock": "CUDA events" if m.device.type == "cuda" else "wall clock",
            "steps": len(samples), "step_ms": total, "phases": phases,
            "top": top_ops(m, limit=top), "top_kind": "kernels by device time" if m.device.type == "cuda"
            else "operators by own CPU time"}


def format_profile(prof: dict) -> str:
    out = [f"profile of '{prof['mode']}': {prof['step_ms']:.1f} ms/step, median of {prof['steps']} steps "
           f"({prof['clock']})"]
    for ph in prof["phases"]:
        bar = "#" * round(40 * ph["share"])
        out.append(f"  {ph['phase']:26s} {ph['ms']:9.2f} ms {100 * ph['share']:5.1f}%  {bar}")
    out.append(f"  top {len(prof['top'])} {prof['top_kind']} (per step):")
    for r in prof["top"]:
        name = r["name"] if len(r["name"]) <= 70 else r["name"][:67] + "..."
        out.append(f"    {r['ms']:9.3f} ms {100 * r['share']:5.1f}% {r['calls']:6.1f}x  {name}")
    return "\n".join(out)
