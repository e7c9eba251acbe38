"""How far a run has got, and how that is kept in a checkpoint and taken back from one.

``RunState`` holds every counter the loop keeps: the step, the place in the epoch, the best epoch,
the training time, and the sums of the logging window and the non-finite-loss streaks, which stay
on the device (read back only at the logging interval). ``save_run`` writes it with the model,
optimizer, schedule, loss scale and every RNG (``fastmt.engine.checkpoint``); ``resume_run`` puts all of it
back, so a resumed run goes on exactly as if it had never stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastmt.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state

log = logging.getLogger("fastmt")

DEVICE_COUNTERS = ("skipped", "bad_run", "worst_run", "bad_total", "window_good")


@dataclass
class RunState:
    device: torch.device
    step: int = 0
    start_epoch: int = 1
    done_in_epoch: int = 0  # batches of the current epoch already trained
    epoch_gen_state: torch.Tensor | None = None  # the shuffle generator's state at the start of the epoch
    best: float = -1.0  # the --metric score of the best epoch
    best_epoch: int = 0
    best_accuracy: float = float("nan")  # dev accuracy at the best epoch
    train_time: float = 0.0
    samples: int = 0
    last_checkpoint: int | None = None
    # On the device: skipped optimizer steps (fp16 overflow, non-finite loss); non-finite losses as the
    # current streak, the longest and all; the logging window's finite steps, loss and loss parts.
    skipped: torch.Tensor = field(init=False)
    bad_run: torch.Tensor = field(init=False)
    worst_run: torch.Tensor = field(init=False)
    bad_total: torch.Tensor = field(init=False)
    window_good: torch.Tensor = field(init=False)
    window_loss: torch.Tensor = field(init=False)
    window_parts: dict[str, torch.Tensor] = field(default_factory=dict)
    window_n: int = 0
    t_mark: float = 0.0

    def __post_init__(self) -> None:
        for name in DEVICE_COUNTERS:
            setattr(self, name, self.zero())
        self.window_loss = torch.zeros((), device=self.device)

    def zero(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.int64, device=self.device)

    def record(self, loss: torch.Tensor, parts: dict[str, torch.Tensor], batch_rows: int) -> None:
        """One finished step: counted, its loss added to the window where finite. No host read."""
        self.step += 1
        self.samples += batch_rows
        ok = torch.isfinite(loss.detach())
        self.bad_run = (self.bad_run + 1) * (~ok)
        self.worst_run = torch.maximum(self.worst_run, self.bad_run)
        self.bad_total += ~ok
        self.window_good += ok
        self.window_loss += torch.where(ok, loss.detach().float(), 0.0)
        for k, v in parts.items():
            v = v.detach().float()
            self.window_parts[k] = self.window_parts.get(k, 0.0) + torch.where(torch.isfinite(v), v, 0.0)
        self.window_n += 1

    def reset_window(self) -> None:
        self.window_loss, self.window_n, self.window_good = torch.zeros((), device=self.device), 0, self.zero()
        self.window_parts = {}

    def start_clock(self) -> None:
        self.t_mark = time.perf_counter()

    def lap(self) -> None:
        """Add the time since the last mark to the training time (after the device has caught up)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.train_time, self.t_mark = self.train_time + (now - self.t_mark), now

    def counters(self, epoch: int, done: int, metrics: Path) -> dict:
        return {
            "step": self.step, "epoch": epoch, "done_in_epoch": done, "best": self.best, "best_epoch": self.best_epoch,
            "best_accuracy": self.best_accuracy, "train_time": self.train_time, "samples": self.samples,
            "window_n": self.window_n, **{k: int(getattr(self, k)) for k in DEVICE_COUNTERS},
            "window_loss": self.window_loss.detach().cpu(),
            "window_parts": {k: v.detach().cpu() for k, v in self.window_parts.items()},
            "metrics_bytes": metrics.stat().st_size if metrics.exists() else 0,
        }

    def load_counters(self, c: dict, epoch_gen_state: torch.Tensor) -> None:
        self.step, self.best, self.best_epoch = c["step"], c["best"], c["best_epoch"]
        self.best_accuracy = c.get("best_accuracy", self.best)
        self.train_time, self.samples, self.window_n = c["train_time"], c["samples"], c["window_n"]
        for k in DEVICE_COUNTERS:
            setattr(self, k, torch.tensor(c[k], dtype=torch.int64, device=self.device))
        self.window_loss = c["window_loss"].to(self.device)
        self.window_parts = {k: v.to(self.device) for k, v in c["window_parts"].items()}
        self.start_epoch, self.done_in_epoch, self.epoch_gen_state = c["epoch"], c["done_in_epoch"], epoch_gen_state
        self.last_checkpoint = self.step


@dataclass
class Trainables:
    """What a checkpoint holds besides the counters: the model and everything that updates it."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: object  # fastmt.engine.optim.LinearSchedule
    scaler: torch.amp.GradScaler


def save_run(out_dir: Path, state: RunState, parts: Trainables, run_config: dict, epoch: int, done: int,
             steps_per_epoch: int) -> None:
    """The checkpoint of the loop as it stands after ``done`` batches of ``epoch``."""
    ck = {"model": parts.model.state_dict(), "optimizer": parts.opt.state_dict(), "scheduler": parts.sched.state_dict(),
          "scaler": parts.scaler.state_dict(), "rng": rng_state(state.device), "epoch_gen_state": state.epoch_gen_state,
          "counters": state.counters(epoch, done, out_dir / "metrics.jsonl"), "run_config": run_config}
    save_checkpoint(out_dir, ck, {"step": state.step, "epoch": epoch, "batch_in_epoch": done, "steps_per_epoch": steps_per_epoch})


def resume_run(out_dir: Path, state: RunState, parts: Trainables, run_config: dict) -> int:
    """Put the checkpoint in ``out_dir`` back into ``state`` and ``parts``; the length metrics.jsonl had then."""
    ck = load_checkpoint(out_dir, run_config)
    parts.model.load_state_dict(ck["model"])
    parts.opt.load_state_dict(ck["optimizer"])
    parts.sched.load_state_dict(ck["scheduler"])
    parts.scaler.load_state_dict(ck["scaler"])
    state.load_counters(ck["counters"], ck["epoch_gen_state"])
    set_rng_state(ck["rng"], state.device)
    return ck["counters"]["metrics_bytes"]
