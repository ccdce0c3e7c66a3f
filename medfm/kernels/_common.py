"""Private helpers shared by the kernels: per-sample parameters, shape and axis checks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from medfm.errors import MedfmError


def _per_sample(
    value: float | Tensor,
    batch: int,
    ndim: int,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    name: str = "value",
) -> Tensor:
    """Broadcast a per-sample parameter to shape (B, 1, ..., 1) with `ndim` dimensions in all.

    `value` is a python number, a 0-d tensor or a tensor of shape (B,). The result lives on
    `device` with `dtype`, so it multiplies a (B, C, *S) tensor directly.
    """
    shape = (batch,) + (1,) * (ndim - 1)
    if isinstance(value, Tensor):
        v = value.to(device=device, dtype=dtype)
        if v.ndim == 0:
            return v.expand(shape)
        if v.shape != (batch,):
            raise MedfmError(
                f"{name} must be a number or a tensor of shape ({batch},) (one value per batch "
                f"item), got shape {tuple(v.shape)}"
            )
        return v.reshape(shape)
    return torch.full(shape, float(value), device=device, dtype=dtype)


def _spatial_ndim(x: Tensor, name: str = "x", allowed: Sequence[int] = (2, 3)) -> int:
    """Number of spatial dims of a (B, C, *S) tensor; raise MedfmError if not in `allowed`."""
    nd = x.ndim - 2
    if nd not in allowed:
        want = " or ".join(str(a) for a in allowed)
        raise MedfmError(
            f"{name} must have shape (B, C, *spatial) with {want} spatial dims, "
            f"got shape {tuple(x.shape)}"
        )
    return nd


def _check_size(size: Sequence[int], nd: int, name: str = "size") -> tuple[int, ...]:
    """Validate a spatial size of length `nd` with positive entries; return it as a tuple."""
    out = tuple(int(s) for s in size)
    if len(out) != nd or any(s < 1 for s in out):
        raise MedfmError(f"{name} must be {nd} positive ints, got {tuple(size)}")
    return out


def _spatial_axis(x: Tensor, axis: int) -> int:
    """Resolve `axis` (a tensor axis, negative allowed) to a non-negative spatial axis >= 2."""
    a = axis + x.ndim if axis < 0 else axis
    if not 2 <= a < x.ndim:
        raise MedfmError(
            f"axis {axis} is not a spatial axis of a tensor of shape {tuple(x.shape)}; "
            "use an axis in [2, ndim) or a negative one such as -1"
        )
    return a


def _line_shape(x: Tensor, axis: int) -> tuple[int, ...]:
    """Shape (B, 1, ..., L, ..., 1) that broadcasts a (B, L) per-line array along `axis`."""
    shape = [x.shape[0]] + [1] * (x.ndim - 1)
    shape[axis] = x.shape[axis]
    return tuple(shape)


def _check_line_mask(x: Tensor, line_mask: Tensor, axis: int) -> Tensor:
    """Check a (B, L) line mask against `x` along `axis`; return it as (B, 1, ..., L, ..., 1)."""
    want = (x.shape[0], x.shape[axis])
    if line_mask.ndim == 1 and line_mask.shape[0] == want[1]:
        line_mask = line_mask.expand(want)
    if tuple(line_mask.shape) != want:
        raise MedfmError(
            f"line_mask must have shape (B, L) = {want} for axis {axis} of a tensor of shape "
            f"{tuple(x.shape)}, got {tuple(line_mask.shape)}"
        )
    return line_mask.to(device=x.device, dtype=torch.bool).reshape(_line_shape(x, axis))


def _safe_std(std: Tensor, mean: Tensor) -> Tensor:
    """std with 1 where the data is constant: std 0 or below float rounding (1e-6 * |mean|)."""
    return torch.where(std > 1e-6 * mean.abs(), std, torch.ones_like(std))
