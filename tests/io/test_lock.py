"""A run folder belongs to one process."""

import json
import os
import socket
import subprocess
import sys

import pytest

from medfm.errors import MedfmError
from medfm.io import RunLock


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, lock_holder):
    holder = lock_holder(tmp_path / "run")
    with pytest.raises(MedfmError, match=f"in use by pid {holder.pid} on "):
        RunLock(tmp_path / "run").acquire()
    holder.kill()
    holder.wait()
    # the holder died without releasing: its lock is stale and taken over, with a notice
    notes = []
    with RunLock(tmp_path / "run", log=notes.append) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        assert any(f"from pid {holder.pid}" in n for n in notes)
    assert not (tmp_path / "run" / ".lock").exists()  # released


def test_a_stale_lock_is_taken_over_and_a_foreign_host_is_refused(tmp_path):
    lock = tmp_path / "run" / ".lock"
    lock.parent.mkdir()
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    with RunLock(tmp_path / "run"):
        pass
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(MedfmError, match=r"pid 1 on host elsewhere; .*delete .*\.lock"):
        RunLock(tmp_path / "run").acquire()
    assert lock.exists()  # not ours to remove


def test_the_same_process_cannot_hold_a_folder_twice_through_two_locks(tmp_path):
    with RunLock(tmp_path / "run"):
        # a lock naming this very pid is not stale: the folder is in use
        with pytest.raises(MedfmError, match="in use"):
            RunLock(tmp_path / "run").acquire()
