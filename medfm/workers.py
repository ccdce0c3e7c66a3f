"""Worker processes that stop when they are told to and die with their parent.

Every command that runs work in other processes goes through `WorkerPool`:

- **Ctrl-C stops within a moment.** Tasks are submitted in a bounded window (a few per worker),
  not all at once, and workers ignore SIGINT (the terminal sends it to the whole process group):
  the parent alone gets the KeyboardInterrupt, cancels what is queued and terminates the
  workers. A task killed mid-write leaves no half file, since every medfm write is atomic
  (`medfm.io.atomic`); the same command resumes.
- **A dead parent leaves no orphans**, even one killed with ``kill -9``, which runs no cleanup:
  each worker asks the Linux kernel to kill it when its parent dies
  (``prctl(PR_SET_PDEATHSIG, SIGKILL)``), and elsewhere a daemon thread watches the parent's pid.
- **SIGTERM** to a command is a Ctrl-C (`stop_on_sigterm`): locks are released, workers stopped.
- **Within 2 seconds**, even inside one long torch operation, which Python cannot interrupt:
  `exit_soon_after_interrupt` ends the process if the graceful stop has not by then.

Workers start with the ``spawn`` method (no fork of a process holding torch's threads); each
has its own pipe, so the parent knows which task a worker holds and which worker died.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

__all__ = [
    "INTERRUPTED",
    "WorkerError",
    "WorkerPool",
    "die_with_parent",
    "exit_soon_after_interrupt",
    "say_interrupted",
    "stop_on_sigterm",
]

_PR_SET_PDEATHSIG = 1
_POLL_S = 0.25


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(_POLL_S)
    os._exit(1)


def die_with_parent(parent_pid: int, *, prctl: bool = True) -> None:
    """Make this process exit when the process ``parent_pid`` (its parent) dies, by any death.

    On Linux the kernel sends SIGKILL (``PR_SET_PDEATHSIG``); elsewhere, or if that fails, a
    daemon thread polls ``os.getppid()``. The parent-death signal fires when the parent *thread*
    that started this process exits, so pools must be created by a thread that outlives them
    (the main thread, for the CLI). A parent already gone before the call is caught too.
    ``prctl=False`` uses the polling thread only.
    """
    armed = False
    if prctl and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()


def _init_worker(parent_pid: int, threads: int | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(parent_pid)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _worker_main(conn: Connection, parent_pid: int, threads: int | None) -> None:
    """A worker's loop: receive ``(fn, args)``, send back ``(True, result)`` or ``(False,
    exception)``; ``None`` or a closed pipe ends it."""
    _init_worker(parent_pid, threads)
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        fn, args = task
        try:
            reply = (True, fn(*args))
        except Exception as e:
            reply = (False, e)
        try:
            conn.send(reply)
        except (TypeError, AttributeError, pickle.PicklingError):  # an exception that won't pickle
            conn.send((False, RuntimeError(f"{type(reply[1]).__name__}: {reply[1]}")))


class WorkerError(RuntimeError):
    """A worker process died without answering (killed, out of memory, a crash in C code)."""


class WorkerPool:
    """Worker processes for one command's tasks; a context manager.

    ``threads``: torch CPU threads per worker (default, if the parent has loaded torch: its
    threads divided among the workers, at least 1). At most ``window`` tasks (default two per
    worker) are handed out and not yet collected, which bounds both memory and what still runs
    when the command stops. On
    leaving the ``with`` block normally the workers are told to finish; on an exception
    (KeyboardInterrupt included) they are terminated at once, before the exception goes on.
    An exception raised by a task is raised again in the parent.

    Example::

        with WorkerPool(2) as pool:
            for result in pool.imap(render, [(0, 16), (16, 32)]):
                ...
    """

    def __init__(self, workers: int, *, threads: int | None = None, window: int | None = None):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        torch = sys.modules.get("torch")
        if threads is None and torch is not None:
            threads = max(1, torch.get_num_threads() // workers)
        self.window = max(workers, window or 2 * workers)
        ctx = mp.get_context("spawn")
        self._procs: list[BaseProcess] = []
        self._conns: list[Connection] = []
        try:
            for _ in range(workers):
                parent_end, child_end = ctx.Pipe()
                p = ctx.Process(
                    target=_worker_main, args=(child_end, os.getpid(), threads), daemon=True
                )
                p.start()
                child_end.close()
                self._procs.append(p)
                self._conns.append(parent_end)
        except BaseException:
            self.stop()
            raise

    def pids(self) -> list[int]:
        """The worker processes' pids."""
        return [p.pid for p in self._procs if p.pid is not None]

    def imap(self, fn: Callable[..., Any], tasks: Iterable[tuple]) -> Iterator[Any]:
        """``fn(*task)`` for each task, run in the workers; results in task order. ``fn`` must
        be importable (a module-level function) and tasks picklable."""
        it = enumerate(tasks)
        idle = list(range(len(self._procs)))
        busy: dict[int, int] = {}  # worker -> task index
        results: dict[int, Any] = {}
        next_out, exhausted = 0, False
        while True:
            while idle and not exhausted and len(busy) + len(results) < self.window:
                item = next(it, None)
                if item is None:
                    exhausted = True
                    break
                w = idle.pop()
                self._conns[w].send((fn, item[1]))
                busy[w] = item[0]
            if next_out in results:
                yield results.pop(next_out)
                next_out += 1
                continue
            if not busy:
                return
            waits = {self._conns[w]: w for w in busy} | {self._procs[w].sentinel: w for w in busy}
            for ready in wait(list(waits)):
                w = waits[ready]
                if w not in busy:
                    continue
                if ready is self._conns[w] or self._conns[w].poll():
                    try:
                        ok, value = self._conns[w].recv()
                    except EOFError:
                        ok, value = None, None
                    if ok is not None:
                        if not ok:
                            raise value
                        results[busy.pop(w)] = value
                        idle.append(w)
                        continue
                p = self._procs[w]
                p.join(1.0)
                raise WorkerError(
                    f"worker process {p.pid} died (exit code {p.exitcode}); run the same "
                    "command again to resume, with fewer --workers if memory is short"
                )

    def stop(self, timeout: float = 1.0) -> None:
        """Terminate the workers (SIGTERM, then SIGKILL after ``timeout`` seconds); returns
        once they are gone."""
        for p in self._procs:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                p.terminate()
        self._reap(timeout)

    def _reap(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for p in self._procs:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                p.join(max(0.0, deadline - time.monotonic()))
                if p.is_alive():
                    p.kill()
                    p.join(timeout)
        for c in self._conns:
            c.close()
        self._conns = []

    def close(self, timeout: float = 10.0) -> None:
        """Tell the workers to finish and wait for them (killed after ``timeout`` seconds)."""
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.send(None)
        self._reap(timeout)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.stop()


INTERRUPTED = "interrupted: run the same command again to resume (seg train: with --resume)"
_said = threading.Lock()
_said_once: list[bool] = []


def say_interrupted() -> None:
    """Print `INTERRUPTED` to stderr, once per process (the CLI's handler and the deadline's
    watchdog may both get there)."""
    with _said:
        if _said_once:
            return
        _said_once.append(True)
    sys.stderr.write(INTERRUPTED + "\n")
    sys.stderr.flush()


def _watchdog(fd: int, grace: float) -> None:
    stops = {int(signal.SIGINT), int(signal.SIGTERM)}
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        if not data:
            return
        if stops & set(data):
            time.sleep(grace)
            lock = sys.modules.get("medfm.io.lock")  # not loaded: no lock held
            if lock is not None:
                with contextlib.suppress(Exception):
                    lock.release_held_locks()
            say_interrupted()
            os._exit(130)


_watching: list[bool] = []


def exit_soon_after_interrupt(grace: float = 1.5) -> None:
    """Make sure a Ctrl-C or SIGTERM ends this process within ``grace`` seconds, even while the
    main thread is inside one long torch operation (Python runs signal handlers only between
    bytecodes): a watchdog thread is woken by the signal (``signal.set_wakeup_fd``) and, if the
    process still runs after ``grace``, releases its run-folder locks, says so and exits with
    130. That is as safe as kill -9 (every write is atomic). Main thread only; once per
    process (later calls do nothing)."""
    if threading.current_thread() is not threading.main_thread() or _watching:
        return
    _watching.append(True)
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except ValueError:
        os.close(r)
        os.close(w)
        return
    threading.Thread(target=_watchdog, args=(r, grace), daemon=True).start()


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """Treat SIGTERM (``kill PID``, a batch system's stop) like Ctrl-C in this process, so the
    command stops the same way: workers stopped, locks released, a resume hint, exit 130. Only
    from the main thread, and only if no handler was installed before."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_interrupt)
