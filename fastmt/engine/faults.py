"""What a run says when it cannot go on: losses that stayed non-finite, and a write the OS refused.

Both are one line for the user, naming what is kept on disk and how to go on from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fastmt.config.settings import TrainArgs
from fastmt.engine import stopping
from fastmt.engine.checkpoint import checkpoint_dir
from fastmt.engine.fileio import append_jsonl
from fastmt.engine.runstate import RunState, save_run
from fastmt.errors import FastmtError, WriteFailed, size_text


class TrainingStopped(FastmtError):
    """The loss stayed non-finite for --max-bad-steps steps in a row (exit status 1)."""


class StoppedBySignal(FastmtError):
    """SIGTERM or SIGINT asked the run to stop; it did, after a step, with a checkpoint (exit 128 + signal)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


@dataclass
class Progress:
    """How far a run got, for the message when a write fails (a full disk)."""

    epoch: int = 0
    step: int = 0
    trained: bool = False  # every training step of the last epoch is done
    checkpoint: int | None = None  # step of the checkpoint on disk
    saved_epoch: int = 0  # epoch of the model this run saved last


def stop_if_diverged(state: RunState, args: TrainArgs, epoch: int, out_dir: Path, faults: Callable[[], str] | None,
                     write: bool) -> None:
    """Raise :class:`TrainingStopped` once the loss has been non-finite for --max-bad-steps steps in a row
    (``state.worst_run``: one host read), after a ``stopped`` row in metrics.jsonl (where ``write``)."""
    streak = int(state.worst_run)
    if streak < args.max_bad_steps:
        return
    where = (f"last good checkpoint: {checkpoint_dir(out_dir)} (step {state.last_checkpoint}); fix the cause, then --resume"
             if state.last_checkpoint is not None else "no checkpoint was written (--save-every STEPS writes them)")
    cause = faults() if faults else ""
    if write:
        append_jsonl(out_dir / "metrics.jsonl", {"event": "stopped", "epoch": epoch, "step": state.step,
                                                 "reason": "non-finite loss", "bad_steps_in_a_row": streak,
                                                 "bad_steps": int(state.bad_total), "detail": cause})
    raise TrainingStopped(
        f"the loss was not finite for {streak} steps in a row (--max-bad-steps {args.max_bad_steps}, at step {state.step}); "
        f"stopped, those steps changed no weight. {cause + '. ' if cause else ''}{where}. "
        f"Usual fixes: a lower --lr, --precision fp32, or checking the teachers and the data")


def write_failed(e: WriteFailed, progress: Progress, args: TrainArgs, out_dir: Path, desc: str) -> FastmtError:
    """The one line for a failed write (a full disk): what was written and what is kept, and how to go on
    (``--resume`` where a checkpoint was written)."""
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


def stop_on_signal(state: RunState, parts, run_config: dict, epoch: int, done: int, steps_per_epoch: int,
                   args: TrainArgs, out_dir: Path, desc: str) -> None:
    """After the step a SIGTERM/SIGINT arrived in: a checkpoint, a ``stopped`` row, and the one line on how
    to go on (:class:`StoppedBySignal`). Only single-process runs catch the signals (``fastmt.engine.stopping``)."""
    signum = stopping.requested()
    state.lap()
    save_run(out_dir, state, parts, run_config, epoch, done, steps_per_epoch)
    append_jsonl(out_dir / "metrics.jsonl", {"event": "stopped", "epoch": epoch, "step": state.step,
                                             "reason": stopping.name(signum)})
    raise StoppedBySignal(
        f"{desc}: {stopping.name(signum)} received; stopped after step {state.step} (epoch {epoch} of {args.epochs}) "
        f"with a checkpoint in {checkpoint_dir(out_dir)}. To go on: {stopping.resume_hint()}", signum)
