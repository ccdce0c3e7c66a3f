"""k-space (MRI) operations on (B, C, *S) tensors.

k-space here is the centred orthonormal FFT over the spatial dims: k = fftshift(fftn(x)), so
the DC term sits at index L // 2 of every spatial axis and index n has the frequency
(n - L // 2) / L cycles per voxel. Lines of a k-space "axis" are the hyperplanes orthogonal to it
(phase-encode lines when `axis` is the phase-encode direction).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from medfm.errors import MedfmError
from medfm.kernels._common import (
    _check_line_mask,
    _line_shape,
    _per_sample,
    _spatial_axis,
    _spatial_ndim,
)

__all__ = [
    "fftn_c",
    "ifftn_c",
    "truncate_kspace",
    "ghosting",
    "motion_lines",
    "undersample",
    "partial_fourier_mask",
    "rician_magnitude",
]


def _dims(x: Tensor) -> tuple[int, ...]:
    return tuple(range(2, 2 + _spatial_ndim(x)))


def _centred_freqs(length: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Frequencies (L,) in cycles/voxel in fftn_c's layout: (n - L // 2) / L."""
    return (torch.arange(length, device=device, dtype=dtype) - length // 2) / length


def fftn_c(x: Tensor) -> Tensor:
    """Centred orthonormal FFT over the spatial dims: (B, C, *S) real/complex -> complex."""
    dims = _dims(x)
    return torch.fft.fftshift(torch.fft.fftn(x, dim=dims, norm="ortho"), dim=dims)


def ifftn_c(k: Tensor) -> Tensor:
    """Inverse of `fftn_c`: (B, C, *S) centred k-space -> complex image (take .real or .abs())."""
    dims = _dims(k)
    return torch.fft.ifftn(torch.fft.ifftshift(k, dim=dims), dim=dims, norm="ortho")


def truncate_kspace(k: Tensor, keep: float | Tensor) -> Tensor:
    """Keep the central box of k-space (B, C, *S), a fraction `keep` of every spatial axis.

    Along an axis of length L the centred index q = n - L // 2 is kept when
    -keep * L / 2 <= q < keep * L / 2 (DC always kept); the rest is zeroed. keep in (0, 1], a
    number or a tensor (B,); keep = 1 returns k unchanged. After ifftn_c: Gibbs ringing.
    """
    nd = _spatial_ndim(k, "k")
    if not isinstance(keep, Tensor) and not 0.0 < float(keep) <= 1.0:
        raise MedfmError(f"keep must be in (0, 1], got {keep}")
    real = torch.float32
    half = _per_sample(keep, k.shape[0], 2, device=k.device, dtype=real, name="keep") / 2
    mask = None
    for j in range(nd):
        length = k.shape[2 + j]
        q = torch.arange(length, device=k.device, dtype=real) - length // 2
        bound = half * length  # (B, 1)
        m = (q >= -bound) & (q < bound)  # (B, L)
        shape = [k.shape[0], 1] + [1] * nd
        shape[2 + j] = length
        m = m.reshape(shape)
        mask = m if mask is None else mask & m
    return k * mask


def ghosting(
    k: Tensor, n_ghosts: int | Tensor, intensity: float | Tensor, *, axis: int = -1
) -> Tensor:
    """TorchIO-style ghosting: scale every n_ghosts-th line along `axis` by (1 - intensity).

    k (B, C, *S) centred k-space; `axis` a spatial tensor axis (negative allowed). Lines with
    index % n_ghosts == 0 are multiplied by 1 - intensity, except the central line L // 2.
    n_ghosts (int >= 1, 0 = no ghosts) and intensity (0 = identity, 1 = lines removed) are
    numbers or tensors (B,). Ghosts appear spaced L / n_ghosts voxels apart along `axis`.
    """
    _spatial_ndim(k, "k")
    a = _spatial_axis(k, axis)
    if not isinstance(n_ghosts, Tensor) and int(n_ghosts) < 0:
        raise MedfmError(f"n_ghosts must be >= 0, got {n_ghosts}")
    batch, length = k.shape[0], k.shape[a]
    real = k.real.dtype if k.is_complex() else k.dtype
    # float32 holds the line indices and ghost counts exactly (< 2**24).
    n = _per_sample(n_ghosts, batch, 2, device=k.device, dtype=torch.float32, name="n_ghosts")
    n = torch.round(n)
    inten = _per_sample(intensity, batch, 2, device=k.device, dtype=real, name="intensity")
    idx = torch.arange(length, device=k.device, dtype=torch.float32)
    hit = (n > 0) & (torch.remainder(idx, n.clamp_min(1)) == 0) & (idx != length // 2)  # (B, L)
    factor = torch.where(hit, 1 - inten, torch.ones_like(inten))
    return k * factor.reshape(_line_shape(k, a))


def motion_lines(k: Tensor, line_mask: Tensor, shift: Tensor, *, axis: int = -1) -> Tensor:
    """Rigid motion during acquisition: lines where line_mask (B, L) is True were taken shifted.

    k (B, C, *S) centred k-space; shift (B, ndim) voxels in tensor axis order (the object moved
    by +shift, i.e. image y(p) = x(p - shift)). Those lines are multiplied by
    exp(-2 pi i sum_j f_j shift_j), f_j the centred frequencies of fftn_c. All lines True equals
    fftn_c of the shifted image (circularly for integer shifts); zero shift returns k.
    """
    nd = _spatial_ndim(k, "k")
    a = _spatial_axis(k, axis)
    batch = k.shape[0]
    if shift.shape != (batch, nd):
        raise MedfmError(f"shift must have shape (B, ndim) = ({batch}, {nd}), got {shift.shape}")
    mask = _check_line_mask(k, line_mask, a)
    cplx = torch.complex128 if k.dtype == torch.complex128 else torch.complex64
    s = shift.to(device=k.device, dtype=torch.float64)
    phase = None  # (B, 1, *S): product of the per-axis ramps exp(-2 pi i f_j shift_j)
    for j in range(nd):
        length = k.shape[2 + j]
        cycles = s[:, j : j + 1] * _centred_freqs(length, k.device, torch.float64)  # (B, L_j)
        cycles = cycles - torch.round(cycles)  # reduce mod 1 before scaling: accurate angles
        angle = -2 * math.pi * cycles
        ramp = torch.polar(torch.ones_like(angle), angle).to(cplx)
        shape = [batch, 1] + [1] * nd
        shape[2 + j] = length
        ramp = ramp.reshape(shape)
        phase = ramp if phase is None else phase * ramp
    phase = torch.where(mask, phase, torch.ones((), dtype=cplx, device=k.device))
    return k * phase


def undersample(k: Tensor, line_mask: Tensor, *, axis: int = -1) -> Tensor:
    """Zero the lines of k (B, C, *S) along `axis` where line_mask (B, L) (or (L,)) is False."""
    _spatial_ndim(k, "k")
    a = _spatial_axis(k, axis)
    return k * _check_line_mask(k, line_mask, a)


def partial_fourier_mask(
    length: int, fraction: float, *, device: torch.device | str | None = None
) -> Tensor:
    """Bool (length,) partial-Fourier line mask: True for the first ceil(fraction * length) lines.

    fraction in [0.5, 1] (MedfmError, a ValueError, otherwise). At least length // 2 + 1 lines
    are kept so that the centre line L // 2 is always acquired (for even L and fraction 0.5,
    ceil(fraction * L) alone would stop just before it).
    """
    if not 0.5 <= fraction <= 1.0:
        raise MedfmError(f"partial Fourier fraction must be in [0.5, 1], got {fraction}")
    if length < 1:
        raise MedfmError(f"length must be >= 1, got {length}")
    n_keep = max(math.ceil(fraction * length - 1e-9), length // 2 + 1)
    return torch.arange(length, device=device) < min(n_keep, length)


def rician_magnitude(
    x: Tensor, noise_real: Tensor, noise_imag: Tensor, sigma: float | Tensor
) -> Tensor:
    """Magnitude image with Rician noise: |x + sigma * (noise_real + 1j * noise_imag)|.

    x (B, C, *S) real or complex; noise tensors standard normal, same shape as x; sigma a
    number or a tensor (B,) in x's intensity units. Returns a real tensor (B, C, *S); for x = 0
    it is Rayleigh distributed with mean sigma * sqrt(pi / 2).
    """
    if noise_real.shape != x.shape or noise_imag.shape != x.shape:
        raise MedfmError(
            f"noise tensors must have the shape of x {tuple(x.shape)}, "
            f"got {tuple(noise_real.shape)} and {tuple(noise_imag.shape)}"
        )
    real_dtype = x.real.dtype if x.is_complex() else x.dtype
    if not real_dtype.is_floating_point:
        raise MedfmError(f"x must be a float or complex tensor, got {x.dtype}")
    s = _per_sample(sigma, x.shape[0], x.ndim, device=x.device, dtype=real_dtype, name="sigma")
    if x.is_complex():
        return torch.hypot(x.real + s * noise_real, x.imag + s * noise_imag)
    return torch.hypot(x + s * noise_real, s * noise_imag)
