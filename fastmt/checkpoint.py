"""Training checkpoints: everything a run needs to continue as if it had never stopped.

``DIR/checkpoint/`` holds ``state.pt`` (model, optimizer, scheduler, loss scaler, every RNG, the data
order and position, the loop's counters) and ``meta.json`` (step and epoch, readable without torch).
``state.pt`` is written under a temporary name and renamed into place, so a kill at any instant
leaves the previous checkpoint or the new one, whole.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastmt.errors import UsageError
from fastmt.io import atomic_path, read_json, write_json

CHECKPOINT = "checkpoint"
FORMAT = 1
# Flags that may change between a run and its resumption; every other setting must match.
VOLATILE = {"resume", "overwrite", "progress", "save_every", "max_bad_steps", "log_every", "eval_batch_size",
            "cache_teachers", "cache_budget_gb", "report_to"}


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINT


def checkpoint_meta(out_dir: str | Path) -> dict | None:
    """``meta.json`` of the run's checkpoint, or None when there is none."""
    meta = checkpoint_dir(out_dir) / "meta.json"
    if not meta.is_file() or not (meta.parent / "state.pt").is_file():
        return None
    try:
        return read_json(meta)
    except (OSError, ValueError):
        return None


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in VOLATILE}


def save_checkpoint(out_dir: str | Path, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write ``state`` as the run's checkpoint, replacing the previous one in a single rename.

    ``state.pt`` is the checkpoint; ``meta.json`` (written after it) is a summary for people and
    for error messages.
    """
    target = checkpoint_dir(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    with atomic_path(target / "state.pt") as tmp:
        torch.save({"format": FORMAT, **state}, tmp)
        _fault("FASTMT_FAULT_KILL_IN_CHECKPOINT", int(meta["step"]))  # the old state.pt is still in place here
    write_json(target / "meta.json", {"format": FORMAT, **meta})
    return target


def load_checkpoint(out_dir: str | Path, run_config: dict, mmap: bool = False) -> dict:
    """The checkpoint's state, after checking it belongs to a run with the same settings. With
    ``mmap``, tensors are mapped, not read (a cheap check before the run starts)."""
    target = checkpoint_dir(out_dir)
    if checkpoint_meta(out_dir) is None:
        raise UsageError(f"--resume: no checkpoint in {target} (a run writes one with --save-every STEPS)")
    try:
        state = torch.load(target / "state.pt", map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:  # a file that is not a checkpoint: say which, not a pickle traceback
        raise UsageError(f"--resume: {target / 'state.pt'} cannot be read ({type(e).__name__}: {e})") from None
    if state.get("format") != FORMAT:
        raise UsageError(f"--resume: {target} was written by another fastmt version (format {state.get('format')})")
    old, new = comparable(state["run_config"]), comparable(run_config)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:4])
        raise UsageError(f"--resume: these settings differ from the interrupted run ({shown}); "
                         "resume with the original flags, or start again with --overwrite")
    return state


def _fault(name: str, step: int) -> None:
    """Fault injection for the kill-and-resume tests: ``NAME=STEP`` sends this process SIGKILL there."""
    at = os.environ.get(name)
    if at is not None and int(at) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def fault_after_step(step: int) -> None:
    """``FASTMT_FAULT_KILL_AFTER_STEP=STEP`` dies after that step; ``FASTMT_FAULT_PAUSE_AFTER_STEP=STEP``
    says so on stderr and waits there, forever, for a kill from outside (a test's external kill
    then lands at a known step, and the run cannot finish first)."""
    _fault("FASTMT_FAULT_KILL_AFTER_STEP", step)
    at = os.environ.get("FASTMT_FAULT_PAUSE_AFTER_STEP")
    if at is not None and int(at) == step:
        import sys
        import threading

        print(f"fastmt: paused after step {step}", file=sys.stderr, flush=True)
        threading.Event().wait()
