"""Co-finetuning, distillation and evaluation: the plain eager PyTorch reference loops.

Every faster path (fused kernels, compiled steps, CUDA graphs) is compared against these loops.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastmt import losses as reference_losses
from fastmt.data import (
    Columns,
    Encoded,
    encode,
    encode_labels,
    iterate_batches,
    label_names_from,
    length_buckets,
    num_batches,
    read_dataset,
)
from fastmt import fastpath, shapes
from fastmt.errors import FastmtError, UsageError
from fastmt.io import append_jsonl
from fastmt.metrics import METRICS
from fastmt.tracking import TRACKERS, Tracker

HEAD_LR_FLOOR = 1e-3  # --head-lr auto: a freshly initialised head learns at least this fast
from fastmt.metrics import report as metric_report
from fastmt.metrics import scores as metric_scores
from fastmt.models import (POOLINGS, Student, StudentSpec, Teachers, build_student, check_tokenizer_on, count_parameters,
                           layer_maps, tokenizer_source)
from fastmt.distributed import World, barrier, check_batch, local_device, max_over_world, mean_over_world, shard, world_from_env
from fastmt.optim import GradBuffers, LinearSchedule, make_optimizer, optimizer_step  # noqa: F401 (re-exported)
from fastmt.step import PRECISIONS, DistillStep, autocast, compile_fn

log = logging.getLogger("fastmt")



# ---------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainArgs:
    """Options shared by every training command (flag names in brackets)."""

    train: str  # [--train]
    dev: str  # [--dev]
    out: str  # [--out]
    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    max_length: int = 128
    seed: int = 42
    device: str = "cpu"
    precision: str = "fp32"
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of all steps spent warming up
    max_grad_norm: float = 1.0
    log_every: int = 20
    eval_batch_size: int = 128
    progress: bool = True
    overwrite: bool = False
    save_every: int = 0  # [--save-every] steps between checkpoints; 0 writes none
    resume: bool = False  # [--resume] continue from DIR/checkpoint
    max_bad_steps: int = 20  # [--max-bad-steps] stop after this many non-finite losses in a row
    compile: bool | None = False  # [--compile] torch.compile(fullgraph=True) the step's forward + loss; None: auto
    group_by_length: bool | None = False  # [--group-by-length] batches of similar lengths (little padding); None: auto
    metric: str = "accuracy"  # [--metric] the dev score that picks the best epoch: accuracy, f1 (macro) or mcc
    report_to: str = "none"  # [--report-to] also send metrics.jsonl's scalars to: none, tensorboard
    text_column: str | None = None  # [--text-column] the text column (default: guessed from the names)
    text_pair_column: str | None = None  # [--text-pair-column] the second text of a pair
    label_column: str | None = None  # [--label-column] the label column
    head_lr: float | str | None = None  # [--head-lr] cofinetune: rate of the fresh shared head and adapters; None: --lr; "auto": max(--lr, 1e-3)
    pooling: str = "cls"  # [--pooling] cofinetune: what the shared head reads: cls (first token), mean (masked mean), auto

    @property
    def columns(self) -> Columns:
        return Columns(self.text_column, self.text_pair_column, self.label_column)

    def __post_init__(self) -> None:
        if self.device == "auto":  # what ran is recorded, not "auto"
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.epochs < 1:
            raise UsageError(f"--epochs {self.epochs}: must be at least 1")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size}: must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr {self.lr}: must be a positive number")
        if self.max_length < 2:
            raise UsageError(f"--max-length {self.max_length}: must be at least 2")
        if self.precision not in PRECISIONS and self.precision != "auto":
            raise UsageError(f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)} or auto")
        if not 0 <= self.warmup < 1:
            raise UsageError(f"--warmup {self.warmup}: a fraction in [0, 1)")
        if self.log_every < 1:
            raise UsageError(f"--log-every {self.log_every}: must be at least 1")
        if self.save_every < 0:
            raise UsageError(f"--save-every {self.save_every}: must be >= 0 (0 writes no checkpoint)")
        if self.metric not in METRICS:
            raise UsageError(f"--metric {self.metric}: choose one of {', '.join(METRICS)}")
        if self.head_lr == "auto":
            self.head_lr = max(self.lr, HEAD_LR_FLOOR)
        if self.head_lr is not None and not (isinstance(self.head_lr, (int, float)) and self.head_lr > 0
                                             and math.isfinite(self.head_lr)):
            raise UsageError(f"--head-lr {self.head_lr}: must be a positive number (or auto)")
        if self.pooling not in POOLINGS + ("auto",):
            raise UsageError(f"--pooling {self.pooling}: choose cls, mean or auto")
        if self.report_to not in TRACKERS:
            raise UsageError(f"--report-to {self.report_to}: choose one of {', '.join(TRACKERS)}")
        if self.max_bad_steps < 1:
            raise UsageError(f"--max-bad-steps {self.max_bad_steps}: must be at least 1")
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite: choose one (continue the run, or start it again)")


KD_TARGETS = ("teachers", "ensemble")


@dataclass
class DistillArgs(TrainArgs):
    teachers: str = ""  # [--teachers] a dir written by cofinetune
    student_layers: int = 0
    student_init: str = "teacher:0"
    temperature: float = 1.0
    weighting: str = "paper"
    kd_target: str = "teachers"  # teachers: one KL term per teacher (MT-BERT); ensemble: one KL to the averaged logits
    hidden_loss: str = "tokens"
    weight_hidden: bool = False  # also weight the hidden loss per example by the teacher weights
    kernels: str = "reference"
    cuda_graphs: bool | None = False  # None: on with compile on CUDA (fastmt.fastpath)
    alpha_task: float = 1.0
    alpha_kd: float = 1.0
    alpha_hidden: float = 1.0
    teacher_subset: list[int] | None = None  # distil from these teachers only
    stack_teachers: bool | None = False  # run teachers of one architecture as one stacked module (fastmt.stacked); None: auto
    cache_teachers: str | None = None  # [--cache-teachers DIR|auto|off] teachers' outputs stored once (fastmt.cache)
    cache_budget_gb: float = 8.0  # [--cache-budget-gb] the most disk the teacher cache may take

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.student_layers < 1:
            raise UsageError(f"--student-layers {self.student_layers}: must be at least 1")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise UsageError(f"--temperature {self.temperature}: must be a positive number")
        if self.weighting not in reference_losses.SCHEMES:
            raise UsageError(f"--weighting {self.weighting}: choose one of {', '.join(reference_losses.SCHEMES)}")
        if self.kd_target not in KD_TARGETS:
            raise UsageError(f"--kd-target {self.kd_target}: choose one of {', '.join(KD_TARGETS)}")
        if self.hidden_loss not in ("tokens", "cls", "none"):
            raise UsageError(f"--hidden-loss {self.hidden_loss}: choose tokens, cls or none")
        if self.kernels not in ("fused", "reference", "auto"):
            raise UsageError(f"--kernels {self.kernels}: choose fused, reference or auto")
        if self.cuda_graphs and not self.device.startswith("cuda"):
            raise UsageError(f"--cuda-graphs: CUDA graphs need --device cuda (this run is on {self.device})")
        if self.cuda_graphs and self.compile is None:
            self.compile = True  # graphs replay the compiled step
        if self.cuda_graphs and not self.compile:
            raise UsageError("--cuda-graphs replays the compiled step: add --compile")
        if self.cache_teachers is not None and not str(self.cache_teachers).strip():
            raise UsageError("--cache-teachers: give a dir, or auto")
        if not (self.cache_budget_gb >= 0 and math.isfinite(self.cache_budget_gb)):
            raise UsageError(f"--cache-budget-gb {self.cache_budget_gb}: must be a number >= 0")
        for name in ("alpha_task", "alpha_kd", "alpha_hidden"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise UsageError(f"--{name.replace('_', '-')} {v}: must be a number >= 0")


# ---------------------------------------------------------------------------------------------------
# Small pieces shared by the loops


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        return torch.device(name)
    raise UsageError(f"--device {name}: choose cpu or cuda")


def check_out_dir(out: str, overwrite: bool, resume: bool = False) -> Path:
    """Refuse an --out that holds a run (unless --overwrite, or --resume with a checkpoint there)."""
    from fastmt.checkpoint import checkpoint_meta

    from fastmt.io import recover

    d = Path(out)
    if d.exists() and not d.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if d.is_dir():
        recover(d)  # a save killed half-way: finished or dropped before anything looks at the dir
    meta = checkpoint_meta(d) if d.is_dir() else None
    finished = d.is_dir() and any((d / f).exists() for f in ("config.json", "model.safetensors"))
    if resume:
        if meta is None:
            what = "holds a finished run" if finished else "has no checkpoint"
            raise UsageError(f"--resume: {out} {what}; nothing to resume (runs write checkpoints with --save-every STEPS)")
        return d
    if meta is not None and not overwrite:
        at = f"checkpoint at step {meta.get('step')}" if meta.get("step") is not None else "a checkpoint"
        raise UsageError(f"--out {out}: holds an interrupted run ({at}); "
                         "pass --resume to continue it, or --overwrite to start again")
    if finished and not overwrite:
        raise UsageError(f"--out {out}: already holds a run; choose another dir or pass --overwrite")
    return d


def start_out_dir(d: Path, resume_metrics_bytes: int | None = None) -> None:
    """Create the run dir once every input has been checked. A new run starts a new metrics.jsonl and
    drops any old checkpoint; a resumed one cuts metrics.jsonl back to where its checkpoint was taken."""
    import shutil

    from fastmt.checkpoint import checkpoint_dir

    d.mkdir(parents=True, exist_ok=True)
    for stray in checkpoint_dir(d).glob(".state.pt.*.tmp"):  # left by a kill in the middle of a checkpoint
        stray.unlink(missing_ok=True)
    metrics = d / "metrics.jsonl"
    if resume_metrics_bytes is None:
        metrics.unlink(missing_ok=True)
        shutil.rmtree(checkpoint_dir(d), ignore_errors=True)
    elif metrics.exists():
        with open(metrics, "r+b") as f:
            f.truncate(resume_metrics_bytes)


class TrainingStopped(FastmtError):
    """The loss stayed non-finite for --max-bad-steps steps in a row (exit status 1)."""


@dataclass
class Splits:
    label_names: list[str]
    train_labels: list[int]
    dev_labels: list[int]
    train_enc: dict[str, Encoded]
    dev_enc: dict[str, Encoded]
    buckets: list[int]
    train_path: str
    dev_path: str


def prepare_splits(train: str, dev: str, tokenizers: Iterable, max_length: int, label_names: list[str] | None = None,
                   columns: Columns | None = None) -> Splits:
    """Read both sources, map labels, and tokenize once per distinct tokenizer."""
    from fastmt.data import tokenizer_key

    train_ds = read_dataset(train, columns=columns)
    dev_ds = read_dataset(dev, columns=columns)
    if label_names is None:
        label_names = train_label_names(train_ds)
    if len(label_names) < 2:
        raise UsageError(f"{train}: only one label ({label_names[0]!r}) in the training set; need at least two")
    train_labels = encode_labels(train_ds, label_names)
    dev_labels = encode_labels(dev_ds, label_names)
    train_enc, dev_enc = {}, {}
    for tok in tokenizers:
        key = tokenizer_key(tok)
        if key not in train_enc:
            check_tokenizer_on(tok, train_ds.text_a[:64], tokenizer_source(tok), f"the training text ({train})")
            train_enc[key] = encode(tok, train_ds, max_length)
            dev_enc[key] = encode(tok, dev_ds, max_length)
    return Splits(label_names, train_labels, dev_labels, train_enc, dev_enc, length_buckets(max_length), str(train), str(dev))


def host_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``. A host tensor bound for a GPU goes through pinned memory, so the copy is
    truly asynchronous: the host queues it and goes on preparing the next step instead of waiting
    for the GPU to reach the copy (a copy from pageable memory holds the host until it is done)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def train_label_names(ds) -> list[str]:
    """The class names: the source's own (a datasets ClassLabel, in its order), else the distinct labels."""
    return list(ds.label_names) if ds.label_names else label_names_from(ds.labels)


