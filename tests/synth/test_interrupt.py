"""synth generate with worker processes: Ctrl-C stops it at once and the same command resumes to
the files of an uninterrupted run; kill -9 of the parent takes its workers with it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medfm.synth.dataset import generate_dataset

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

ARGS = dict(modalities="ct,us", dim=2, n=400, size=32, seed=7, batch=2)
CMD = [sys.executable, "-m", "medfm.cli.main", "synth", "generate", "--modality", "ct,us"]
CMD += ["-n", "400", "--size", "32", "--seed", "7", "--batch", "2", "--workers", "2"]


def tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def alive(pid: int) -> bool:
    """Running (a zombie awaiting its parent's wait counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def start_and_wait_for_cases(out: Path) -> tuple[subprocess.Popen, list[int]]:
    """Start the command in its own process group (as a shell does) and return once a few
    cases are written and both workers run."""
    proc = subprocess.Popen(
        [*CMD, "--out", str(out)],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        labels = out / "labelsTr"
        kids = children(proc.pid)
        if labels.is_dir() and len(list(labels.iterdir())) >= 4 and len(kids) >= 2:
            return proc, kids
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no cases appeared: {proc.communicate()}")


def wait_gone(pids: list[int], seconds: float = 10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ds"
    generate_dataset(out, **ARGS)
    return out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_ends_the_run_and_the_same_command_resumes_it(tmp_path, reference, sig):
    out = tmp_path / "ds"
    proc, kids = start_and_wait_for_cases(out)
    os.killpg(proc.pid, sig)  # Ctrl-C in a terminal reaches the whole process group
    proc.wait(10)
    stderr = proc.stderr.read()
    assert proc.returncode == 130
    assert stderr.strip().splitlines()[-1] == (
        "interrupted: run the same command again to resume (seg train: with --resume)"
    )
    assert "Traceback" not in stderr
    assert wait_gone(kids) == []
    assert not (out / ".lock").exists()
    written = snapshot(out)
    time.sleep(0.5)
    assert snapshot(out) == written  # nothing written after the command ended
    assert len(list((out / "labelsTr").iterdir())) < ARGS["n"]  # stopped part-way

    r = subprocess.run([*CMD, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "already there" in r.stdout
    assert tree(out) == tree(reference)


def test_kill_9_of_the_parent_ends_its_workers(tmp_path):
    out = tmp_path / "ds"
    proc, kids = start_and_wait_for_cases(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert wait_gone(kids) == []  # resuming after kill -9: tests/synth/test_dataset.py
