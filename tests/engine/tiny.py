"""A tiny task for the engine's tests: least squares on fixed data, split over processes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from medfm.engine import Dist, Task


class LinearTask(Task):
    """y = X w + noise, fitted by a (10 -> 1) linear layer; each step draws ``batch`` rows.

    Under data-parallel training process r takes rows r, r + world, ... of the step's draw
    and returns its share of the batch mean. ``nan_at``: the step whose loss is NaN.
    """

    def __init__(self, dist: Dist, batch: int = 8, nan_at: int | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 10, generator=g)
        self.y = self.x @ torch.randn(10, 1, generator=g) + 0.1 * torch.randn(64, 1, generator=g)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            self.module = nn.Linear(10, 1)
        self.dist, self.batch, self.nan_at = dist, batch, nan_at

    def step(self, net, step, generator):
        idx = torch.randint(64, (self.batch,), generator=generator)
        mine = idx[self.dist.rank :: self.dist.world]
        err = net(self.x[mine]) - self.y[mine]
        loss = (err**2).sum() / self.batch
        if step == self.nan_at:
            loss = loss * float("nan")
        return loss, {"abs_err": float(err.detach().abs().sum()) / self.batch}

    def config(self) -> dict:
        return {"kind": "linear"}

    def save_model(self, folder: Path, ema) -> Path:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.trained_state(), str(folder / "model.safetensors"))
        if ema is not None:
            save_file(ema, str(folder / "ema.safetensors"))
        (folder / "config.json").write_text(json.dumps(self.config()))
        return folder