def to_device(inputs: dict[str, dict[str, torch.Tensor]], device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    return {k: {n: host_to(t, device) for n, t in v.items()} for k, v in inputs.items()}


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False, unit="step")


# ---------------------------------------------------------------------------------------------------
# Prediction


@torch.inference_mode()
def teacher_logits(teachers: Teachers, enc: dict[str, Encoded], n: int, batch_size: int, buckets, device, precision="fp32",
                   timings: list[float] | None = None) -> torch.Tensor:
    """Logits of every teacher over a whole set: ``[T, n, C]`` (float32, on the CPU).

    When ``timings`` is a list, the seconds each teacher spent are added into it (one entry per teacher).
    """
    teachers.eval()
    out = torch.empty(len(teachers), n, teachers.num_labels)
    if timings is not None:
        timings[:] = [0.0] * len(teachers)
    for batch in iterate_batches(enc, [0] * n, batch_size, buckets, shuffle=False, group_by_length=True):
        inputs = to_device(batch.inputs, device)
        for i, key in enumerate(teachers.keys):
            t0 = time.perf_counter()
            with autocast(device, precision):
                logits, _ = teachers.forward_teacher(i, inputs[key])
            out[i, batch.index] = logits.float().cpu()
            if timings is not None:
                timings[i] += time.perf_counter() - t0
    return out


