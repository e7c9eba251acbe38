"""``fastmt bench``: training-step throughput of several modes, side by side in one process.

Each mode trains the same randomly initialised teachers and student (speed does not depend on the
weights) on a fixed synthetic batch for a fixed number of steps: teachers' forward, student forward,
the three losses, backward, AdamW step. The first steps (compilation included) are timed apart as
``compile_s``; the rest give p50/p20/p80 step times. MFU counts the matmul FLOPs of a step over the
matmul peak measured in the same run, in the mode's precision.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

import fastmt.kernels as fused_kernels
from fastmt.config.settings import DistillArgs, resolve_device
from fastmt.engine.fileio import write_json
from fastmt.engine.kernelchoice import loss_module
from fastmt.engine.machine import device_name, git_sha, percentiles
from fastmt.engine.optim import GradBuffers, make_optimizer, optimizer_step
from fastmt.errors import FastmtError, UsageError
from fastmt.models.classifier import Student, Teachers, layer_maps
from fastmt.models.modeldir import quiet_transformers
from fastmt.tasks.classification.step import DistillStep
from fastmt.tasks.demo import build_tokenizer
from fastmt.tools.profile import format_profile, profile_mode


@dataclass(frozen=True)
class Preset:
    teachers: int
    teacher_layers: int
    hidden: int
    heads: int
    student_layers: int
    seq: int
    batch: int
    classes: int = 2
    vocab: int = 30522


PRESETS = {
    "tiny": Preset(teachers=3, teacher_layers=2, hidden=128, heads=4, student_layers=1, seq=32, batch=32, vocab=2000),
    "base": Preset(teachers=3, teacher_layers=12, hidden=768, heads=12, student_layers=4, seq=128, batch=64),
}


@dataclass(frozen=True)
class Mode:
    name: str
    kernels: str = "reference"
    compile: bool = False
    precision: str = "fp32"
    stack: bool = False  # same-architecture teachers as one stacked module
    graphs: bool = False  # compiled graphs replayed as CUDA graphs


def modes_for(device: torch.device) -> dict[str, Mode]:
    """The ladder from the reference to everything on; each step adds one thing."""
    if device.type == "cuda":
        # "eager-fp16" is what a hand-rolled trainer does: autocast fp16, reference losses, no compile.
        # The three the targets compare come first, so a run cut short by a time limit keeps them.
        ladder = [Mode("reference"), Mode("eager-fp16", precision="fp16"),
                  Mode("fast", "fused", True, "fp16", stack=True, graphs=True),
                  Mode("fused", "fused"), Mode("fused+compile", "fused", True),
                  Mode("fused+compile+graphs", "fused", True, graphs=True), Mode("stacked", stack=True),
                  Mode("fast-bf16", "fused", True, "bf16", stack=True, graphs=True)]
    else:
        # On a CPU the Triton kernels only run in the interpreter, so the CPU ladder keeps the
        # reference losses and lets Inductor compile them with the rest of the step.
        ladder = [Mode("reference"), Mode("stacked", stack=True), Mode("bf16", precision="bf16"),
                  Mode("bf16+stacked", precision="bf16", stack=True), Mode("compile", compile=True),
                  Mode("compile+bf16", compile=True, precision="bf16"),
                  Mode("fast", compile=True, precision="bf16", stack=True)]
    return {m.name: m for m in ladder}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Best of a few large square matmuls: the machine's achievable matmul rate in this dtype."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = math.inf
    for _ in range(5 if device.type == "cuda" else 3):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(10 if device.type == "cuda" else 2):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / (10 if device.type == "cuda" else 2))
    return 2 * n**3 / best / 1e12


def step_flops(p: Preset) -> float:
    """Matmul FLOPs of one step: teachers forward, student forward + backward (x3), projections."""

    def encoder(layers: int) -> float:
        tokens = p.batch * p.seq
        per_layer = 2 * tokens * (4 * p.hidden**2 + 2 * p.hidden * 4 * p.hidden) + 4 * p.batch * p.seq**2 * p.hidden
        return layers * per_layer

    projections = 2 * p.teachers * p.student_layers * p.batch * p.seq * p.hidden**2
    return p.teachers * encoder(p.teacher_layers) + 3 * (encoder(p.student_layers) + projections)


def build_models(p: Preset, device: torch.device, workdir: Path):
    """Teachers and student of the preset's shapes, random weights, sharing one small tokenizer."""
    quiet_transformers()
    tok = build_tokenizer(workdir / "tokenizer")

    def encoder(layers: int) -> BertModel:
        cfg = BertConfig(vocab_size=p.vocab, hidden_size=p.hidden, num_hidden_layers=layers,
                         num_attention_heads=p.heads, intermediate_size=4 * p.hidden,
                         max_position_embeddings=max(512, p.seq))
        return BertModel(cfg, add_pooling_layer=False)

    torch.manual_seed(0)
    teachers = Teachers([encoder(p.teacher_layers) for _ in range(p.teachers)], [tok] * p.teachers,
                        [f"teacher{i}" for i in range(p.teachers)], p.classes)
    student = Student(encoder(p.student_layers), tok, p.classes, p.teachers, p.hidden)
    teachers.to(device).eval().requires_grad_(False)
    return teachers, student.to(device)


