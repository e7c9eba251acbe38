"""What a run writes as it goes: ``metrics.jsonl`` rows (``train`` at each logging interval, ``eval`` after
each epoch, ``done`` at the end), the same scalars to the tracker (``--report-to``), and the log lines.

Only the first process writes; every process reads the logging window, whose means are taken over
the processes (``fastmt.engine.distributed``). Reading the window is the one host sync of the interval.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from fastmt.engine.distributed import World, mean_over_world
from fastmt.engine.fileio import append_jsonl
from fastmt.engine.runstate import RunState
from fastmt.engine.tracking import Tracker

log = logging.getLogger("fastmt")


class RunLog:
    def __init__(self, out_dir: Path, report_to: str, world: World, desc: str, faults: Callable[[], str] | None = None):
        self.metrics, self.world, self.desc, self.faults = out_dir / "metrics.jsonl", world, desc, faults
        self.tracker = Tracker(report_to, out_dir, enabled=world.is_main)  # flushed after every row
        self.last_detail = ""

    def write(self, row: dict) -> None:
        if self.world.is_main:
            append_jsonl(self.metrics, row)
            self.tracker.log(row)

    def train(self, state: RunState, epoch: int, lr: float, scaler) -> tuple[float, float]:
        """The ``train`` row of the window that ends here (means over its finite steps and over
        processes); the window starts again. Returns the mean loss and samples/s for the progress bar."""
        world = self.world
        good = float(mean_over_world(state.window_good.float(), world))
        state.window_loss = mean_over_world(state.window_loss, world)
        state.window_parts = {k: mean_over_world(v, world) for k, v in state.window_parts.items()}
        avg = float(state.window_loss) / good if good else float("nan")
        sps = state.samples / max(state.train_time, 1e-9)
        row = {"event": "train", "epoch": epoch, "step": state.step, "loss": avg, "lr": lr, "samples_per_s": sps}
        row.update({f"loss_{k}": float(v) / good if good else float("nan") for k, v in state.window_parts.items()})
        if scaler.is_enabled() or int(state.skipped):
            row["skipped_steps"] = int(state.skipped)
        if scaler.is_enabled():
            row["loss_scale"] = scaler.get_scale()
        if int(state.bad_total):
            row["nonfinite_loss_steps"] = int(state.bad_total)
        detail = self.faults() if self.faults else ""
        if detail:
            row["faults"] = detail
            if detail != self.last_detail:
                log.warning("%s step %d: %s", self.desc, state.step, detail)
            self.last_detail = detail
        self.write(row)
        state.reset_window()
        return avg, sps

    def eval(self, epoch: int, step: int, scores: dict[str, float], improved: bool) -> None:
        if self.world.is_main:
            self.write({"event": "eval", "epoch": epoch, "step": step, **scores, "best": improved})
            log.info("%s epoch %d: %s", self.desc, epoch, ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))

    def done(self, state: RunState, metric: str, sps: float) -> None:
        if self.world.is_main:
            append_jsonl(self.metrics, {"event": "done", "best_epoch": state.best_epoch, "best_dev_accuracy": state.best_accuracy,
                                        "metric": metric, "best_dev_score": state.best, "train_s": state.train_time,
                                        "samples_per_s": sps, "steps": state.step, "skipped_steps": int(state.skipped)})
            self.tracker.close()