@torch.inference_mode()
def student_logits(student: Student, enc: dict[str, Encoded], n: int, batch_size: int, buckets, device, precision="fp32") -> torch.Tensor:
    student.eval()
    out = torch.empty(n, student.num_labels)
    for batch in iterate_batches({student.key: enc[student.key]}, [0] * n, batch_size, buckets, shuffle=False,
                                 group_by_length=True):
        with autocast(device, precision):
            logits, _ = student(to_device(batch.inputs, device)[student.key])
        out[batch.index] = logits.float().cpu()
    return out


def accuracy(logits: torch.Tensor, labels: list[int] | torch.Tensor) -> float:
    labels = torch.as_tensor(labels)
    return float((logits.argmax(-1) == labels).float().mean()) if len(labels) else float("nan")


# ---------------------------------------------------------------------------------------------------
# The loop


@dataclass
class RunResult:
    out: str
    best_dev_accuracy: float  # dev accuracy at the best epoch
    best_epoch: int
    train_s: float
    train_samples_per_s: float
    steps: int
    extra: dict = field(default_factory=dict)
    metric: str = "accuracy"  # what chose the best epoch
    best_dev_score: float = float("nan")  # that metric at the best epoch


@dataclass
class _Progress:
    """How far a run got, for the message when a write fails (a full disk)."""

    epoch: int = 0
    step: int = 0
    trained: bool = False  # every training step of the last epoch is done
    checkpoint: int | None = None  # step of the checkpoint on disk
    saved_epoch: int = 0  # epoch of the model this run saved last


def _fit(model: nn.Module, args: TrainArgs, splits: Splits, keys: list[str], device: torch.device, loss_fn, evaluate,
         save_best: Callable[[], None], out_dir: Path, desc: str, world: World | None = None, run_config: dict | None = None,
         faults: Callable[[], str] | None = None) -> RunResult:
    """:func:`_fit_loop`, with a failed write (a full disk) told in one line: what was written and
    what is kept, and how to go on (``--resume`` where a checkpoint was written)."""
    from fastmt.errors import WriteFailed

    progress = _Progress()
    try:
        return _fit_loop(model, args, splits, keys, device, loss_fn, evaluate, save_best, out_dir, desc, world,
                         run_config, faults, progress)
    except WriteFailed as e:
        raise _write_failed(e, progress, args, out_dir, desc) from e


