"""Shared fixtures for medfm.seg: tiny SAM ViT specs and checkpoints in the official format."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything.modeling import Sam

from medfm.seg.models import SamSpec, build_sam_vit

# A SAM ViT small enough for tests that keeps the official checkpoint's key names: 256 input,
# 16 px patches (a 16x16 embedding, 64x64 low-res masks), windows of 4, block 1 global.
TINY_SPEC = SamSpec(
    encoder_embed_dim=32,
    encoder_depth=2,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(1,),
    image_size=256,
    patch_size=16,
    window_size=4,
)
# Another size, standing in for "a vit_l checkpoint" when a tiny vit_b is asked for.
TINY_L_SPEC = SamSpec(
    encoder_embed_dim=48,
    encoder_depth=3,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(2,),
    image_size=256,
    patch_size=16,
    window_size=4,
)


def randomize_(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Add seeded noise to every parameter and buffer (SAM zero-initialises some, e.g. the
    relative position tables), so that loading the wrong values would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * scale)
    return model


def tiny_sam(spec: SamSpec = TINY_SPEC, seed: int = 0) -> Sam:
    """A tiny SAM ViT with seeded random weights (eval mode): the same for the same seed (the
    modules' own initialisation draws from torch's global generator, forked here)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_sam_vit(spec)
    return randomize_(model, seed).eval()


@pytest.fixture
def tiny_spec() -> SamSpec:
    return TINY_SPEC


@pytest.fixture
def tiny_l_spec() -> SamSpec:
    return TINY_L_SPEC


@pytest.fixture
def write_tiny_checkpoint(tmp_path) -> Callable[..., tuple[Path, dict]]:
    """write(name="sam_tiny.pth", spec=TINY_SPEC, seed=0, wrap=None, prefix="") -> (path, state):
    a tiny random SAM saved as official SAM checkpoints are (``torch.save`` of the state dict;
    ``wrap="model"`` nests it as training checkpoints do, ``prefix="module."`` as DDP does)."""

    def write(
        name: str = "sam_tiny.pth",
        spec: SamSpec = TINY_SPEC,
        seed: int = 0,
        wrap: str | None = None,
        prefix: str = "",
    ) -> tuple[Path, dict]:
        state = tiny_sam(spec, seed).state_dict()
        saved = {prefix + k: v for k, v in state.items()}
        path = tmp_path / name
        torch.save({wrap: saved} if wrap else saved, path)
        return path, state

    return write


@pytest.fixture(scope="module")
def ellipse_image() -> np.ndarray:
    """A 30 x 50 grey image: a bright ellipse on a noisy background."""
    g = np.random.default_rng(1)
    rows, cols = np.mgrid[0:30, 0:50]
    img = 60 + g.normal(0, 10, (30, 50))
    img[((rows - 15) / 9) ** 2 + ((cols - 25) / 14) ** 2 <= 1] += 110
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> tuple[Path, Path]:
    """test_evaluate's two small labelled sets (2D .png, 3D .nii.gz), e.g. to calibrate on."""
    from .test_evaluate import write_sets

    return write_sets(tmp_path_factory.mktemp("sets"))


@pytest.fixture
def folder(tmp_path) -> Path:
    """A random medfm-tiny saved as a medfm model folder."""
    from medfm.seg.models import save_pretrained
    from medfm.seg.tiny import build_medfm_tiny

    model = randomize_(build_medfm_tiny(), seed=3)
    return save_pretrained(model, tmp_path / "m", name="medfm-tiny")
