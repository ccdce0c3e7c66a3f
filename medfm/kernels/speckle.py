"""Ultrasound speckle: the envelope of a PSF-filtered field of random complex scatterers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from medfm.errors import MedfmError
from medfm.kernels._common import _spatial_ndim
from medfm.kernels.blur import _apply_kernels, _blur_kernels

__all__ = ["rayleigh_speckle"]


def rayleigh_speckle(
    noise_real: Tensor, noise_imag: Tensor, psf_sigma: float | Sequence[float] | Tensor
) -> Tensor:
    """Fully developed speckle (B, C, *S): Rayleigh envelope with E[envelope^2] = 1.

    noise_real, noise_imag (B, C, *S) standard normal (the complex scatterers). Both parts are
    blurred with a Gaussian PSF (psf_sigma in voxels, any form `gaussian_blur` accepts: a number,
    one per axis, a tensor (B,) or (B, ndim)), the envelope |z| is divided by the analytic
    sqrt(2 * sum(w^2)) of the PSF weights (w the separable kernel), so the scaling does not
    depend on the data. Mean sqrt(pi) / 2, mean / std = sqrt(pi / (4 - pi)) ~ 1.913 (away from
    the borders, where reflect padding repeats scatterers).
    """
    nd = _spatial_ndim(noise_real, "noise_real")
    if noise_imag.shape != noise_real.shape:
        raise MedfmError(
            f"noise_real and noise_imag must have the same shape, got "
            f"{tuple(noise_real.shape)} and {tuple(noise_imag.shape)}"
        )
    if not noise_real.is_floating_point():
        raise MedfmError(f"noise tensors must be floating point, got {noise_real.dtype}")
    batch, channels = noise_real.shape[:2]
    kernels = _blur_kernels(psf_sigma, batch, nd, 3.0)
    z = _apply_kernels(torch.cat([noise_real, noise_imag], dim=1), kernels)
    # Variance of each filtered part at a location = sum of squared weights = prod over axes.
    power = torch.full((batch,), 2.0, dtype=torch.float64, device=noise_real.device)
    for weights in kernels:
        if weights is None:
            continue
        if isinstance(weights, list):
            power = power * sum(w * w for w in weights)
        else:
            power = power * (weights.to(power.device) ** 2).sum(dim=1)
    scale = power.rsqrt().to(noise_real.dtype).reshape((batch,) + (1,) * (nd + 1))
    return torch.hypot(z[:, :channels], z[:, channels:]) * scale
