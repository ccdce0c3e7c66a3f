"""Per-step randomness and the learning-rate schedule: functions of the step number only, so a
resumed run draws and steps exactly as an uninterrupted one."""

from __future__ import annotations

import math

import torch


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of one training (micro-)step: a function of (seed, step) only."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(step) * 7919) & 0x7FFFFFFFFFFFFFFF)
    return g


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


__all__ = ["lr_factor", "step_generator"]
