"""Intensity mappings: CT windowing, percentile normalisation, z-scoring (all per sample)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from medfm.errors import MedfmError
from medfm.kernels._common import _per_sample, _safe_std

__all__ = ["window", "normalize_percentiles", "zscore"]


def _rescale(
    x: Tensor, lo: Tensor, hi: Tensor, out_range: tuple[float, float], clip: bool
) -> Tensor:
    """Map [lo, hi] (per sample, broadcastable) linearly onto out_range, optionally clipped."""
    b_min, b_max = float(out_range[0]), float(out_range[1])
    span = hi - lo
    span = torch.where(span != 0, span, torch.ones_like(span))
    y = (x - lo) / span
    if clip:
        y = y.clamp(0.0, 1.0)
    return y * (b_max - b_min) + b_min


def _check_float(x: Tensor) -> None:
    if not x.is_floating_point():
        raise MedfmError(f"expected a floating point tensor, got {x.dtype}")
    if x.ndim < 2:
        raise MedfmError(f"expected a batch (B, C, *S), got shape {tuple(x.shape)}")


def window(
    x: Tensor,
    level: float | Tensor,
    width: float | Tensor,
    out_range: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """CT windowing of x (B, C, *S) in HU: [level - width/2, level + width/2] -> out_range.

    = clip((x - (level - width / 2)) / width, 0, 1) rescaled to out_range; level and width (HU,
    width > 0) are numbers or tensors (B,). E.g. abdomen W360/L60: window(x, 60, 360).
    """
    _check_float(x)
    if not isinstance(width, Tensor) and not float(width) > 0:
        raise MedfmError(f"window width must be > 0 HU, got {width}")
    lev = _per_sample(level, x.shape[0], x.ndim, device=x.device, dtype=x.dtype, name="level")
    wid = _per_sample(width, x.shape[0], x.ndim, device=x.device, dtype=x.dtype, name="width")
    lo = lev - wid / 2
    return _rescale(x, lo, lo + wid, out_range, clip=True)


def _percentile_values(flat: Tensor, p: float) -> Tensor:
    """Percentile p of each row of flat (B, N), linear interpolation as torch.quantile."""
    n = flat.shape[1]
    rank = p / 100.0 * (n - 1)
    below = math.floor(rank)
    frac = rank - below
    above = min(below + 1, n - 1)
    # the order statistics `below` and `above` (0-based) from a partial sort of the nearer tail
    if below < n - 1 - above:
        vals = flat.topk(above + 1, dim=1, largest=False).values  # ascending
        v_below, v_above = vals[:, below], vals[:, above]
    else:
        vals = flat.topk(n - below, dim=1, largest=True).values  # descending
        v_below, v_above = vals[:, n - 1 - below], vals[:, n - 1 - above]
    if frac == 0.0:
        return v_below
    return torch.lerp(v_below, v_above, torch.full_like(v_below, frac))


def normalize_percentiles(
    x: Tensor,
    lower: float = 0.5,
    upper: float = 99.5,
    out_range: tuple[float, float] = (0.0, 1.0),
    clip: bool = True,
) -> Tensor:
    """Map the [lower, upper] percentiles (0-100) of each sample of x (B, C, *S) to out_range.

    Percentiles over C and all spatial dims of a sample, interpolated linearly like
    torch.quantile / numpy.percentile, but computed with torch.kthvalue so that samples with
    more than 16M elements work. clip=True clamps the result to out_range. A constant sample
    maps to out_range[0].
    """
    _check_float(x)
    if not 0.0 <= lower <= upper <= 100.0:
        raise MedfmError(f"need 0 <= lower <= upper <= 100, got lower={lower}, upper={upper}")
    batch = x.shape[0]
    flat = x.reshape(batch, -1)
    if flat.shape[1] == 0:
        raise MedfmError(f"cannot normalise an empty tensor of shape {tuple(x.shape)}")
    shape = (batch,) + (1,) * (x.ndim - 1)
    lo = _percentile_values(flat, lower).reshape(shape)
    hi = _percentile_values(flat, upper).reshape(shape)
    return _rescale(x, lo, hi, out_range, clip)


def zscore(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sample z-score of x (B, C, *S): (x - mean) / std over C and spatial dims.

    mask (B, 1 or C, *S) bool (or 0/1) restricts the statistics to the masked voxels; the whole
    of x is transformed. Population std; a constant sample (std <= 1e-6 * |mean|, i.e. at float
    rounding level) or an empty mask is only centred (divided by 1).
    """
    _check_float(x)
    dims = tuple(range(1, x.ndim))
    if mask is None:
        std, mean = torch.std_mean(x, dim=dims, correction=0, keepdim=True)
    else:
        if mask.ndim != x.ndim or mask.shape[0] != x.shape[0] or mask.shape[2:] != x.shape[2:]:
            raise MedfmError(
                f"mask must have shape (B, 1 or C, *S) matching x {tuple(x.shape)}, "
                f"got {tuple(mask.shape)}"
            )
        m = mask.to(device=x.device, dtype=x.dtype).expand_as(x)
        count = m.sum(dim=dims, keepdim=True).clamp_min(1)
        mean = (x * m).sum(dim=dims, keepdim=True) / count
        var = (((x - mean) * m) ** 2).sum(dim=dims, keepdim=True) / count
        std = var.sqrt()
    return (x - mean) / _safe_std(std, mean)
