"""A run's output dir: refused when it holds a run that should not be lost, started once every input
has been checked, and held against the settings of the run that ``--resume`` continues."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from fastmt.engine import outlock
from fastmt.engine.checkpoint import checkpoint_dir, checkpoint_meta, load_checkpoint
from fastmt.errors import UsageError
from fastmt.engine.fileio import recover

if TYPE_CHECKING:
    from fastmt.config.settings import TrainArgs


def check_out_dir(out: str, overwrite: bool, resume: bool = False, lock: bool = True) -> Path:
    """Refuse an --out that another run is using (``fastmt.engine.outlock``; taken here for this run when
    ``lock``) or that holds a run (unless --overwrite, or --resume with a checkpoint there)."""
    d = Path(out)
    if lock and not (d.exists() and not d.is_dir()):
        outlock.hold(d)
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


def check_resume(args: TrainArgs, out_dir: Path, run_config: dict) -> None:
    """With --resume, refuse changed settings before anything else is said or built: any but those
    the settings class lets a resume change (``RESUME_MAY_CHANGE``: a task whose loss a flag changes
    keeps it out), in one line naming each by its flag, with its old and new value."""
    if args.resume:
        state = load_checkpoint(out_dir, run_config, mmap=True, may_change=type(args).RESUME_MAY_CHANGE,
                                flags={f.name for f in dataclasses.fields(args)})
        counters = state.get("counters")
        _check_metrics(out_dir / "metrics.jsonl", int(counters.get("metrics_bytes", 0)) if isinstance(counters, dict) else 0)


def _check_metrics(path: Path, size: int) -> None:
    """--resume cuts metrics.jsonl back to ``size``, its length at the checkpoint: refuse a file that
    is shorter (it would be padded with zeros) or whose lines up to there are not whole JSON rows."""
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
