"""Preview grids of a synthetic dataset: images with coloured mask outlines, one row per
modality (from the manifest), three mid-slices per 3D case (drawing: `medfm.viz`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medfm.errors import MedfmError
from medfm.io import atomic_path, iter_dataset, read_dataset_json
from medfm.synth.manifest import read_manifest
from medfm.viz import TILE, mid_slices, montage, outline_tile

__all__ = ["write_preview"]


def write_preview(folder: str | os.PathLike, out: str | os.PathLike, *, per_row: int = 6) -> Path:
    """Write a grid of the first cases of each modality (3D: mid slices) to ``out``."""
    folder = Path(folder)
    read_dataset_json(folder)
    try:
        modality = {r["case"]: r["modality"] for r in read_manifest(folder)}
    except MedfmError:
        modality = {}
    rows: dict[str, list[np.ndarray]] = {}
    for case, image, label in iter_dataset(folder):
        m = modality.get(case, "all")
        row = rows.setdefault(m, [])
        if len(row) >= per_row:
            if all(len(r) >= per_row for r in rows.values()) and len(rows) >= len(
                set(modality.values()) or {"all"}
            ):
                break
            continue
        img, lab = image.data[0], label.data[0]
        if img.dim() == 3:
            row.extend(outline_tile(a, b) for a, b in mid_slices(img, lab))
        else:
            row.append(outline_tile(img, lab))
    if not rows:
        raise MedfmError(f"{folder} has no cases to preview yet")
    grid = montage(list(rows.values()), TILE)
    from PIL import Image

    out = Path(out)
    with atomic_path(out) as tmp:
        Image.fromarray(grid).save(tmp)
    return out
