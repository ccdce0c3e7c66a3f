"""A run folder belongs to one process: a lock file naming its holder (pid and host).

``RunLock(folder)`` creates ``folder/.lock`` exclusively (``O_CREAT | O_EXCL``) and removes it
on release. A second writer is refused with a one-line error naming the holder. A lock whose
process is gone (same host, dead pid: a run killed with ``kill -9`` or by a power cut) is
stale and taken over with a notice. A lock from another host cannot be checked from here: it
is refused, and the message names the file to delete once that run is known to be dead.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from medfm.errors import MedfmError

LOCK_NAME = ".lock"
_HELD: dict[int, RunLock] = {}  # the locks this process holds, for release_held_locks


def release_held_locks() -> None:
    """Release every lock this process holds: for a process about to end at once
    (`medfm.workers.exit_soon_after_interrupt`)."""
    for lock in list(_HELD.values()):
        lock.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


class RunLock:
    """Context manager holding ``folder/.lock`` (the folder is created)."""

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        log: Callable[[str], None] | None = None,
        name: str = LOCK_NAME,
    ) -> None:
        """``name``: the lock file's name, for writers that may share a folder in parts (the
        shards of one dataset each take their own)."""
        self.folder = Path(folder)
        self.path = self.folder / name
        self.log = log or (lambda msg: None)
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        self.held = False

    def acquire(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.me)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(text)
            self.held = True
            _HELD[id(self)] = self
            return self
        raise MedfmError(f"{self.folder} is locked by another run ({self.path}); try again")

    def _take_over_if_stale(self) -> None:
        """Remove the lock if its holder is dead; raise if it is alive or cannot be checked."""
        info = _read(self.path)
        if info is None:  # being written right now, or garbage: look again shortly
            time.sleep(0.05)
            info = _read(self.path)
            if info is None:
                if self.path.exists():
                    self.log(f"notice: {self.path} is unreadable; taking the run folder over")
                    self.path.unlink(missing_ok=True)
                return
        pid, host = info.get("pid"), info.get("host")
        if host != self.me["host"]:
            raise MedfmError(
                f"{self.folder} is in use by pid {pid} on host {host}; if that run is dead, "
                f"delete {self.path}"
            )
        if isinstance(pid, int) and _alive(pid):
            raise MedfmError(
                f"{self.folder} is in use by pid {pid} on {host}; wait for it to finish or use "
                "another --out"
            )
        # stale: rename it away first, so that of two processes taking it over one wins
        stale = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.replace(self.path, stale)
        except FileNotFoundError:
            return
        if _read(stale) != info:  # another process took it over in between: give it back
            try:
                os.link(stale, self.path)
            except FileExistsError:
                pass
            stale.unlink(missing_ok=True)
            return
        stale.unlink(missing_ok=True)
        self.log(f"notice: took over {self.folder} from pid {pid}, which is no longer running")

    def release(self) -> None:
        if self.held:
            info = _read(self.path)
            if info is not None and info.get("pid") == self.me["pid"]:
                self.path.unlink(missing_ok=True)
            self.held = False
            _HELD.pop(id(self), None)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["LOCK_NAME", "RunLock", "release_held_locks"]
