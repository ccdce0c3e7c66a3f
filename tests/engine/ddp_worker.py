"""Run under ``torchrun``: the tiny task trained by the engine, data-parallel over gloo."""

import sys

import torch

from medfm.engine import Engine, EngineConfig, setup_distributed
from tests.engine.tiny import LinearTask

if __name__ == "__main__":
    out = sys.argv[1]
    dist = setup_distributed(torch.device("cpu"))
    cfg = EngineConfig(out=out, steps=6, lr=0.05, warmup=1, checkpoint_every=3)
    Engine(LinearTask(dist), cfg, dist=dist).run()
