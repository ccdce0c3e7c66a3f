"""Pictures of volumes in model units: a montage with one row per volume (its three middle
slices), what training writes every ``sample_every`` steps and what a user looks at to judge
whether samples resemble the real volumes beside them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medfm.io import write_png
from medfm.viz import TILE, montage, volume_tiles

__all__ = ["write_montage"]


def write_montage(
    volumes: Sequence[torch.Tensor], path: str | os.PathLike, *, tile: int = TILE
) -> Path:
    """Write a PNG with one row per volume (C, X, Y, Z) or (X, Y, Z) (channel 0; each shown
    on its own grey range): its middle slices along axes 2, 1 and 0. Returns the path."""
    rows = []
    for v in volumes:
        v = v.detach().float().cpu()
        rows.append(volume_tiles(v[0] if v.ndim == 4 else v, size=tile))
    grid = montage(rows, tile)
    write_png(np.moveaxis(grid, -1, 0), path)
    return Path(path)
