"""CPU thread settings that hold up on a busy machine, set once before torch is loaded.

torch's CPU kernels (ATen, MKL, oneDNN) run their parallel regions on OpenMP threads, one per
core by default, and GNU OpenMP lets a thread that finished its share spin, waiting for the
others, for 300,000 spins by default. When another process keeps one core busy, one of our
threads is descheduled in every region while its partners spin and take CPU from it and from
the other process: each region ends only when the slowest thread is scheduled again, and a
command runs several times slower than its share of the machine allows (docs/benchmarks.md, "A
busy machine"). Threads that sleep at once (``OMP_WAIT_POLICY=PASSIVE``) remove that but make
every one of the many small regions on a quiet machine wait for a sleeping thread (and, in a
virtual machine, an idle CPU) to wake. A short spin (``GOMP_SPINCOUNT``, GNU OpenMP; Intel
OpenMP's ``KMP_BLOCKTIME`` in ms) keeps the quiet speed and most of the busy one.

`configure_threads` is called by every ``medfm`` command before any heavy import (the CLI's
startup hook) and, for the wait policy only, when ``medfm`` is imported, so that library use
gets it too. A setting the user made wins: ``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``,
``KMP_BLOCKTIME`` and ``OMP_NUM_THREADS`` are only given defaults; ``MEDFM_THREADS`` sets
medfm's thread count explicitly. The OpenMP runtime reads its environment when torch is first
imported, so a process that imported torch before medfm keeps torch's settings (call
``torch.set_num_threads`` there, or set the variables in the shell).
"""

from __future__ import annotations

import os
import sys

from medfm.errors import MedfmError

__all__ = [
    "SPIN_COUNT",
    "THREADS_ENV",
    "available_cpus",
    "configure_threads",
    "set_wait_policy",
]

THREADS_ENV = "MEDFM_THREADS"
"""Environment variable: the number of CPU threads a medfm command uses (default: the CPUs this
process may run on)."""


SPIN_COUNT = "10000"
"""GOMP_SPINCOUNT medfm sets: spins a waiting OpenMP thread makes before it sleeps (GNU's
default is 300,000; docs/benchmarks.md, "A busy machine", has the measurements)."""


def set_wait_policy() -> None:
    """Let idle OpenMP threads spin briefly, then sleep (``GOMP_SPINCOUNT``, and
    ``KMP_BLOCKTIME=1`` ms for Intel OpenMP), unless the user chose a wait policy or a spin;
    effective only before torch is first imported."""
    if "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
    os.environ.setdefault("KMP_BLOCKTIME", "1")


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. under ``taskset`` or a
    container's cpuset), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def _requested_threads() -> int | None:
    text = os.environ.get(THREADS_ENV)
    if text is None or not text.strip():
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise MedfmError(f"{THREADS_ENV}={text!r} must be a whole number >= 1; unset it or fix it")
    return n


def configure_threads() -> int | None:
    """Set the wait policy and the thread count for this process and its workers.

    The count is ``MEDFM_THREADS`` if set, else ``OMP_NUM_THREADS`` if the user set it (left as
    it is), else the CPUs of the affinity mask when it is smaller than the machine (torch's own
    default, one thread per physical core, otherwise). It goes into ``OMP_NUM_THREADS`` so that
    torch, MKL and worker processes started later all read it; if torch is already loaded, it is
    also applied with ``torch.set_num_threads``. Returns the count set, or None when torch's
    default or the user's ``OMP_NUM_THREADS`` stands. A bad ``MEDFM_THREADS`` is a MedfmError.
    """
    set_wait_policy()
    n = _requested_threads()
    if n is None and "OMP_NUM_THREADS" not in os.environ:
        cpus = available_cpus()
        if cpus < (os.cpu_count() or cpus):
            n = cpus
    if n is None:
        return None
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads"):
        torch.set_num_threads(n)
    return n
