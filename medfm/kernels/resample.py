"""Resampling to a new voxel spacing (corner voxel centres stay put, as scipy zoom)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from medfm.errors import MedfmError
from medfm.kernels._common import _spatial_ndim

__all__ = ["resample_to_spacing"]

_LINEAR_MODES = {2: "bilinear", 3: "trilinear"}


def _output_size(
    size: Sequence[int], spacing_in: Sequence[float], spacing_out: Sequence[float]
) -> tuple[int, ...]:
    nd = len(size)
    sp_in = [float(s) for s in spacing_in]
    sp_out = [float(s) for s in spacing_out]
    if len(sp_in) != nd or len(sp_out) != nd:
        raise MedfmError(
            f"need one spacing per spatial axis ({nd}), got spacing_in={tuple(spacing_in)}, "
            f"spacing_out={tuple(spacing_out)}"
        )
    if any(not s > 0 for s in sp_in + sp_out):
        raise MedfmError(f"spacings must be > 0 (mm), got {tuple(sp_in)} -> {tuple(sp_out)}")
    return tuple(max(1, round(n * a / b)) for n, a, b in zip(size, sp_in, sp_out, strict=True))


def _nearest_index(n_in: int, n_out: int, device: torch.device) -> Tensor:
    """Source index per output index: floor(i * (n_in - 1) / (n_out - 1) + 0.5) (scipy order=0)."""
    step = (n_in - 1) / (n_out - 1) if n_out > 1 else 1.0
    pos = torch.arange(n_out, device=device, dtype=torch.float64) * step
    return torch.floor(pos + 0.5).long().clamp_(0, n_in - 1)


def resample_to_spacing(
    x: Tensor,
    spacing_in: Sequence[float],
    spacing_out: Sequence[float],
    *,
    mode: str = "linear",
) -> Tensor:
    """Resample x (B, C, *S) from voxel spacing `spacing_in` to `spacing_out` (mm, per axis).

    Output (B, C, *S') with S'_j = max(1, round(S_j * spacing_in_j / spacing_out_j)). The first
    and last voxel centres stay put (align_corners=True; the physical extent between them is
    kept, so the achieved spacing is (S_j - 1) / (S'_j - 1) * spacing_in_j, close to
    spacing_out). mode "linear" ((bi/tri)linear, float input) or "nearest" (any dtype, kept;
    for label maps). Equal sizes return a copy of x.
    """
    nd = _spatial_ndim(x)
    size = tuple(x.shape[2:])
    out_size = _output_size(size, spacing_in, spacing_out)
    if mode not in ("linear", "nearest"):
        raise MedfmError(f"mode must be 'linear' or 'nearest', got {mode!r}")
    if out_size == size:
        return x.clone()
    if mode == "linear":
        if not x.is_floating_point():
            raise MedfmError(f"mode='linear' needs a floating point tensor, got {x.dtype}")
        return F.interpolate(x, size=out_size, mode=_LINEAR_MODES[nd], align_corners=True)
    out = x
    for j, (n_in, n_out) in enumerate(zip(size, out_size, strict=True)):
        if n_in != n_out:
            out = out.index_select(2 + j, _nearest_index(n_in, n_out, x.device))
    return out
