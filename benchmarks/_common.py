"""What every benchmark shares: timing (best of REPEATS, this VM's timings vary ~20%; or
interleaved rounds with medians, for ratios on a machine others load) and the environment block
at the top of its JSON."""

from __future__ import annotations

import os
import platform
import statistics
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


def interleaved_times(
    runs: dict[str, Callable[[int], None]], device: torch.device, rounds: int
) -> dict[str, float]:
    """Median time (s) of each run over ``rounds`` rounds, the runs alternating within each
    round (round r times run(r) of every entry in turn), so that a load that comes and goes
    on a shared machine falls on all of them alike and their ratios stay fair."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name, run in runs.items():
            sync(device)
            t0 = time.perf_counter()
            run(r)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def load_average() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages (how busy it was while timing)."""
    return [round(x, 2) for x in os.getloadavg()]


def environment(name: str, device: torch.device) -> dict:
    """The JSON header: benchmark, device, torch, threads, python."""
    return {
        "benchmark": name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
