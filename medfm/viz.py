"""Pictures for people: grey images with coloured label outlines, mid-slices of volumes,
montages of tiles, and the image / truth / prediction strip of an evaluation overlay.

Used by every model family (synthetic-data previews, segmentation overlays, diffusion
previews), so it imports none of them: only torch, numpy and medfm's errors.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medfm.errors import MedfmError

__all__ = [
    "PALETTE",
    "TILE",
    "mid_slices",
    "montage",
    "outline_tile",
    "overlay_row",
    "prompt_overlay",
    "to_grey",
    "volume_tiles",
]

TILE = 192
"""Side in pixels of a preview tile."""

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
"""(10, 3) uint8 RGB colours; label k is drawn in ``PALETTE[(k - 1) % 10]``."""


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
    """image (H, W), label (H, W) integer -> a (size, size, 3) uint8 tile: the grey image
    (longest side scaled to ``size``, top-left aligned, black padding) with each label's
    outline in its `PALETTE` colour."""
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


def volume_tiles(
    image: torch.Tensor, label: torch.Tensor | None = None, size: int = TILE
) -> list[np.ndarray]:
    """A volume (X, Y, Z) as three (size, size, 3) uint8 tiles of its middle slices (axis 2,
    1, 0), with ``label``'s outlines when given."""
    lab = torch.zeros(image.shape, dtype=torch.long) if label is None else label
    return [outline_tile(a, b, size) for a, b in mid_slices(image, lab)]


def montage(rows: Sequence[Sequence[np.ndarray]], tile: int = TILE) -> np.ndarray:
    """Rows of (tile, tile, 3) uint8 tiles -> one (len(rows) * tile, width * tile, 3) uint8
    grid, width the longest row's length; shorter rows end in black."""
    if not rows or not any(len(r) for r in rows):
        raise MedfmError("a montage needs at least one tile")
    width = max(len(r) for r in rows)
    grid = np.zeros((len(rows) * tile, width * tile, 3), dtype=np.uint8)
    for r, tiles in enumerate(rows):
        for c, t in enumerate(tiles[:width]):
            grid[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = t
    return grid


def overlay_row(rgb: np.ndarray, gt: np.ndarray, pred: np.ndarray, size: int = 256) -> np.ndarray:
    """rgb (H, W, 3) uint8, gt and pred (H, W) integer label maps -> (3, size, 3 * size) uint8:
    the image, its ground-truth outlines, its predicted outlines, side by side."""
    grey = torch.from_numpy(rgb.mean(axis=-1).round().astype(np.uint8))
    tiles = [
        outline_tile(grey, torch.zeros(gt.shape, dtype=torch.long), size),
        outline_tile(grey, torch.from_numpy(gt.astype(np.int64)), size),
        outline_tile(grey, torch.from_numpy(pred.astype(np.int64)), size),
    ]
    return np.moveaxis(np.concatenate(tiles, axis=1), -1, 0)


BOX_COLOUR = np.array([255, 255, 0], dtype=np.uint8)
CLICK_COLOURS = {1: np.array([0, 255, 0], np.uint8), 0: np.array([255, 0, 0], np.uint8)}


def prompt_overlay(
    image: torch.Tensor,
    label: torch.Tensor,
    *,
    boxes: np.ndarray | None = None,
    points: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    min_side: int = 256,
) -> np.ndarray:
    """A picture of one prompted segmentation: image (H, W) grey (or (H, W, 3), shown grey),
    label (H, W) integer -> (h, w, 3) uint8, the image enlarged so that its longest side is at
    least ``min_side`` (never shrunk), each label's outline in its `PALETTE` colour, the boxes
    (N, 4) ``x0, y0, x1, y1`` in image pixels as yellow rectangles, the clicks (P, 2) ``x, y``
    as crosses, green for positive (``point_labels`` 1) and red for negative (0)."""
    if image.ndim == 3:
        image = image.float().mean(dim=-1)
    h, w = image.shape
    side = max(min_side, h, w)
    scale = side / max(h, w)
    hs, ws = max(1, round(h * scale)), max(1, round(w * scale))
    rgb = outline_tile(image, label, side)[:hs, :ws].copy()

    def px(v: float, n: int) -> int:  # image pixel centre -> picture pixel, inside it
        return int(min(max(round((v + 0.5) * scale - 0.5), 0), n - 1))

    for x0, y0, x1, y1 in [] if boxes is None else np.asarray(boxes, np.float64).reshape(-1, 4):
        c0, c1, r0, r1 = px(x0, ws), px(x1, ws), px(y0, hs), px(y1, hs)
        rgb[r0, c0 : c1 + 1] = rgb[r1, c0 : c1 + 1] = BOX_COLOUR
        rgb[r0 : r1 + 1, c0] = rgb[r0 : r1 + 1, c1] = BOX_COLOUR
    if points is not None:
        pts = np.asarray(points, np.float64).reshape(-1, 2)
        labs = np.ones(len(pts), int) if point_labels is None else np.asarray(point_labels)
        arm = max(2, round(max(hs, ws) / 100))
        for (x, y), lab in zip(pts, labs.reshape(-1), strict=True):
            c, r = px(x, ws), px(y, hs)
            colour = CLICK_COLOURS.get(int(lab), CLICK_COLOURS[1])
            rgb[r, max(0, c - arm) : c + arm + 1] = colour
            rgb[max(0, r - arm) : r + arm + 1, c] = colour
    return rgb
