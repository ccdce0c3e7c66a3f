"""Preview grids: images with coloured mask outlines, one row per modality."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medfm.errors import MedfmError
from medfm.io import atomic_path, iter_dataset, read_dataset_json

TILE = 192
PALETTE = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
    ],
    dtype=np.uint8,
)


def to_grey(image: torch.Tensor) -> torch.Tensor:
    """(H, W) any dtype -> float [0, 1] (robust range: 0.5 and 99.5 percentiles)."""
    x = image.float()
    if image.dtype == torch.uint8:
        return x / 255
    flat = x.flatten()
    if flat.numel() > 2_000_000:
        flat = flat[:: flat.numel() // 2_000_000 + 1]
    lo, hi = torch.quantile(flat, torch.tensor([0.005, 0.995]))
    return ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)


def outline_tile(image: torch.Tensor, label: torch.Tensor, size: int = TILE) -> np.ndarray:
    """A (size, size, 3) uint8 tile: grey image with label outlines in colour."""
    h, w = image.shape
    scale = size / max(h, w)
    hs, ws = max(1, round(h * scale)), max(1, round(w * scale))
    g = F.interpolate(
        to_grey(image)[None, None], size=(hs, ws), mode="bilinear", align_corners=False
    )[0, 0]
    lab = F.interpolate(label.float()[None, None], size=(hs, ws), mode="nearest")[0, 0].long()
    rgb = (g[..., None].repeat(1, 1, 3) * 255).round().byte().numpy()
    edge = torch.zeros_like(lab, dtype=torch.bool)
    edge[1:] |= lab[1:] != lab[:-1]
    edge[:-1] |= lab[1:] != lab[:-1]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[:, :-1] |= lab[:, 1:] != lab[:, :-1]
    # colour each edge pixel with the larger label touching it
    big = lab.clone()
    big[1:] = torch.maximum(big[1:], lab[:-1])
    big[:, 1:] = torch.maximum(big[:, 1:], lab[:, :-1])
    m = (edge & (big > 0)).numpy()
    rgb[m] = PALETTE[(big.numpy()[m] - 1) % len(PALETTE)]
    tile = np.zeros((size, size, 3), dtype=np.uint8)
    tile[:hs, :ws] = rgb
    return tile


def mid_slices(image: torch.Tensor, label: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three orthogonal middle slices of (X, Y, Z) volumes: axis 2 (axial), 1 and 0."""
    out = []
    for axis in (2, 1, 0):
        i = image.shape[axis] // 2
        out.append((image.select(axis, i), label.select(axis, i)))
    return out


def write_preview(folder: str | os.PathLike, out: str | os.PathLike, *, per_row: int = 6) -> Path:
    """Write a grid of the first cases of each modality (3D: mid slices) to ``out``."""
    folder = Path(folder)
    read_dataset_json(folder)
    from medfm.synth.dataset import read_manifest

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
    width = max(len(r) for r in rows.values())
    grid = np.zeros((len(rows) * TILE, width * TILE, 3), dtype=np.uint8)
    for r, tiles in enumerate(rows.values()):
        for c, t in enumerate(tiles[:width]):
            grid[r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE] = t
    from PIL import Image

    out = Path(out)
    with atomic_path(out) as tmp:
        Image.fromarray(grid).save(tmp)
    return out
