"""Data-parallel training: DistributedDataParallel over 2 gloo processes (torchrun) gives the
loss curve and the weights of one process with the same global batch."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medfm.engine import Dist, Engine, EngineConfig

from .tiny import LinearTask

ROOT = Path(__file__).resolve().parents[2]


def torchrun(n: int, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node n ARGS`` on this machine, one thread per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(n), *args]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=300)
    finally:  # a hung run: its workers go with it
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_processes_train_as_one_with_the_same_global_batch(tmp_path):
    r = torchrun(2, str(ROOT / "tests" / "engine" / "ddp_worker.py"), str(tmp_path / "ddp"))
    assert r.returncode == 0, r.stderr[-3000:]
    one = Dist(0, 1, torch.device("cpu"))
    cfg = EngineConfig(out=str(tmp_path / "one"), steps=6, lr=0.05, warmup=1, checkpoint_every=3)
    Engine(LinearTask(one), cfg, dist=one).run()
    assert _losses(tmp_path / "ddp") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    a = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == [
        "step_0000003", "step_0000006"]  # fmt: skip
