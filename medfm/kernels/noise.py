"""Smooth random fields: coarse random grids upsampled to full size (no randomness inside)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from medfm.errors import MedfmError
from medfm.kernels._common import _check_size, _per_sample, _safe_std, _spatial_ndim

__all__ = ["smooth_field", "fractal_field"]

_LINEAR_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def smooth_field(coarse: Tensor, size: Sequence[int]) -> Tensor:
    """Upsample coarse values (B, C, *c) to a smooth field (B, C, *size).

    (Bi/tri)linear interpolation with align_corners=True: the coarse grid's corner values land on
    the field's corner voxels. A coarse axis of length 1 gives a constant along that axis.
    """
    nd = _spatial_ndim(coarse, "coarse")
    size = _check_size(size, nd)
    if not coarse.is_floating_point():
        raise MedfmError(f"coarse must be a floating point tensor, got {coarse.dtype}")
    if tuple(coarse.shape[2:]) == size:
        return coarse.clone()
    return F.interpolate(coarse, size=size, mode=_LINEAR_MODES[nd], align_corners=True)


def fractal_field(
    octaves: Sequence[Tensor], size: Sequence[int], persistence: float | Tensor = 0.5
) -> Tensor:
    """Multi-octave smooth random field (B, C, *size), zero mean and unit std per (sample, channel).

    Octave i (B, C, *c_i) (usually standard normal noise on coarse grids of growing resolution)
    is upsampled with `smooth_field` and weighted by persistence**i (a number or a tensor (B,));
    the sum is then standardised over the spatial dims (population std; a constant field
    (std below 1e-6 * |mean|) becomes 0).
    """
    if len(octaves) == 0:
        raise MedfmError("fractal_field needs at least one octave")
    first = octaves[0]
    nd = _spatial_ndim(first, "octaves[0]")
    size = _check_size(size, nd)
    batch, channels = first.shape[:2]
    p = _per_sample(
        persistence, batch, nd + 2, device=first.device, dtype=first.dtype, name="persistence"
    )
    total = None
    weight = torch.ones_like(p)
    for i, octave in enumerate(octaves):
        if octave.ndim != first.ndim or tuple(octave.shape[:2]) != (batch, channels):
            raise MedfmError(
                f"octave {i} has shape {tuple(octave.shape)}; every octave must be "
                f"({batch}, {channels}, *coarse) with {nd} spatial dims"
            )
        up = smooth_field(octave, size)
        total = up * weight if total is None else total.add_(up * weight)
        weight = weight * p
    dims = tuple(range(2, nd + 2))
    std, mean = torch.std_mean(total, dim=dims, correction=0, keepdim=True)
    std = _safe_std(std, mean)
    return (total - mean) / std
