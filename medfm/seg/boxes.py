"""Boxes: the tight box of a mask, the pixels a box covers, and the checks of a box prompt.

Conventions (SAM's, those of `medfm.seg`): a box is ``x0, y0, x1, y1`` float in pixels, x =
column, y = row, a pixel's centre at its integer index; the tight box of a mask runs from its
first to its last column / row, inclusive (a one-pixel mask has ``x0 == x1``). Masks are
``(H, W)`` (one image) or ``(N, H, W)`` (a stack) bool.
"""

from __future__ import annotations

import numpy as np
import torch

from medfm.errors import MedfmError

__all__ = [
    "as_masks",
    "box_extent",
    "box_region",
    "check_box",
    "check_boxes",
    "mask_box",
    "tight_box",
    "tight_boxes",
]


# --------------------------------------------------------------------------- one mask (numpy)


def tight_box(mask: np.ndarray) -> np.ndarray:
    """mask (H, W) bool, not empty -> (4,) float32 ``x0, y0, x1, y1`` = min col, min row,
    max col, max row (pixel indices, x1 / y1 inclusive)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise MedfmError("tight_box: the mask is empty")
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float32)


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """The tight box of a mask (`tight_box`), None when it is empty."""
    return tight_box(mask) if mask.any() else None


# --------------------------------------------------------------------------- mask stacks (torch)


def as_masks(masks: torch.Tensor, name: str = "masks") -> torch.Tensor:
    """Check an ``(N, H, W)`` mask stack; bool or integer (non-zero = inside) -> bool."""
    if not isinstance(masks, torch.Tensor):
        raise MedfmError(f"{name} must be a torch tensor (N, H, W), got {type(masks).__name__}")
    if masks.ndim != 3:
        raise MedfmError(f"{name} must have shape (N, H, W), got {tuple(masks.shape)}")
    if masks.dtype.is_floating_point or masks.dtype.is_complex:
        raise MedfmError(
            f"{name} must be bool (or integer 0/1), got {masks.dtype}; threshold first"
        )
    return masks if masks.dtype == torch.bool else masks != 0


def box_extent(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """masks (N, H, W) bool -> (boxes (N, 4) int64 xyxy, empty (N,) bool); empty rows hold
    an inverted box (x0 = W, x1 = -1) that contains no pixel."""
    _, h, w = masks.shape
    rows = masks.any(dim=2)  # (N, H)
    cols = masks.any(dim=1)  # (N, W)
    ar_w = torch.arange(w, device=masks.device)
    ar_h = torch.arange(h, device=masks.device)
    x0 = torch.where(cols, ar_w, w).amin(dim=1)
    x1 = torch.where(cols, ar_w, -1).amax(dim=1)
    y0 = torch.where(rows, ar_h, h).amin(dim=1)
    y1 = torch.where(rows, ar_h, -1).amax(dim=1)
    return torch.stack([x0, y0, x1, y1], dim=1), ~rows.any(dim=1)


def tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    """masks (N, H, W) bool -> boxes (N, 4) float32 xyxy: x0 = first column, y0 = first row,
    x1 = last column, y1 = last row of the mask (SAM's continuous convention).

    An empty mask raises `MedfmError` (it has no box).
    """
    masks = as_masks(masks)
    boxes, empty = box_extent(masks)
    if bool(empty.any()):
        bad = torch.nonzero(empty).flatten()[:10].tolist()
        raise MedfmError(
            f"empty mask at index {bad}: a box needs at least one foreground pixel; "
            "drop empty targets before prompting"
        )
    return boxes.float()


# --------------------------------------------------------------------------- box prompts


def box_region(boxes: np.ndarray | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boxes (N, 4) x0, y0, x1, y1 in pixels of a (height, width) image -> (N, height, width)
    bool: the pixels each box covers, columns floor(x0)..ceil(x1) and rows floor(y0)..ceil(y1)
    inclusive (a tight box's x1 / y1 is its last pixel; a fractional box keeps every pixel it
    touches)."""
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float64)).reshape(-1, 4)
    lo = b[:, :2].floor()
    hi = b[:, 2:].ceil()
    cols = torch.arange(width, dtype=b.dtype)
    rows = torch.arange(height, dtype=b.dtype)
    in_cols = (cols >= lo[:, :1]) & (cols <= hi[:, :1])  # (N, W)
    in_rows = (rows >= lo[:, 1:]) & (rows <= hi[:, 1:])  # (N, H)
    return in_rows[:, :, None] & in_cols[:, None, :]


def check_box(box: np.ndarray, height: int, width: int) -> None:
    """A 2D box (4,) xyxy must lie inside a (height, width) image with x0 <= x1, y0 <= y1."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 < x0 or y1 < y0:
        raise MedfmError(f"box {box.tolist()} has x1 < x0 or y1 < y0; give x0,y0,x1,y1")
    if x0 < 0 or y0 < 0 or x1 > width - 1 or y1 > height - 1:
        raise MedfmError(
            f"box {box.tolist()} lies outside the image (width {width}, height {height}); "
            f"x must be in 0..{width - 1} and y in 0..{height - 1}"
        )


def check_boxes(b: np.ndarray, height: int, width: int, *, who: str) -> np.ndarray:
    """Box prompts (N, 4) x0, y0, x1, y1 (or one (4,) box) float64 for a (height, width) image
    -> (N, 4), checked: finite, x0 <= x1 and y0 <= y1, inside ``0..width`` x ``0..height``
    (a box may reach the image's far edge). ``who`` begins every message (the model's name)."""
    if b.shape == (4,):
        b = b[None]
    if b.ndim != 2 or b.shape[1] != 4:
        raise MedfmError(f"{who}: boxes must be (N, 4) x0, y0, x1, y1, got {b.shape}")
    if not np.isfinite(b).all():
        raise MedfmError(f"{who}: boxes contain NaN or inf")
    flipped = np.flatnonzero((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1]))
    if flipped.size:
        i = int(flipped[0])
        raise MedfmError(
            f"{who}: box {i} {b[i].tolist()} has x1 < x0 or y1 < y0; "
            "boxes are x0, y0, x1, y1 with x0 <= x1 and y0 <= y1"
        )
    outside = np.flatnonzero((b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > width) | (b[:, 3] > height))
    if outside.size:
        i = int(outside[0])
        raise MedfmError(
            f"{who}: box {i} {b[i].tolist()} lies outside the {width} x {height} "
            f"(W x H) image; boxes are x0, y0, x1, y1 pixels with 0 <= x <= {width} "
            f"and 0 <= y <= {height}"
        )
    return b
