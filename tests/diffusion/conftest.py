"""Tiny diffusion models for the tests (a few thousand weights, non-cubic patches)."""

from __future__ import annotations

import pytest
import torch

from medfm.diffusion.config import DiffusionConfig, UNetConfig


def tiny_config(patch=(8, 8, 16), regions=("head-neck", "chest", "abdomen", "other"), **unet):
    u = dict(
        channels=(8, 16), attention_levels=(False, True), norm_num_groups=8,
        num_head_channels=8, pos_frequencies=2, regions=regions,
    )  # fmt: skip
    u.update(unet)
    return DiffusionConfig(unet=UNetConfig(**u), patch=patch)


def untrained(config, seed: int = 0):
    """A model of ``config`` whose zero-initialised layers (MONAI zeroes the output and the
    residual branches' last convolutions) hold small random weights, so outputs vary."""
    from medfm.diffusion.model import DiffusionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiffusionModel(config)
        with torch.no_grad():
            for p in model.parameters():
                if not p.any():
                    p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture
def tiny_model():
    return untrained(tiny_config())
