import multiprocessing
import multiprocessing.dummy
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
# Real sets with masks (us_hc18, mr_hippocampus, ...), where a developer or CI puts them: the
# tests that read them are skipped when the folder is absent.
REAL_DATA = Path(os.environ.get("MEDFM_REAL_DATA", REPO / "data" / "real"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"no real data sets in {REAL_DATA} (set MEDFM_REAL_DATA)")
    return REAL_DATA


@pytest.fixture
def nnunet_verify(monkeypatch, tmp_path):
    """nnU-Net's own dataset checker, run in this process.

    verify_dataset_integrity checks the cases in a ``spawn`` Pool and lists files in a 12-process
    fork Pool: each spawned worker re-imports nnunetv2 and torch (seconds per call on 2 cores),
    forking a process with torch's threads running risks deadlocks, and a worker that dies at
    start-up makes the Pool respawn it forever, so a failure shows as a hang. Both pools are
    swapped for thread pools here; the checks themselves run unchanged. The slow test below runs
    the checker untouched in its own process.
    """
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / var))
    vdi = pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity")
    import nnunetv2.utilities.utils as nnunet_utils

    monkeypatch.setattr(
        vdi, "multiprocessing", SimpleNamespace(get_context=lambda method: multiprocessing.dummy)
    )
    monkeypatch.setattr(nnunet_utils, "Pool", multiprocessing.dummy.Pool)
    return lambda folder: vdi.verify_dataset_integrity(str(folder), num_processes=1)


@pytest.fixture
def lock_holder():
    """``hold(folder)``: a process that holds ``medfm.io.RunLock`` on ``folder`` (once it
    returns) until it is killed, by the test or at teardown."""
    procs = []

    def hold(folder) -> subprocess.Popen:
        script = (
            "import sys, time; from medfm.io import RunLock\n"
            "with RunLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)"
        )
        proc = subprocess.Popen([sys.executable, "-c", script, str(folder)],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()