class PreparedMode:
    """One mode built and warmed up (compiled where it compiles): ready to time step by step."""

    def __init__(self, p: Preset, mode: Mode, device: torch.device, warmup: int, workdir: Path):
        losses_mod = loss_module(mode.kernels)
        self.p, self.mode, self.device = p, mode, device
        # On a GPU the weights are created there: initialising BERT-base-sized encoders on the host
        # and copying them over costs seconds per mode.
        with torch.device(device) if device.type == "cuda" else contextlib.nullcontext():
            teachers, student = build_models(p, device, workdir)
        args = DistillArgs(train="-", dev="-", out="-", teachers="-", student_layers=p.student_layers,
                           device=str(device), precision=mode.precision, temperature=2.0, kernels=mode.kernels,
                           compile=mode.compile, stack_teachers=mode.stack, cuda_graphs=mode.graphs, lr=1e-4)
        step = DistillStep(student, teachers, layer_maps(p.student_layers, teachers), args, losses_mod, device,
                           compile=mode.compile)
        # The training loop's own optimizer and step: fused capturable AdamW on CUDA, the learning
        # rate in a device tensor, unscale + clip + skip-on-overflow, gradients kept in place.
        opt, sched = make_optimizer(student, args, total_steps=10**6, device=device)
        scaler = torch.amp.GradScaler(device.type, enabled=mode.precision == "fp16")
        params = [q for q in student.parameters() if q.requires_grad]
        grads = GradBuffers(params)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(4, p.vocab, (p.batch, p.seq), generator=g).to(device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
        inputs = {teachers.keys[0]: batch}
        labels = torch.randint(0, p.classes, (p.batch,), generator=g).to(device)

        self.step, self.opt, self.sched, self.scaler, self.grads, self.params = step, opt, sched, scaler, grads, params
        self.inputs, self.labels = inputs, labels
        self._optimizer_step = optimizer_step
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        first = None
        for _ in range(max(1, warmup)):
            loss = self.one_step()
            if first is None:
                # Copied out now: under CUDA graphs the next replay reuses the memory the loss lives in.
                first = loss.detach().float().clone()
        sync(device)
        self.compile_s = time.perf_counter() - t0
        self.first_loss = float(first)  # same weights and batch in every mode: comparable across modes
        self.times: list[float] = []

    def backward(self, loss) -> None:
        self.opt.zero_grad(set_to_none=False)
        self.scaler.scale(loss).backward()
        self.grads.adopt()

    def update(self, loss) -> None:
        self._optimizer_step(self.opt, self.scaler, self.params, 1.0, loss)
        self.sched.step()

    def one_step(self):
        loss, _ = self.step(self.inputs, self.labels)
        self.backward(loss)
        self.update(loss)
        return loss

    def time_steps(self, n: int) -> None:
        for _ in range(n):
            t0 = time.perf_counter()
            self.one_step()
            sync(self.device)
            self.times.append(time.perf_counter() - t0)

    def row(self) -> dict:
        p, mode, device = self.p, self.mode, self.device
        peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
        loss = float(self.one_step().detach())  # the mode's one read-back, after timing
        q = percentiles(self.times)
        p50 = q[0]
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mode.precision]
        peak = matmul_peak_tflops(device, dtype)
        return {
            "name": mode.name, "kernels": mode.kernels, "compile": mode.compile, "precision": mode.precision,
            "stacked_teachers": mode.stack, "cuda_graphs": mode.graphs,
            "samples_per_s": p.batch / p50, "tokens_per_s": p.batch * p.seq / p50,
            "step_ms_p50": 1e3 * q[0], "step_ms_p20": 1e3 * q[1], "step_ms_p80": 1e3 * q[2],
            "compile_s": self.compile_s, "peak_mb": peak_mb, "timed_steps": len(self.times),
            "mfu": step_flops(p) / p50 / 1e12 / peak, "matmul_peak_tflops": peak,
            "first_loss": self.first_loss, "final_loss": loss,
            "hidden_products": hidden_products(mode, dtype, device),
        }


