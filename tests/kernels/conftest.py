"""Fixtures for the kernel tests: a seeded generator and a CUDA device (skip when none)."""

import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh CPU generator with a fixed seed (tests never touch the global RNG)."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def cuda() -> torch.device:
    """The CUDA device; skips the test when none is available. Use with @pytest.mark.gpu."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")
