"""Where a patch lies in its volume, as input channels (MedDiff-FM's position embedding).

Each voxel gets its coordinates in the frame of the whole volume, normalised so that the
volume spans [-1, 1] on every axis (edge to edge), and NeRF's sinusoids of them:
``x, sin(2^k pi x), cos(2^k pi x)`` for k < F. A patch is described by its **box**: the
normalised edges ``(lo, hi)`` of the region it covers on each axis. The whole volume resized to
the patch has the box (-1, 1) on every axis; a crop of voxels ``[s, s + p)`` of an axis of
``n`` voxels has ``(-1 + 2 s / n, -1 + 2 (s + p) / n)``, whatever size it is resized to.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["crop_box", "position_embedding", "whole_box"]


def whole_box(batch: int, dims: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boxes (B, dims, 2) of whole volumes: (-1, 1) on every axis."""
    box = torch.tensor([-1.0, 1.0], device=device)
    return box.expand(batch, dims, 2).clone()


def crop_box(start: Sequence[float], size: Sequence[float], shape: Sequence[int]) -> torch.Tensor:
    """The box (dims, 2) of voxels ``[start, start + size)`` of a volume of ``shape`` voxels
    (start may be negative or the box pass the edge: padded windows lie partly outside)."""
    s = torch.tensor(start, dtype=torch.float32)
    p = torch.tensor(size, dtype=torch.float32)
    n = torch.tensor(shape, dtype=torch.float32)
    return torch.stack([-1 + 2 * s / n, -1 + 2 * (s + p) / n], dim=-1)


def position_embedding(boxes: torch.Tensor, shape: Sequence[int], frequencies: int) -> torch.Tensor:
    """The position channels (B, dims * (2F + 1), *shape) of patches of ``shape`` voxels
    covering ``boxes`` (B, dims, 2), at voxel centres; F = ``frequencies`` (0: no channels)."""
    b, dims, _ = boxes.shape
    if dims != len(shape):
        raise ValueError(f"boxes have {dims} axes, the patch {len(shape)}")
    if frequencies == 0:
        return boxes.new_zeros((b, 0, *shape))
    scales = math.pi * 2.0 ** torch.arange(frequencies, device=boxes.device, dtype=boxes.dtype)
    channels = []
    for axis, n in enumerate(shape):
        lo, hi = boxes[:, axis, 0:1], boxes[:, axis, 1:2]  # (B, 1)
        frac = (torch.arange(n, device=boxes.device, dtype=boxes.dtype) + 0.5) / n
        x = lo + (hi - lo) * frac  # (B, n): voxel centres
        angles = x[:, None, :] * scales[None, :, None]  # (B, F, n)
        feats = torch.cat([x[:, None], angles.sin(), angles.cos()], dim=1)  # (B, 2F+1, n)
        view = [b, 2 * frequencies + 1] + [1] * len(shape)
        view[2 + axis] = n
        channels.append(feats.reshape(view).expand(b, 2 * frequencies + 1, *shape))
    return torch.cat(channels, dim=1)
