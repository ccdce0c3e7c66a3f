"""The ``--device`` option shared by every command: checked once, with a one-line error."""

from __future__ import annotations

import torch

from medfm.errors import MedfmError


def parse_device(device: str | torch.device) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' (or a torch.device), checked against what torch sees."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise MedfmError(f"--device must be cpu or cuda, got {str(device)!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MedfmError("--device cuda was asked for but torch sees no CUDA device")
    return dev


__all__ = ["parse_device"]
