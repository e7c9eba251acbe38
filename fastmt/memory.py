"""``fastmt memory``: peak GPU memory of a distillation step, phase by phase, reference vs fast.

Phases of one eager step (each phase's peak is read from the CUDA caching allocator, relative to
what was allocated before the step): teachers' forward, student forward, losses, backward,
optimizer. ``reference`` is fp32 with the reference losses; ``fast`` is fp16 with the fused kernels
(phases cannot be told apart inside one compiled graph, so both run eagerly here). Also: the largest
batch whose whole step fits a memory budget, a snapshot of one ``fast`` step that PyTorch's memory
viewer (https://pytorch.org/memory_viz) opens, a JSON report and a PNG bar chart.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from fastmt.errors import UsageError

PHASES = ("teachers_forward", "student_forward", "losses", "backward", "optimizer")
MODES = {"reference": ("reference", "fp32"), "fast": ("fused", "fp16")}


def _setup(preset, mode: str, device, workdir: Path, batch: int | None = None):
    from dataclasses import replace

    from fastmt import losses as reference_losses
    from fastmt.bench import build_models
    from fastmt.models import layer_maps
    from fastmt.step import DistillStep
    from fastmt.train import DistillArgs

    kernels, precision = MODES[mode]
    p = replace(preset, batch=batch) if batch else preset
    teachers, student = build_models(p, device, workdir)
    if kernels == "fused":
        import fastmt.kernels as losses_mod
    else:
        losses_mod = reference_losses
    args = DistillArgs(train="-", dev="-", out="-", teachers="-", student_layers=p.student_layers, precision=precision,
                       temperature=2.0, kernels=kernels)
    step = DistillStep(student, teachers, layer_maps(p.student_layers, teachers), args, losses_mod, device)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, p.vocab, (p.batch, p.seq), generator=g).to(device)
    inputs = {teachers.keys[0]: {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                 "token_type_ids": torch.zeros_like(ids)}}
    labels = torch.randint(0, p.classes, (p.batch,), generator=g).to(device)
    return step, opt, scaler, inputs, labels


def _phased_step(step, opt, scaler, inputs, labels) -> dict[str, float]:
    """One step; returns each phase's peak (MB above what was allocated before the step)."""
    mb = 2**20
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    peaks = {}

    def mark(name):
        torch.cuda.synchronize()
        peaks[name] = (torch.cuda.max_memory_allocated() - base) / mb
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


def _fits(preset, mode: str, device, workdir: Path, batch: int, budget_mb: float) -> bool:
    try:
        step, opt, scaler, inputs, labels = _setup(preset, mode, device, workdir, batch)
        _phased_step(step, opt, scaler, inputs, labels)  # first step: optimizer state appears
        torch.cuda.reset_peak_memory_stats()
        _phased_step(step, opt, scaler, inputs, labels)
        ok = torch.cuda.max_memory_allocated() / 2**20 <= budget_mb
    except torch.cuda.OutOfMemoryError:
        ok = False
    finally:
        step = opt = scaler = inputs = labels = None
        torch.cuda.empty_cache()
    return ok


def largest_batch(preset, mode: str, device, workdir: Path, budget_mb: float, limit: int = 8192) -> int:
    """Largest batch (to within a power-of-two search) whose whole step stays under ``budget_mb``."""
    lo, hi = 0, preset.batch
    while hi <= limit and _fits(preset, mode, device, workdir, hi, budget_mb):
        lo, hi = hi, hi * 2
    while hi - lo > max(1, lo // 16):
        mid = (lo + hi) // 2
        if _fits(preset, mode, device, workdir, mid, budget_mb):
            lo = mid
        else:
            hi = mid
    return lo


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.38
    for j, mode in enumerate(MODES):
        vals = [report["modes"][mode]["phases_mb"][ph] for ph in PHASES]
        ax.bar([i + j * width for i in range(len(PHASES))], vals, width, label=mode)
    ax.set_xticks([i + width / 2 for i in range(len(PHASES))], PHASES, fontsize=8)
    ax.set_ylabel("peak MB above step start")
    ax.set_title(f"fastmt memory --preset {report['preset']} on {report['device']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_memory(device_name: str = "cpu", preset_name: str = "tiny", out: str | None = None,
               budget_gb: float | None = None) -> dict | None:
    from fastmt.bench import PRESETS, git_sha
    from fastmt.io import write_json
    from fastmt.train import resolve_device

    if preset_name not in PRESETS:
        raise UsageError(f"--preset {preset_name}: choose one of {', '.join(PRESETS)}")
    device = resolve_device(device_name)
    if device.type != "cuda":
        print("fastmt memory: peak memory by phase is read from the CUDA allocator, and this run is on the CPU; "
              "use --device cuda on a machine with a GPU")
        return None
    preset = PRESETS[preset_name]
    out_dir = Path(out or "memory-report")
    out_dir.mkdir(parents=True, exist_ok=True)
    total_mb = torch.cuda.get_device_properties(device).total_memory / 2**20
    budget_mb = budget_gb * 1024 if budget_gb else 0.9 * total_mb
    report = {"device": torch.cuda.get_device_name(device), "preset": preset_name, "batch": preset.batch,
              "torch": torch.__version__, "git_sha": git_sha(), "budget_mb": budget_mb, "modes": {}}
    with tempfile.TemporaryDirectory(prefix="fastmt-memory-") as tmp:
        work = Path(tmp)
        for mode in MODES:
            step, opt, scaler, inputs, labels = _setup(preset, mode, device, work)
            _phased_step(step, opt, scaler, inputs, labels)  # warm-up: optimizer state, kernel caches
            phases = _phased_step(step, opt, scaler, inputs, labels)
            if mode == "fast":
                torch.cuda.memory._record_memory_history(max_entries=200_000)
                _phased_step(step, opt, scaler, inputs, labels)
                torch.cuda.memory._dump_snapshot(str(out_dir / "snapshot-fast.pickle"))
                torch.cuda.memory._record_memory_history(enabled=None)
            del step, opt, scaler, inputs, labels
            torch.cuda.empty_cache()
            report["modes"][mode] = {"phases_mb": phases, "peak_mb": max(phases.values()),
                                     "largest_batch": largest_batch(preset, mode, device, work, budget_mb)}
    write_json(out_dir / "memory.json", report)
    plot(report, out_dir / "memory.png")
    head = f"{'phase':18s} " + " ".join(f"{m:>12s}" for m in MODES)
    lines = [f"fastmt memory --preset {preset_name} (batch {preset.batch}) on {report['device']}: peak MB above step start",
             head, "-" * len(head)]
    for ph in PHASES:
        lines.append(f"{ph:18s} " + " ".join(f"{report['modes'][m]['phases_mb'][ph]:12.1f}" for m in MODES))
    lines.append(f"{'largest batch':18s} " + " ".join(f"{report['modes'][m]['largest_batch']:12d}" for m in MODES)
                 + f"   (budget {budget_mb:.0f} MB)")
    print("\n".join(lines))
    print(f"report, chart and snapshot in {out_dir}")
    return report
