"""Training checkpoints: everything a run needs to continue as if it had never stopped.

``DIR/checkpoint/`` holds ``state.pt`` (model, optimizer, scheduler, loss scaler, every RNG, the data
order and position, the loop's counters) and ``meta.json`` (step and epoch, readable without torch).
``state.pt`` is written under a temporary name and renamed into place, so a kill at any instant
leaves the previous checkpoint or the new one, whole; so does a full disk (:class:`WriteFailed`).
It is read back with ``torch.load(weights_only=True)``: tensors, plain values and the numpy array of
numpy's RNG state, nothing else, so a file from elsewhere put in its place cannot run code.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Collection

import numpy as np
import torch

from fastmt.engine import stopping
from fastmt.errors import UsageError
from fastmt.engine.fileio import atomic_path, first_line, read_json, tensor_bytes, write_json

CHECKPOINT = "checkpoint"
FORMAT = 1


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINT


def checkpoint_meta(out_dir: str | Path) -> dict | None:
    """``meta.json`` of the run's checkpoint, or None when there is none. A damaged meta.json beside
    a ``state.pt`` still counts as a checkpoint (of an unknown step): the state is what matters."""
    meta = checkpoint_dir(out_dir) / "meta.json"
    if not meta.is_file() or not (meta.parent / "state.pt").is_file():
        return None
    try:
        found = read_json(meta)
    except (OSError, ValueError):
        found = None
    return found if isinstance(found, dict) else {"step": None}


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


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's generators (every device's) from ``--seed``: a fresh run's start."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def changed_settings(saved: dict, run_config: dict, may_change: Collection[str]) -> list[str]:
    """The settings, sorted, whose values differ between ``saved`` (the run that wrote a checkpoint)
    and ``run_config`` (the run resuming it), those in ``may_change`` apart."""
    return sorted(k for k in set(saved) | set(run_config) if k not in may_change and saved.get(k) != run_config.get(k))


def refuse_changed_settings(saved: dict, run_config: dict, may_change: Collection[str],
                            flags: Collection[str] = ()) -> None:
    """One line refusing a resume whose settings differ from the interrupted run's in anything but
    ``may_change``: each (the first four) with its old and new value, named as its flag where it is one
    of ``flags`` (the others are what a task adds to its settings, such as ``layer_maps``)."""
    diff = changed_settings(saved, run_config, may_change)
    if diff:
        shown = ", ".join(f"{_as_flag(k, flags)}: {saved.get(k)!r} -> {run_config.get(k)!r}" for k in diff[:4])
        raise UsageError(f"--resume: these settings differ from the interrupted run ({shown}); "
                         "resume with the original flags, or start again with --overwrite")


def _as_flag(name: str, flags: Collection[str]) -> str:
    return f"--{name.replace('_', '-')}" if name in flags else name


def save_checkpoint(out_dir: str | Path, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write ``state`` as the run's checkpoint, replacing the previous one in a single rename.

    ``state.pt`` is the checkpoint; ``meta.json`` (written after it) is a summary for people and
    for error messages.
    """
    target = checkpoint_dir(out_dir)
    state = {"format": FORMAT, **state}
    with atomic_path(target / "state.pt", need=tensor_bytes(state) + (1 << 16)) as tmp:
        with open(tmp, "wb") as f:
            writer = _Writer(f)
            try:
                torch.save(state, writer)
            except RuntimeError as e:  # torch reports a failed write as "unexpected pos": give the OS error
                if writer.error is None:
                    raise
                raise writer.error from e
        _fault("FASTMT_FAULT_KILL_IN_CHECKPOINT", int(meta["step"]))  # the old state.pt is still in place here
    write_json(target / "meta.json", {"format": FORMAT, **meta})
    return target


class _Writer:
    """A file for ``torch.save`` that keeps the OS error of a failed write (torch's own message
    for it says only where the stream stopped)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


# Everything fastmt puts in a checkpoint besides tensors and plain values: numpy's RNG state array.
def _numpy_globals() -> list:
    core = getattr(np, "_core", None) or np.core
    found = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found.append(dtypes.UInt32DType)
    return found


def _read_state(path: Path, mmap: bool) -> dict:
    """``state.pt`` without unpickling anything but tensors, plain values and numpy arrays."""
    with torch.serialization.safe_globals(_numpy_globals()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def load_checkpoint(out_dir: str | Path, run_config: dict | None = None, mmap: bool = False,
                    may_change: Collection[str] | None = None, flags: Collection[str] = ()) -> dict:
    """The checkpoint's state. With ``may_change`` (the settings class's ``RESUME_MAY_CHANGE``), it
    is refused unless the run that wrote it had the settings of ``run_config`` but for those
    (``refuse_changed_settings``); without, the settings are not compared (``check_resume`` compares
    them, before the run is built). With ``mmap``, tensors are mapped, not read (a cheap check before
    the run starts)."""
    target = checkpoint_dir(out_dir)
    if checkpoint_meta(out_dir) is None:
        raise UsageError(f"--resume: no checkpoint in {target} (a run writes one with --save-every STEPS)")
    path = target / "state.pt"
    try:
        state = _read_state(path, mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if "weights_only" in str(e) or "Weights only" in str(e):
            what = f" ({found.group(1)})" if found else ""
            raise UsageError(f"--resume: {path} holds Python objects a fastmt checkpoint never holds{what}; it is not "
                             "loaded, as unpickling it could run code. Start again with --overwrite") from None
        raise UsageError(f"--resume: {path} cannot be read (UnpicklingError: {first_line(e)}); "
                         "start again with --overwrite") from None
    except Exception as e:  # a file that is not a checkpoint: say which, not a pickle traceback
        raise UsageError(f"--resume: {path} cannot be read ({type(e).__name__}: {first_line(e)}); "
                         "start again with --overwrite") from None
    if not isinstance(state, dict) or "run_config" not in state:
        raise UsageError(f"--resume: {path} is not a fastmt checkpoint; start again with --overwrite")
    if state.get("format") != FORMAT:
        raise UsageError(f"--resume: {target} was written by another fastmt version (format {state.get('format')})")
    if may_change is not None:
        refuse_changed_settings(state["run_config"], run_config or {}, may_change, flags)
    return state


def _fault(name: str, step: int) -> None:
    """Fault injection for the kill-and-resume tests: ``NAME=STEP`` sends this process SIGKILL there."""
    at = os.environ.get(name)
    if at is not None and int(at) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def fault_after_step(step: int) -> None:
    """``FASTMT_FAULT_KILL_AFTER_STEP=STEP`` dies after that step; ``FASTMT_FAULT_PAUSE_AFTER_STEP=STEP``
    says so on stderr and waits there for a kill from outside, or a signal the run catches (a test's
    external kill then lands at a known step, and the run cannot finish first)."""
    _fault("FASTMT_FAULT_KILL_AFTER_STEP", step)
    at = os.environ.get("FASTMT_FAULT_PAUSE_AFTER_STEP")
    if at is not None and int(at) == step:
        print(f"fastmt: paused after step {step}", file=sys.stderr, flush=True)
        while stopping.requested() is None:  # a caught SIGTERM/SIGINT ends the pause: the loop then stops
            threading.Event().wait(0.05)
