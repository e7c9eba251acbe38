"""``--report-to``: the scalars of ``metrics.jsonl`` also sent to an experiment tracker.

``tensorboard`` writes event files under ``OUT/tensorboard`` (``torch.utils.tensorboard``; needs the
``tensorboard`` package: ``pip install fastmt[tensorboard]``). Every numeric field of a ``train`` row
becomes ``train/<field>`` at that row's step, every numeric field of an ``eval`` row ``eval/<field>``.
"""

from __future__ import annotations

import math
from pathlib import Path

from fastmt.choices import TRACKERS
from fastmt.errors import UsageError


class Tracker:
    """Receives each metrics row after it is appended to metrics.jsonl; does nothing for ``none``."""

    def __init__(self, kind: str, out_dir: Path, enabled: bool = True):
        self.writer = None
        if kind == "none" or not enabled:
            return
        if kind != "tensorboard":
            raise UsageError(f"--report-to {kind}: choose one of {', '.join(TRACKERS)}")
        try:  # optional dependency: fastmt[tensorboard]
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("--report-to tensorboard needs the tensorboard package: pip install tensorboard "
                             "(or fastmt[tensorboard])") from None
        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))

    def log(self, row: dict) -> None:
        if self.writer is None or row.get("event") not in ("train", "eval"):
            return
        step = int(row.get("step", 0))
        for k, v in row.items():
            if k in ("event", "step", "best") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if math.isfinite(v):
                self.writer.add_scalar(f"{row['event']}/{k}", v, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
