"""Ultrasound scan conversion between a polar (beam) image and a cartesian sector image.

Cartesian image axes (H, W) = (depth rows going down, lateral columns), with an optional
trailing elevation axis D passed through untouched: (B, C, H, W) or (B, C, H, W, D).
A sector is given per sample by:

- apex (B, 2): (row, col) of the transducer's virtual apex in output pixels (row may be < 0);
- r_range (B, 2): (r_min, r_max) radii in pixels;
- angle_range (B, 2): (theta_min, theta_max) in radians, 0 = straight down (+row), positive
  towards +col.

Each may also be a sequence of two numbers or a tensor (2,), used for every sample. The polar
image is (B, C, Nr, Ntheta[, D]): row i = radius r_min + i / (Nr - 1) * (r_max - r_min),
column j = angle theta_min + j / (Ntheta - 1) * (theta_max - theta_min).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from medfm.errors import MedfmError

__all__ = ["sector_grid", "polar_to_cartesian", "cartesian_to_polar"]

Pair = Tensor | Sequence[float]


def _batch_of(*params: Pair) -> int:
    sizes = {p.shape[0] for p in params if isinstance(p, Tensor) and p.ndim == 2}
    if len(sizes) > 1:
        raise MedfmError(f"apex, r_range and angle_range have different batch sizes {sizes}")
    return sizes.pop() if sizes else 1


def _device_of(*params: Pair) -> torch.device:
    for p in params:
        if isinstance(p, Tensor):
            return p.device
    return torch.device("cpu")


def _pairs(value: Pair, batch: int, device: torch.device, name: str) -> Tensor:
    """(B, 2) float32 tensor from a (B, 2) / (2,) tensor or a sequence of two numbers."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    if t.shape == (2,):
        t = t.expand(batch, 2)
    if t.shape != (batch, 2):
        raise MedfmError(f"{name} must have shape ({batch}, 2) or (2,), got {tuple(t.shape)}")
    return t