def hidden_products(mode: Mode, dtype: torch.dtype, device: torch.device) -> str:
    """Where the mode's hidden-loss GEMMs run: ``torch`` (the reference losses), ``cublas`` (float32 on a
    GPU without TF32: the fused loss hands them to cuBLAS), or the Triton plan: ``half``, ``tf32``,
    ``ieee`` (exact float32, the CPU interpreter)."""
    if mode.kernels != "fused":
        return "torch"
    return fused_kernels.hidden_products(dtype, device)


def run_mode(p: Preset, mode: Mode, device: torch.device, steps: int, warmup: int, workdir: Path,
             profile: bool = False) -> dict:
    """Build, warm up and time one mode on its own (then profile it, if asked)."""
    torch._dynamo.reset()
    m = PreparedMode(p, mode, device, warmup, workdir)
    m.time_steps(steps)
    row = m.row()
    if profile:
        _profile_into(row, m, steps)
    return row


def _profile_into(row: dict, m: "PreparedMode", steps: int) -> None:
    row["profile"] = profile_mode(m, steps=min(steps, 10))
    print(format_profile(row["profile"]), flush=True)


def run_bench(device_name_arg: str = "cpu", preset: str = "tiny", json_out: str | None = None, steps: int | None = None,
              modes: str | None = None, rounds: int | None = None, profile: bool = False) -> dict:
    """The ladder side by side. With ``rounds`` > 1 every mode is built first, then the timed steps
    are dealt out round-robin (``steps / rounds`` per mode per turn), so a slow spell of a shared
    machine lands on every mode alike instead of on whichever ran then. Default: 5 on a CPU; 1 on
    CUDA, where each mode runs alone (its peak memory is its own). ``profile``: after timing, each
    mode's step split into phases and its top kernels (``fastmt.tools.profile``), printed and in the JSON."""
    device = resolve_device(device_name_arg)
    if preset not in PRESETS:
        raise UsageError(f"--preset {preset}: choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    ladder = modes_for(device)
    names = modes.split(",") if modes else list(ladder)
    for n in names:
        if n not in ladder:
            raise UsageError(f"--modes {n}: on {device.type} choose from {', '.join(ladder)}")
    if steps is not None and steps < 1:
        raise UsageError(f"--steps {steps}: must be at least 1")
    if rounds is not None and rounds < 1:
        raise UsageError(f"--rounds {rounds}: must be at least 1")
    steps = steps or (10 if preset == "tiny" else 20)
    rounds = min(rounds or (1 if device.type == "cuda" else 5), steps)
    rows = []
    result = {"device": device_name(device), "preset": preset, "preset_shape": p.__dict__, "torch": torch.__version__,
              "git_sha": git_sha(), "steps": steps, "rounds": rounds, "complete": False, "modes": rows}

    def report(r: dict) -> None:
        print(f"  {r['name']:20s} {r['step_ms_p50']:9.1f} ms/step  {r['samples_per_s']:8.1f} samples/s", flush=True)

    with tempfile.TemporaryDirectory(prefix="fastmt-bench-") as tmp:
        if rounds == 1:
            for n in names:
                try:
                    rows.append(run_mode(p, ladder[n], device, steps, warmup=3, workdir=Path(tmp), profile=profile))
                    report(rows[-1])
                except Exception as e:  # noqa: BLE001 - one broken mode must not cost the others' numbers
                    if isinstance(e, UsageError):
                        raise
                    traceback.print_exc()
                    rows.append({"name": n, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"})
                    print(f"  {n:20s} FAILED: {rows[-1]['error'][:200]}", flush=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                if json_out:  # after every mode: a run stopped by a time limit keeps what it measured
                    write_json(json_out, result)
        else:
            torch._dynamo.reset()
            prepared = []
            for n in names:
                prepared.append(PreparedMode(p, ladder[n], device, 3, Path(tmp)))
                print(f"  {n:20s} built and warmed up in {prepared[-1].compile_s:.1f} s", flush=True)
            share = [steps // rounds + (1 if k < steps % rounds else 0) for k in range(rounds)]
            for k in range(rounds):
                for m in prepared:
                    m.time_steps(share[k])
            for m in prepared:
                rows.append(m.row())
                report(rows[-1])
            if profile:
                for m, row in zip(prepared, rows):
                    _profile_into(row, m, steps)
    result["complete"] = True
    print(format_table(result))
    if json_out:
        write_json(json_out, result)
    failed = [r["name"] for r in rows if "error" in r]
    if failed:
        raise FastmtError(f"fastmt bench: mode(s) {', '.join(failed)} failed (traceback above; the others' results "
                          f"are {'in ' + json_out if json_out else 'printed'})")
    return result


def format_table(result: dict) -> str:
    failed = [r for r in result["modes"] if "error" in r]
    rows = [r for r in result["modes"] if "error" not in r]
    if not rows:
        return "\n".join(f"{r['name']:20s} FAILED: {r['error']}" for r in failed)
    base = next((r for r in rows if r["name"] == "reference"), rows[0])
    head = (f"{'mode':20s} {'samples/s':>10s} {'tokens/s':>10s} {'ms p50':>9s} {'[p20, p80]':>17s} "
            f"{'compile s':>9s} {'peak MB':>8s} {'MFU':>6s} {'vs ref':>7s} {'loss 1st -> last':>17s} hidden GEMMs")
    rounds = result.get("rounds", 1)
    dealt = f", dealt round-robin in {rounds} rounds" if rounds > 1 else ""
    out = [f"fastmt bench --preset {result['preset']} on {result['device']}, torch {result['torch']}, "
           f"{result['steps']} timed steps per mode{dealt}", head, "-" * len(head)]
    for r in rows:
        peak = f"{r['peak_mb']:8.0f}" if r["peak_mb"] is not None else f"{'-':>8s}"
        out.append(f"{r['name']:20s} {r['samples_per_s']:10.1f} {r['tokens_per_s']:10.0f} {r['step_ms_p50']:9.1f} "
                   f"[{r['step_ms_p20']:7.1f}, {r['step_ms_p80']:7.1f}] {r['compile_s']:9.1f} {peak} "
                   f"{100 * r['mfu']:5.1f}% {base['step_ms_p50'] / r['step_ms_p50']:6.2f}x "
                   f"{_loss_pair(r):>17s} {r.get('hidden_products', '-')}")
    out += [f"{r['name']:20s} FAILED: {r['error'][:150]}" for r in failed]
    return "\n".join(out)


def _loss_pair(r: dict) -> str:
    first = r.get("first_loss")  # older result files have only the final loss
    return f"{first:.4f} -> {r['final_loss']:.4f}" if first is not None else f"{r['final_loss']:.4f}"