def _write_failed(e, progress: _Progress, args: TrainArgs, out_dir: Path, desc: str) -> FastmtError:
    from fastmt.checkpoint import checkpoint_dir
    from fastmt.errors import WriteFailed, size_text

    try:  # the reason in the log too, where the disk still takes a line
        append_jsonl(out_dir / "metrics.jsonl", {"event": "stopped", "epoch": progress.epoch, "step": progress.step,
                                                 "reason": "write failed", "path": str(e.path), "error": e.error.strerror})
    except (WriteFailed, OSError):
        pass
    ck = checkpoint_dir(out_dir)
    if e.path == out_dir:
        if progress.trained:
            told = f"training finished (epoch {progress.epoch} of {args.epochs}) but its model could not be saved"
        else:
            told = f"the model of epoch {progress.epoch} (of {args.epochs}) could not be saved, so training stopped"
    elif ck in e.path.parents:
        told = f"the checkpoint of step {progress.step} could not be written, so training stopped"
    else:
        told = f"training stopped at step {progress.step} (epoch {progress.epoch} of {args.epochs})"
    if progress.saved_epoch:
        kept = f"{out_dir} holds the model of epoch {progress.saved_epoch}"
    elif (out_dir / "config.json").is_file():
        kept = f"the model that was in {out_dir} is still there, unchanged"
    else:
        kept = f"{out_dir} holds no model yet"
    if progress.checkpoint is not None:
        kept += f", and the checkpoint of step {progress.checkpoint} ({ck}) is kept"
    room = f"free {size_text(e.need)} or more there" if e.no_space and e.need else (
        "free some space there" if e.no_space else "fix that")
    if progress.checkpoint is not None:
        then = f"{room}, then run the same command with --resume: it goes on from step {progress.checkpoint}"
    else:
        then = f"{room}, then run the command again (--save-every STEPS writes checkpoints that --resume continues from)"
    return FastmtError(f"{desc}: {e}; {told}. Nothing already on disk was lost; {kept}. To recover, {then}")


