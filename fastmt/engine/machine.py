"""What a measurement is written with: the one name it gives the machine it ran on (the GPU's name, or
the CPU model and the threads torch uses), the commit it measured, and its timings' percentiles. Every
benchmark, check and report that writes a figure writes these beside it."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch


def device_name(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def git_sha() -> str:
    try:
        root = Path(__file__).resolve().parents[2]  # the checkout: fastmt/engine/machine.py
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def percentiles(times: list[float]) -> tuple[float, float, float]:
    """``(p50, p20, p80)`` of ``times``, linearly interpolated between order statistics."""
    if not times:
        raise ValueError("percentiles of no timings")
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return q[0], q[1], q[2]
