"""The one name a measurement gives the machine it ran on: the GPU's name, or the CPU model and the
threads torch uses. Every benchmark, check and report that writes a figure writes this beside it."""

from __future__ import annotations

import platform
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