def _fit_loop(
    model: nn.Module,
    args: TrainArgs,
    splits: Splits,
    keys: list[str],
    device: torch.device,
    loss_fn: Callable[[object], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    evaluate: Callable[[], dict[str, float]],
    save_best: Callable[[], None],
    out_dir: Path,
    desc: str,
    world: World | None,
    run_config: dict | None,
    faults: Callable[[], str] | None,
    progress: _Progress,
) -> RunResult:
    """Epoch loop: AdamW + schedule + clipping, dev after each epoch, best model saved, metrics logged.

    With several processes, each trains on its shard of every global batch; only the first writes.
    ``--save-every`` checkpoints the whole loop state; ``--resume`` continues from it exactly.
    ``faults()`` (optional) describes non-finite inputs seen so far, for the logs and the stop message.
    ``progress`` is kept up to date for the message of a failed write.
    """
    from fastmt.checkpoint import checkpoint_dir, fault_after_step, load_checkpoint, rng_state, save_checkpoint, set_rng_state

    world = world or World()
    run_config = dict(run_config or asdict(args))
    n = len(splits.train_labels)
    steps_per_epoch = num_batches(n, args.batch_size)
    total = steps_per_epoch * args.epochs
    opt, sched = make_optimizer(model, args, total, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    gen = torch.Generator().manual_seed(args.seed)
    metrics = out_dir / "metrics.jsonl"
    params = [p for p in model.parameters() if p.requires_grad]
    grads = GradBuffers(params)  # one address per gradient for the whole run (CUDA-graph safe)
    zero = lambda: torch.zeros((), dtype=torch.int64, device=device)  # noqa: E731
    best, best_epoch, step = -1.0, 0, 0
    best_accuracy = float("nan")  # dev accuracy at the best epoch (which --metric chooses)
    skipped = zero()  # skipped optimizer steps (fp16 overflow, non-finite loss), counted on the device
    bad_run, worst_run, bad_total = zero(), zero(), zero()  # non-finite losses: current streak, longest, all
    train_time, samples = 0.0, 0
    window_loss, window_n, window_good = torch.zeros((), device=device), 0, zero()
    window_parts: dict[str, torch.Tensor] = {}
    start_epoch, done_in_epoch, epoch_gen_state = 1, 0, None
    last_checkpoint: int | None = None
    last_detail = ""
    if args.resume:
        ck = load_checkpoint(out_dir, run_config)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        c = ck["counters"]
        step, best, best_epoch = c["step"], c["best"], c["best_epoch"]
        best_accuracy = c.get("best_accuracy", best)
        train_time, samples, window_n = c["train_time"], c["samples"], c["window_n"]
        skipped, bad_run, worst_run, bad_total, window_good = (
            torch.tensor(c[k], dtype=torch.int64, device=device) for k in ("skipped", "bad_run", "worst_run", "bad_total", "window_good"))
        window_loss = c["window_loss"].to(device)
        window_parts = {k: v.to(device) for k, v in c["window_parts"].items()}
        start_epoch, done_in_epoch, epoch_gen_state = c["epoch"], c["done_in_epoch"], ck["epoch_gen_state"]
        last_checkpoint = progress.checkpoint = step
        if world.is_main:
            start_out_dir(out_dir, c["metrics_bytes"])
        set_rng_state(ck["rng"], device)
        log.info("%s: resuming %s at step %d (epoch %d, batch %d of %d)", desc, out_dir, step, start_epoch, done_in_epoch, steps_per_epoch)
        del ck
    elif world.is_main:
        start_out_dir(out_dir)
    barrier(world)

    def checkpoint(epoch: int, done: int) -> None:
        nonlocal last_checkpoint
        if world.is_main:
            counters = {
                "step": step, "epoch": epoch, "done_in_epoch": done, "best": best, "best_epoch": best_epoch, "best_accuracy": best_accuracy,
                "train_time": train_time, "samples": samples, "window_n": window_n,
                "skipped": int(skipped), "bad_run": int(bad_run), "worst_run": int(worst_run), "bad_total": int(bad_total),
                "window_good": int(window_good), "window_loss": window_loss.detach().cpu(),
                "window_parts": {k: v.detach().cpu() for k, v in window_parts.items()},
                "metrics_bytes": metrics.stat().st_size if metrics.exists() else 0,
            }
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "scaler": scaler.state_dict(), "rng": rng_state(device), "epoch_gen_state": epoch_gen_state,
                     "counters": counters, "run_config": run_config}
            save_checkpoint(out_dir, state, {"step": step, "epoch": epoch, "batch_in_epoch": done, "steps_per_epoch": steps_per_epoch})
        last_checkpoint = progress.checkpoint = step
        barrier(world)

    def stop_if_diverged(epoch: int) -> None:
        streak = int(worst_run)
        if streak < args.max_bad_steps:
            return
        where = (f"last good checkpoint: {checkpoint_dir(out_dir)} (step {last_checkpoint}); fix the cause, then --resume"
                 if last_checkpoint is not None else "no checkpoint was written (--save-every STEPS writes them)")
        cause = faults() if faults else ""
        if world.is_main:
            append_jsonl(metrics, {"event": "stopped", "epoch": epoch, "step": step, "reason": "non-finite loss",
                                   "bad_steps_in_a_row": streak, "bad_steps": int(bad_total), "detail": cause})
        raise TrainingStopped(
            f"the loss was not finite for {streak} steps in a row (--max-bad-steps {args.max_bad_steps}, at step {step}); "
            f"stopped, those steps changed no weight. {cause + '. ' if cause else ''}{where}. "
            f"Usual fixes: a lower --lr, --precision fp32, or checking the teachers and the data")

    tracker = Tracker(args.report_to, out_dir, enabled=world.is_main)  # flushed after every row
    for epoch in range(start_epoch, args.epochs + 1):
        progress.epoch, progress.step = epoch, step
        resuming = epoch == start_epoch and epoch_gen_state is not None
        if resuming:
            gen.set_state(epoch_gen_state)
        else:
            epoch_gen_state = gen.get_state()  # the epoch's shuffle is drawn from this state
            done_in_epoch = 0
        model.train()
        bar = progress_bar(steps_per_epoch, f"{desc} epoch {epoch}/{args.epochs}", args.progress)
        bar.update(done_in_epoch)
        done = done_in_epoch
        t_mark = time.perf_counter()  # training time is read at the logging interval, where the host waits anyway

        def lap() -> None:
            nonlocal train_time, t_mark
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            train_time, t_mark = train_time + (now - t_mark), now

        for batch in iterate_batches(encodings_for(splits, keys), splits.train_labels, args.batch_size, splits.buckets, True, gen,
                                     skip_batches=done_in_epoch, group_by_length=bool(args.group_by_length)):
            part = shard(batch.inputs, batch.labels, world)
            inputs = to_device(part.inputs, device)
            labels = host_to(part.labels, device)
            if world.size > 1:
                # Weighted by this process's share of the global batch (fastmt.distributed): the
                # averaged gradients, and the means over processes logged below, are the global batch's.
                loss, parts = loss_fn(inputs, labels, shard=part)
            elif getattr(loss_fn, "takes_index", False):
                loss, parts = loss_fn(inputs, labels, batch.index)
            else:
                loss, parts = loss_fn(inputs, labels)
            opt.zero_grad(set_to_none=False)
            scaler.scale(loss).backward()
            grads.adopt()
            skipped += optimizer_step(opt, scaler, params, args.max_grad_norm, loss)
            sched.step()
            step += 1
            done += 1
            samples += len(batch.labels)
            ok = torch.isfinite(loss.detach())
            bad_run = (bad_run + 1) * (~ok)
            worst_run = torch.maximum(worst_run, bad_run)
            bad_total += ~ok
            window_good += ok
            window_loss += torch.where(ok, loss.detach().float(), 0.0)
            for k, v in parts.items():
                v = v.detach().float()
                window_parts[k] = window_parts.get(k, 0.0) + torch.where(torch.isfinite(v), v, 0.0)
            window_n += 1
            bar.update(1)
            log_now = step % args.log_every == 0 or step == total
            if (device.type != "cuda" and world.size == 1) or log_now:  # else read at the logging interval only
                if world.size > 1:
                    worst_run = max_over_world(worst_run, world)
                stop_if_diverged(epoch)
            if log_now:
                lap()
                # The one host sync of the logging interval.
                # Means over the finite steps of the window (and over processes).
                good = float(mean_over_world(window_good.float(), world))
                window_loss = mean_over_world(window_loss, world)
                window_parts = {k: mean_over_world(v, world) for k, v in window_parts.items()}
                avg = float(window_loss) / good if good else float("nan")
                sps = samples / max(train_time, 1e-9)
                row = {"event": "train", "epoch": epoch, "step": step, "loss": avg, "lr": sched.get_last_lr()[0], "samples_per_s": sps}
                row.update({f"loss_{k}": float(v) / good if good else float("nan") for k, v in window_parts.items()})
                if scaler.is_enabled() or int(skipped):
                    row["skipped_steps"] = int(skipped)
                if scaler.is_enabled():
                    row["loss_scale"] = scaler.get_scale()
                if int(bad_total):
                    row["nonfinite_loss_steps"] = int(bad_total)
                detail = faults() if faults else ""
                if detail:
                    row["faults"] = detail
                    if detail != last_detail:
                        log.warning("%s step %d: %s", desc, step, detail)
                    last_detail = detail
                if world.is_main:
                    append_jsonl(metrics, row)
                    tracker.log(row)
                bar.set_postfix(loss=f"{avg:.4f}", sps=f"{sps:.0f}")
                window_loss, window_n, window_good = torch.zeros((), device=device), 0, zero()
                window_parts = {}
            progress.step = step
            if args.save_every and step % args.save_every == 0 and int(bad_run) == 0:
                lap()
                checkpoint(epoch, done)
                t_mark = time.perf_counter()  # the checkpoint's own time is not training time
            fault_after_step(step)
        lap()
        bar.close()
        progress.trained = epoch == args.epochs
        scores = evaluate()  # every process: the same replica on the same dev set
        score = scores[f"dev_{args.metric}"]
        improved = best_epoch == 0 or score > best
        if improved:
            best, best_epoch, best_accuracy = score, epoch, scores["dev_accuracy"]
            if world.is_main:
                save_best()
                progress.saved_epoch = epoch
        if world.is_main:
            row = {"event": "eval", "epoch": epoch, "step": step, **scores, "best": improved}
            append_jsonl(metrics, row)
            tracker.log(row)
            log.info("%s epoch %d: %s", desc, epoch, ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        barrier(world)
    sps = samples / max(train_time, 1e-9)
    if world.is_main:
        append_jsonl(metrics, {"event": "done", "best_epoch": best_epoch, "best_dev_accuracy": best_accuracy,
                               "metric": args.metric, "best_dev_score": best, "train_s": train_time,
                               "samples_per_s": sps, "steps": step, "skipped_steps": int(skipped)})
        tracker.close()
        if args.save_every:
            import shutil

            shutil.rmtree(checkpoint_dir(out_dir), ignore_errors=True)  # finished: the saved model is the result
    return RunResult(str(out_dir), best_accuracy, best_epoch, train_time, sps, step, metric=args.metric, best_dev_score=best)


def encodings_for(splits: Splits, keys: list[str]) -> dict[str, Encoded]:
    return {k: splits.train_enc[k] for k in dict.fromkeys(keys)}


# ---------------------------------------------------------------------------------------------------
# Commands


def cofinetune(teacher_sources: list[str], args: TrainArgs) -> RunResult:
    """Fine-tune the teachers jointly through one shared head: ``L = sum_i CE(y, z_i)``."""
    if not teacher_sources:
        raise UsageError("cofinetune needs at least one --teacher")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("cofinetune runs in one process; launch it without torchrun")
    device = resolve_device(args.device)
    out_dir = check_out_dir(args.out, args.overwrite, args.resume)
    seed_everything(args.seed)
    label_names = train_label_names(read_dataset(args.train, columns=args.columns))
    pooled = ""
    if args.pooling == "auto":
        from fastmt.models import choose_pooling

        args.pooling, why = choose_pooling(teacher_sources)
        pooled = f"pooling {args.pooling} ({why})"  # told on the path line, once everything has loaded
    teachers = Teachers.from_pretrained_encoders(teacher_sources, len(label_names), args.pooling)
    splits = prepare_splits(args.train, args.dev, teachers.tokenizers, args.max_length, label_names, args.columns)
    auto_compile = args.compile is None
    path = fastpath.resolve(args, device, _total_steps(args, splits))
    compiled = shapes.plan(args, encodings_for(splits, teachers.keys), len(splits.train_labels), None, splits.buckets,
                           auto_compile, functions=1)
    path = ", ".join(x for x in (path, compiled, pooled) if x)
    splits.buckets = fastpath.widths(args, splits.buckets)
    teachers.to(device)
    run_config = {"command": "cofinetune", "teachers": list(teacher_sources), **asdict(args)}
    _check_resume(args, out_dir, run_config)
    fastpath.report("cofinetune", path)

    def loss_fn(inputs, labels):
        with autocast(device, args.precision):
            logits = teachers(inputs)  # [T, N, C]
        per_teacher = torch.stack([F.cross_entropy(z.float(), labels) for z in logits])
        return per_teacher.sum(), {f"ce_{i}": v for i, v in enumerate(per_teacher)}

    if args.compile:
        from fastmt.step import _install_output_hooks

        _install_output_hooks(list(teachers.encoders), device)
        # One graph per length bucket (forward + the T losses); backward is compiled with it.
        loss_fn = compile_fn(loss_fn)

    def evaluate():
        logits = teacher_logits(teachers, splits.dev_enc, len(splits.dev_labels), args.eval_batch_size, splits.buckets, device, args.precision)
        scores = {f"dev_accuracy_{i}": accuracy(z, splits.dev_labels) for i, z in enumerate(logits)}
        # The ensemble's scores pick the best epoch.
        scores.update({f"dev_{k}": v for k, v in metric_scores(logits.mean(0), splits.dev_labels, len(splits.label_names)).items()})
        return scores

    def save_best():
        teachers.save(out_dir, run_config, splits.label_names)

    return _fit(teachers, args, splits, teachers.keys, device, loss_fn, evaluate, save_best, out_dir, "cofinetune",
                run_config=run_config)


def distill(args: DistillArgs) -> RunResult:
    """Train the student from the teachers: ``a_task CE + a_kd L_kd + a_hid L_hid`` (SPEC §1)."""
    device = resolve_device(args.device)
    world = world_from_env(device)
    device = local_device(device, world)
    check_batch(args.batch_size, world)
    teachers, tcfg = Teachers.load(args.teachers)
    label_names = list(tcfg["label_names"])
    all_teachers = teachers
    if args.teacher_subset is not None:
        teachers = _subset(teachers, args.teacher_subset)
    seed_everything(args.seed)  # the student's fresh parameters depend on --seed only
    student, init_info = build_student(StudentSpec(args.student_layers, args.student_init), teachers, init_from=all_teachers)
    maps = layer_maps(args.student_layers, teachers)
    use_teachers = args.alpha_kd > 0 or (args.hidden_loss != "none" and args.alpha_hidden > 0)
    if args.hidden_loss == "tokens" and use_teachers:
        for i, key in enumerate(teachers.keys):
            if key != student.key:
                raise UsageError(
                    f"--hidden-loss tokens: teacher {i} ({teachers.names[i]}) tokenizes differently from the "
                    f"student, so token positions do not line up; use --hidden-loss cls (or none)"
                )
    out_dir = check_out_dir(args.out, args.overwrite, args.resume)
    splits = prepare_splits(args.train, args.dev, [student.tokenizer, *teachers.tokenizers], args.max_length, label_names,
                            args.columns)
    from fastmt.stacked import teacher_groups

    stackable = use_teachers and any(len(g) > 1 for g in teacher_groups(teachers))
    auto_compile = args.compile is None
    path = fastpath.resolve(args, device, _total_steps(args, splits), stackable, world.size > 1)
    keys = [student.key, *teachers.keys] if use_teachers else [student.key]
    # Two compiled functions: the teachers' forward and the student's forward + loss.
    compiled = shapes.plan(args, encodings_for(splits, keys), len(splits.train_labels), world, splits.buckets,
                           auto_compile, functions=2)
    path = ", ".join(x for x in (path, compiled) if x)
    splits.buckets = fastpath.widths(args, splits.buckets)
    losses_mod = _loss_module(args.kernels)
    teachers.to(device).eval().requires_grad_(False)
    student.to(device)
    run_config = {"command": "distill", **asdict(args), "layer_maps": maps, "student_init_info": init_info}
    fit_config = {k: v for k, v in run_config.items() if k != "student_init_info"}
    _check_resume(args, out_dir, fit_config)
    fastpath.report("distill", path)
    loss_fn = DistillStep(student, teachers, maps, args, losses_mod, device, compile=args.compile)
    if args.cache_teachers is not None and use_teachers:
        loss_fn.cache = _teacher_cache(args, splits, student, teachers, maps, world)
    if not loss_fn.want_hidden:
        # No hidden loss: the projections get no gradient, so they are not trained (nor synchronised).
        student.proj_weight.requires_grad_(False)
        student.proj_bias.requires_grad_(False)
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        # Forward goes through the wrapper so gradients are averaged across processes. The
        # projections are used after forward, in the loss; their gradient hooks still fire once.
        loss_fn.student_call = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)

    def evaluate():
        logits = student_logits(student, splits.dev_enc, len(splits.dev_labels), args.eval_batch_size, splits.buckets, device, args.precision)
        return {f"dev_{k}": v for k, v in metric_scores(logits, splits.dev_labels, len(splits.label_names)).items()}

    def save_best():
        student.save(out_dir, run_config, label_names, {"layer_maps": maps, "teachers": teachers.names})

    result = _fit(student, args, splits, keys, device, loss_fn, evaluate, save_best, out_dir, "distill", world,
                  run_config=fit_config, faults=loss_fn.describe_faults)
    result.extra["parameters"] = count_parameters(student.encoder) + count_parameters(student.head)
    return result


def _check_resume(args: TrainArgs, out_dir: Path, run_config: dict) -> None:
    """With --resume, refuse changed settings before anything else is said or built."""
    if args.resume:
        from fastmt.checkpoint import load_checkpoint

        state = load_checkpoint(out_dir, run_config, mmap=True)
        counters = state.get("counters")
        _check_metrics(out_dir / "metrics.jsonl", int(counters.get("metrics_bytes", 0)) if isinstance(counters, dict) else 0)


def _check_metrics(path: Path, size: int) -> None:
    """--resume cuts metrics.jsonl back to ``size``, its length at the checkpoint: refuse a file that
    is shorter (it would be padded with zeros) or whose lines up to there are not whole JSON rows."""
    import json

    if size <= 0:
        return
    fix = "restore it from a copy, or start again with --overwrite"
    try:
        with open(path, "rb") as f:
            head = f.read(size)
    except FileNotFoundError:
        raise UsageError(f"--resume: {path} is missing (the checkpoint was taken after {size} bytes of it); {fix}") from None
    except OSError as e:
        raise UsageError(f"--resume: {path} cannot be read ({e.strerror}); {fix}") from None
    if len(head) < size:
        raise UsageError(f"--resume: {path} is truncated ({len(head)} bytes; it had {size} when the checkpoint was "
                         f"taken); {fix}")
    lines = head.split(b"\n")
    if lines[-1]:
        raise UsageError(f"--resume: {path}:{len(lines)} is not a whole metrics row (damaged); {fix}")
    for n, line in enumerate(lines[:-1], 1):
        try:
            if not isinstance(json.loads(line), dict):
                raise ValueError("not an object")
        except ValueError:
            raise UsageError(f"--resume: {path}:{n} is not a whole metrics row (damaged); {fix}") from None


def _total_steps(args: TrainArgs, splits: Splits) -> int:
    return num_batches(len(splits.train_labels), args.batch_size) * args.epochs


def _teacher_cache(args: DistillArgs, splits: Splits, student: Student, teachers: Teachers, maps, world: World):
    """The teacher cache for this run (``fastmt.cache``), or None where it cannot serve."""
    from fastmt import cache as C

    if world.size > 1:
        log.warning("--cache-teachers: not used in data-parallel runs; the teachers run every step")
        return None
    want_hidden = args.hidden_loss != "none" and args.alpha_hidden > 0
    kind = args.hidden_loss if want_hidden else "none"
    fp = C.fingerprint(args.teachers, args.train, args.max_length, args.teacher_subset, kind, maps, args.precision)
    path = C.default_dir(fp) if args.cache_teachers == "auto" else Path(args.cache_teachers)
    k = len(maps[0]) if want_hidden else 0
    d = teachers.hidden_size if want_hidden else 0
    lengths = splits.train_enc[student.key].packed()[3] if kind == "tokens" else None
    return C.TeacherCache.open(path, fp, len(splits.train_labels), len(teachers), len(splits.label_names),
                               k, d, lengths, args.cache_budget_gb * 1e9)


def _subset(teachers: Teachers, idx: list[int]) -> Teachers:
    for i in idx:
        if not 0 <= i < len(teachers):
            raise UsageError(f"--teacher-subset {i}: there are {len(teachers)} teachers (0..{len(teachers) - 1})")
    sub = Teachers([teachers.encoders[i] for i in idx], [teachers.tokenizers[i] for i in idx], [teachers.names[i] for i in idx],
                   teachers.num_labels, teachers.pooling)
    sub.head = teachers.head
    sub.adapters = nn.ModuleList(teachers.adapters[i] for i in idx)
    return sub


def _loss_module(kind: str):
    if kind == "reference":
        return reference_losses
    import fastmt.kernels as kernels

    return kernels


# ---------------------------------------------------------------------------------------------------
# Evaluation


def evaluate_dir(model_dir: str, data: str, device_name: str = "cpu", batch_size: int = 128, max_length: int | None = None,
                 columns: Columns | None = None) -> dict:
    """Scores of a student dir, or of each teacher and their ensemble in a teachers dir: accuracy,
    macro-F1, MCC and a per-class table (``fastmt.metrics.report``)."""
    from fastmt.predict import load_model

    device = resolve_device(device_name)
    model = load_model(model_dir, device)
    ds = read_dataset(data, columns=columns)
    labels = encode_labels(ds, model.label_names)
    t0 = time.perf_counter()
    per_teacher: list[float] = []
    logits = model.logits(ds, batch_size, max_length, timings=per_teacher)
    dt = time.perf_counter() - t0
    if model.kind == "teachers":
        result = {
            "teachers": [
                {"name": model.names[i], "accuracy": accuracy(z, labels), "n": len(ds), "samples_per_s": len(ds) / max(per_teacher[i], 1e-9)}
                for i, z in enumerate(logits)
            ],
            "ensemble": {**metric_report(logits.mean(0), labels, model.label_names), "n": len(ds)},
        }
        result.update(result["ensemble"])
    else:
        result = {**metric_report(logits, labels, model.label_names), "n": len(ds)}
    result["samples_per_s"] = len(ds) / max(dt, 1e-9)
    result["kind"] = model.kind
    return result
