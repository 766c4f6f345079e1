"""The name of the machine a benchmark ran on, one way for every script's rows, reports and CirCor cells."""
from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model (Linux names it in /proc/cpuinfo; ``platform.processor()`` is often empty there)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cores() -> int:
    """The cores this process may run on (a container or ``taskset`` may allow fewer than the host has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def device_name(device=None) -> str:
    """The GPU's name for a CUDA ``device``, else the CPU's model and cores; ``None``: the first GPU if any."""
    import torch

    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {cores()} cores"
