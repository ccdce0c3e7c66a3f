"""What every benchmark shares: timing (best of REPEATS, this VM's timings vary ~20%) and the
environment block at the top of its JSON."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import torch

REPEATS = 3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(run: Callable[[int], None], device: torch.device) -> float:
    """Fastest of REPEATS timings (s) of run(repeat)."""
    times = []
    for r in range(REPEATS):
        sync(device)
        t0 = time.perf_counter()
        run(r)
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def environment(name: str, device: torch.device) -> dict:
    """The JSON header: benchmark, device, torch, threads, python."""
    return {
        "benchmark": name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