def _check_image(x: Tensor, name: str) -> None:
    if x.ndim not in (4, 5):
        raise MedfmError(f"{name} must be (B, C, H, W) or (B, C, H, W, D), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise MedfmError(f"{name} must be a floating point tensor, got {x.dtype}")


def _fold_depth(x: Tensor) -> Tensor:
    """(B, C, H, W, D) -> (B, C*D, H, W) so a 2D grid_sample treats each slice alike."""
    b, c, h, w, d = x.shape
    return x.movedim(-1, 2).reshape(b, c * d, h, w)


def _unfold_depth(y: Tensor, channels: int) -> Tensor:
    """(B, C*D, H, W) -> (B, C, H, W, D)."""
    b, cd, h, w = y.shape
    return y.reshape(b, channels, cd // channels, h, w).movedim(2, -1)


def sector_grid(
    out_size: tuple[int, int], apex: Pair, r_range: Pair, angle_range: Pair
) -> tuple[Tensor, Tensor]:
    """Sampling grid of a sector image (H, W) = out_size into its polar image.

    Returns (grid, inside): grid (B, H, W, 2) float32, normalised grid_sample coordinates
    (align_corners=True, last dim = (angle, radius) = (x, y) of the polar image); inside
    (B, 1, H, W) bool, True for pixels with r_min <= r <= r_max and theta_min <= theta <= theta_max
    (r, theta measured from the apex). B is the batch of the parameters (1 if none is (B, 2)).
    """
    h, w = (int(s) for s in out_size)
    if h < 1 or w < 1:
        raise MedfmError(f"out_size must be two positive ints, got {out_size}")
    batch = _batch_of(apex, r_range, angle_range)
    device = _device_of(apex, r_range, angle_range)
    ap = _pairs(apex, batch, device, "apex")
    rr = _pairs(r_range, batch, device, "r_range")
    ar = _pairs(angle_range, batch, device, "angle_range")
    rows = torch.arange(h, device=device, dtype=torch.float32).reshape(1, h, 1)
    cols = torch.arange(w, device=device, dtype=torch.float32).reshape(1, 1, w)
    dy = rows - ap[:, 0].reshape(batch, 1, 1)  # (B, H, 1)
    dx = cols - ap[:, 1].reshape(batch, 1, 1)  # (B, 1, W)
    r = torch.hypot(dy, dx)  # (B, H, W)
    theta = torch.atan2(dx, dy)
    r_min, r_max = rr[:, 0].reshape(batch, 1, 1), rr[:, 1].reshape(batch, 1, 1)
    t_min, t_max = ar[:, 0].reshape(batch, 1, 1), ar[:, 1].reshape(batch, 1, 1)
    u_r = (r - r_min) * (2.0 / (r_max - r_min)) - 1.0
    u_t = (theta - t_min) * (2.0 / (t_max - t_min)) - 1.0
    grid = torch.stack([u_t, u_r], dim=-1)
    inside = (r >= r_min) & (r <= r_max) & (theta >= t_min) & (theta <= t_max)
    return grid, inside.unsqueeze(1)


def polar_to_cartesian(
    polar: Tensor, apex: Pair, r_range: Pair, angle_range: Pair, out_size: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Scan conversion: polar (B, C, Nr, Ntheta[, D]) -> (image (B, C, H, W[, D]), mask).

    Bilinear interpolation; pixels outside the fan are exactly 0. mask (B, 1, H, W[, D]) bool is
    True inside the fan (the same for every elevation slice).
    """
    _check_image(polar, "polar")
    batch, channels = polar.shape[:2]
    grid, inside = sector_grid(
        out_size,
        _pairs(apex, batch, polar.device, "apex"),
        _pairs(r_range, batch, polar.device, "r_range"),
        _pairs(angle_range, batch, polar.device, "angle_range"),
    )
    src = _fold_depth(polar) if polar.ndim == 5 else polar
    out = F.grid_sample(
        src, grid.to(src.dtype), mode="bilinear", padding_mode="border", align_corners=True
    )
    out = torch.where(inside, out, torch.zeros((), dtype=out.dtype, device=out.device))
    if polar.ndim == 5:
        depth = polar.shape[-1]
        return _unfold_depth(out, channels), inside.unsqueeze(-1).expand(*inside.shape, depth)
    return out, inside


def cartesian_to_polar(
    image: Tensor,
    apex: Pair,
    r_range: Pair,
    angle_range: Pair,
    polar_size: tuple[int, int],
    *,
    padding_mode: str = "zeros",
) -> Tensor:
    """Inverse sampling: image (B, C, H, W[, D]) -> polar (B, C, Nr, Ntheta[, D]), bilinear.

    Polar samples that fall outside the image are 0 (``padding_mode="zeros"``) or take the
    nearest edge value (``"border"``).
    """
    _check_image(image, "image")
    if padding_mode not in ("zeros", "border", "reflection"):
        raise MedfmError(
            f"padding_mode must be 'zeros', 'border' or 'reflection', got {padding_mode!r}"
        )
    batch, channels, h, w = image.shape[:4]
    n_r, n_t = (int(s) for s in polar_size)
    if n_r < 1 or n_t < 1:
        raise MedfmError(f"polar_size must be two positive ints, got {polar_size}")
    device = image.device
    ap = _pairs(apex, batch, device, "apex")
    rr = _pairs(r_range, batch, device, "r_range")
    ar = _pairs(angle_range, batch, device, "angle_range")
    t_r = torch.linspace(0.0, 1.0, n_r, device=device).reshape(1, n_r, 1)
    t_t = torch.linspace(0.0, 1.0, n_t, device=device).reshape(1, 1, n_t)
    r = rr[:, 0].reshape(batch, 1, 1) + (rr[:, 1] - rr[:, 0]).reshape(batch, 1, 1) * t_r
    theta = ar[:, 0].reshape(batch, 1, 1) + (ar[:, 1] - ar[:, 0]).reshape(batch, 1, 1) * t_t
    rows = ap[:, 0].reshape(batch, 1, 1) + r * torch.cos(theta)  # (B, Nr, Ntheta)
    cols = ap[:, 1].reshape(batch, 1, 1) + r * torch.sin(theta)
    gy = rows * (2.0 / max(h - 1, 1)) - 1.0
    gx = cols * (2.0 / max(w - 1, 1)) - 1.0
    grid = torch.stack([gx, gy], dim=-1).to(image.dtype)
    src = _fold_depth(image) if image.ndim == 5 else image
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)
    return _unfold_depth(out, channels) if image.ndim == 5 else out
