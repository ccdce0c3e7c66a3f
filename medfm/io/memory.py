"""The memory guard: refuse an allocation the machine cannot hold, before making it.

Untrusted inputs (a NIfTI header, a PNG header, a model's config.json, a requested size) decide
how much memory a command allocates. Every reader estimates that amount from what it can read
cheaply (a header) and calls `check_memory` first: a request that does not fit is one line with
the estimate and what is available, instead of the kernel's OOM killer or a swap storm. The
limit is what this machine (or its container) has available now, not a fixed number: medical
images are large, and whatever fits is accepted.

``MEDFM_MEMORY_LIMIT`` (bytes, or with a unit: ``64G``, ``512M``) overrides the measured
figure: lower it to keep medfm inside a share of a machine, raise it when swap should be used.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from medfm.errors import MedfmError

__all__ = ["MEMORY_LIMIT_ENV", "available_memory", "check_memory", "format_bytes"]

MEMORY_LIMIT_ENV = "MEDFM_MEMORY_LIMIT"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_CGROUP = Path("/sys/fs/cgroup")


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps it >= 1 (``30 GiB``, ``512 MiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 10 else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _parse_limit(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise MedfmError(
            f"{MEMORY_LIMIT_ENV}={text!r} is not a size; give bytes or a number with K, M, G or T"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _read_int(path: Path) -> int | None:
    """An integer file of the cgroup tree; None when absent, unreadable or "max" (no limit)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_free() -> int | None:
    """The container's memory limit minus its usage (cgroup v2, else v1); None without one.

    The process's own cgroup (``/proc/self/cgroup``) is looked at, and the mount's root, which
    inside a container is the container's cgroup."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    own_v2 = next((line[3:] for line in lines if line.startswith("0::")), "/")
    own_v1 = next((line.split(":", 2)[2] for line in lines if ":memory:" in line), "/")
    candidates = [
        (_CGROUP / own_v2.lstrip("/"), "memory.max", "memory.current"),
        (_CGROUP, "memory.max", "memory.current"),
        (_CGROUP / "memory" / own_v1.lstrip("/"), "memory.limit_in_bytes", "memory.usage_in_bytes"),
        (_CGROUP / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"),
    ]
    free = []
    for folder, limit_name, usage_name in candidates:
        limit, usage = _read_int(folder / limit_name), _read_int(folder / usage_name)
        if limit is not None and usage is not None and limit < 2**60:  # v1's "no limit" is ~2^63
            free.append(max(0, limit - usage))
    return min(free) if free else None


def _system_free() -> int | None:
    """MemAvailable of /proc/meminfo (Linux); else psutil's figure or sysconf's free pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # not installed, or no figure on this system
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory(device: object = None) -> int | None:
    """Bytes this process can allocate now: ``MEDFM_MEMORY_LIMIT`` when set, else the lower of
    the system's available memory and the container's limit minus its usage. With a CUDA
    ``device`` (a torch.device or a string), the free memory of that GPU. None when no figure
    can be had (then nothing is refused)."""
    env = os.environ.get(MEMORY_LIMIT_ENV)
    if env:
        return _parse_limit(env)
    if device is not None and str(device).startswith("cuda"):
        import torch

        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except (RuntimeError, AssertionError, ValueError):
            return None
    figures = [f for f in (_system_free(), _cgroup_free()) if f is not None]
    return min(figures) if figures else None


def check_memory(
    nbytes: float,
    what: str,
    *,
    factor: float = 1.0,
    hint: str = "use a smaller input or a machine with more memory",
    device: object = None,
) -> None:
    """Raise MedfmError when ``what`` (e.g. "a 2000x2000x2000 float32 volume") needs more than
    `available_memory`: ``nbytes * factor`` bytes, ``factor`` being the peak of the work over
    the final array (copies made on the way). The message reads "WHAT needs ~30 GiB, 18 GiB
    available: HINT"."""
    need = float(nbytes) * factor
    if not math.isfinite(need) or need < 0:
        raise MedfmError(f"{what} has an impossible size; the input is damaged")
    avail = available_memory(device)
    if avail is None or need <= avail:
        return
    where = "GPU memory" if device is not None and str(device).startswith("cuda") else ""
    raise MedfmError(
        f"{what} needs ~{format_bytes(need)}, {format_bytes(avail)} {where or 'memory'} "
        f"available: {hint}"
    )
