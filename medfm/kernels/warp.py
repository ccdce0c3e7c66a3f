"""Dense displacement warps (elastic deformation) with F.grid_sample.

Displacements are in voxels, channel j = displacement along spatial tensor axis j (the order of
the tensor's axes, not grid_sample's reversed x, y, z order: the reversal happens in here).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from medfm.errors import MedfmError
from medfm.kernels._common import _check_size, _per_sample, _spatial_ndim
from medfm.kernels.noise import smooth_field

__all__ = ["identity_grid", "elastic_displacement", "warp", "warp_labels"]

_MODES = ("bilinear", "nearest")
_PADDING_MODES = ("zeros", "border", "reflection")


def identity_grid(
    size: Sequence[int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Voxel index coordinates (ndim, *size): channel j holds the index along spatial axis j."""
    size = _check_size(size, len(size))
    axes = [torch.arange(n, device=device, dtype=dtype) for n in size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def elastic_displacement(coarse: Tensor, size: Sequence[int], magnitude: float | Tensor) -> Tensor:
    """Smooth displacement field (B, ndim, *size) in voxels from coarse values (B, ndim, *c).

    = smooth_field(coarse, size) * magnitude, magnitude a number or a tensor (B,) (voxels per
    unit of `coarse`; with standard normal `coarse` it is the displacement's std at the coarse
    nodes). Channel j is the displacement along spatial tensor axis j.
    """
    nd = _spatial_ndim(coarse, "coarse")
    if coarse.shape[1] != nd:
        raise MedfmError(
            f"coarse must have one channel per spatial axis, shape (B, {nd}, *c), "
            f"got {tuple(coarse.shape)}"
        )
    field = smooth_field(coarse, size)
    m = _per_sample(
        magnitude, coarse.shape[0], nd + 2, device=field.device, dtype=field.dtype, name="magnitude"
    )
    return field * m


def _sampling_grid(displacement: Tensor, dtype: torch.dtype) -> Tensor:
    """Voxel displacement (B, nd, *S) -> grid_sample grid (B, *S, nd), align_corners=True.

    Sample point p + d(p) along axis j is normalised as 2 * (p_j + d_j) / (L_j - 1) - 1 and the
    last grid component refers to the first spatial axis (grid_sample's x, y, z order).
    """
    nd = displacement.shape[1]
    spatial = displacement.shape[2:]
    d = displacement.to(dtype)
    comps = []
    for j in reversed(range(nd)):
        length = spatial[j]
        scale = 2.0 / (length - 1) if length > 1 else 0.0
        shape = [1] * nd
        shape[j] = length
        base = torch.arange(length, device=d.device, dtype=torch.float64) * scale - 1.0
        comps.append(torch.add(base.to(dtype).reshape(shape), d[:, j], alpha=scale))
    return torch.stack(comps, dim=-1)


def warp(
    x: Tensor,
    displacement: Tensor,
    *,
    mode: str = "bilinear",
    padding_mode: str = "border",
) -> Tensor:
    """Warp x (B, C, *S) by a displacement (B, ndim, *S) in voxels: out(p) = x(p + d(p)).

    mode "bilinear" (trilinear in 3D) for images or "nearest" for labels; integer or bool tensors
    need "nearest" and come back with their dtype and only values found in x (plus 0 where
    padding_mode="zeros" samples outside). padding_mode as in F.grid_sample ("border" repeats
    the edge). A displacement with batch 1 is used for every sample. Zero displacement returns
    x exactly for nearest and, for bilinear, to the resolution of grid_sample's float32
    normalised coordinates (about 1e-7 * L voxels, e.g. 1e-6 on (17, 23), 2e-6 on (10, 20, 30)).
    """
    nd = _spatial_ndim(x)
    if mode not in _MODES:
        raise MedfmError(f"mode must be one of {_MODES}, got {mode!r}")
    if padding_mode not in _PADDING_MODES:
        raise MedfmError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
    batch = x.shape[0]
    if (
        displacement.ndim != x.ndim
        or displacement.shape[0] not in (1, batch)
        or displacement.shape[1] != nd
        or displacement.shape[2:] != x.shape[2:]
    ):
        raise MedfmError(
            f"displacement must have shape ({batch}, {nd}, *{tuple(x.shape[2:])}) "
            f"to warp x of shape {tuple(x.shape)}, got {tuple(displacement.shape)}"
        )
    if x.is_floating_point():
        work = x
    elif mode == "nearest" and not x.is_complex():
        # float32 holds every int16/uint8/bool exactly; wider integers go through float64.
        wide = x.dtype in (torch.int32, torch.int64)
        work = x.to(torch.float64 if wide else torch.float32)
    else:
        raise MedfmError(f"warping a {x.dtype} tensor needs mode='nearest' (or a float tensor)")
    grid = _sampling_grid(displacement.to(x.device), work.dtype)
    if grid.shape[0] != batch:
        grid = grid.expand(batch, *grid.shape[1:])
    out = F.grid_sample(work, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    return out if work is x else out.to(x.dtype)


def warp_labels(labels: Tensor, displacement: Tensor) -> Tensor:
    """Nearest-neighbour warp of a label map (B, C, *S) keeping its dtype (border padding)."""
    return warp(labels, displacement, mode="nearest", padding_mode="border")
