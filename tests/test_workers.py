"""medfm.workers: results in order from a bounded window, task errors raised in the parent, a
dead worker named, and no worker outliving its parent (kill -9 included)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from medfm.errors import MedfmError
from medfm.workers import WorkerError, WorkerPool


def square(x: int) -> int:
    return x * x


def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise MedfmError(f"case {x} is bad; fix it")
    return x


def suicide(x: int) -> int:
    if x == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def test_results_come_in_task_order():
    with WorkerPool(2, window=3) as pool:
        assert list(pool.imap(square, [(i,) for i in range(7)])) == [i * i for i in range(7)]
        pids = pool.pids()
    assert len(pids) == 2
    assert all(not _alive(p) for p in pids)


def test_the_window_bounds_the_tasks_taken_from_the_iterator():
    taken = []

    def tasks():
        for i in range(20):
            taken.append(i)
            yield (i,)

    with WorkerPool(2, window=3) as pool:
        it = pool.imap(square, tasks())
        assert next(it) == 0
        assert len(taken) <= 4  # three out, one more after the first came back
        it.close()


def test_a_task_error_is_raised_in_the_parent_and_the_workers_stop():
    with pytest.raises(MedfmError, match="case 3 is bad; fix it"):
        with WorkerPool(2) as pool:
            pids = pool.pids()
            list(pool.imap(fail_on, [(i, 3) for i in range(6)]))
    assert all(not _alive(p) for p in pids)


def test_a_worker_that_dies_is_named():
    with pytest.raises(WorkerError, match=r"worker process \d+ died \(exit code -9\)"):
        with WorkerPool(2) as pool:
            list(pool.imap(suicide, [(i,) for i in range(5)]))


def _alive(pid: int) -> bool:
    """Running (a zombie awaiting its parent's wait counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids: list[int], seconds: float = 10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


PARENT = textwrap.dedent(
    """
    import time
    from medfm.workers import WorkerPool

    if __name__ == "__main__":
        with WorkerPool(2) as pool:
            print(*pool.pids(), flush=True)
            list(pool.imap(time.sleep, [(60,)] * 4))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_exit_when_the_parent_is_killed_with_sigkill(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    assert _wait_gone(pids) == []


WATCHED = textwrap.dedent(
    """
    import os, sys, time
    from medfm.workers import die_with_parent

    die_with_parent(int(sys.argv[1]), prctl=False)
    print("armed", os.getpid(), flush=True)
    time.sleep(60)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_polling_fallback_also_follows_the_parent(tmp_path):
    """A parent (sh) starts a child that watches it with the polling thread only; the parent is
    killed with SIGKILL and the child exits on its own."""
    (tmp_path / "child.py").write_text(WATCHED)
    shell = subprocess.Popen(
        ["sh", "-c", f'"{sys.executable}" "{tmp_path / "child.py"}" $$ & wait'],
        stdout=subprocess.PIPE,
        text=True,
    )
    word, child = shell.stdout.readline().split()  # the child has armed its watch
    child = int(child)
    assert word == "armed" and _alive(child)
    shell.send_signal(signal.SIGKILL)
    shell.wait(10)
    assert _wait_gone([child]) == []


STUCK = textwrap.dedent(
    """
    import signal, sys, time
    from medfm.io.lock import RunLock
    from medfm.workers import exit_soon_after_interrupt

    exit_soon_after_interrupt(grace=0.5)
    signal.signal(signal.SIGINT, lambda *a: None)  # a main thread that does not get to stop
    RunLock(sys.argv[1]).acquire()
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_a_process_that_does_not_stop_is_ended_after_the_grace_with_its_locks_released(tmp_path):
    (tmp_path / "stuck.py").write_text(STUCK)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "stuck.py"), str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "ready\n"
    assert (run / ".lock").exists()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 130
    assert proc.stderr.read() == (
        "interrupted: run the same command again to resume (seg train: with --resume)\n"
    )
    assert not (run / ".lock").exists()
