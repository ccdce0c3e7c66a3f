"""Pure, device-agnostic, batch-first torch kernels (no randomness inside: noise is passed in).

Tensors are (B, C, *S) with 2 or 3 spatial dims, float32 unless stated. A "per-sample"
parameter is a python number or a tensor (B,) with one value per batch item.
"""

from medfm.kernels.bias import bias_field, n_bias_coeffs
from medfm.kernels.blur import gaussian_blur, gaussian_kernel1d
from medfm.kernels.conv import winograd_conv3x3, winograd_weights
from medfm.kernels.intensity import normalize_percentiles, window, zscore
from medfm.kernels.kspace import (
    fftn_c,
    ghosting,
    ifftn_c,
    motion_lines,
    partial_fourier_mask,
    rician_magnitude,
    truncate_kspace,
    undersample,
)
from medfm.kernels.noise import fractal_field, smooth_field
from medfm.kernels.resample import resample_to_spacing
from medfm.kernels.scan import cartesian_to_polar, polar_to_cartesian, sector_grid
from medfm.kernels.speckle import rayleigh_speckle
from medfm.kernels.warp import elastic_displacement, identity_grid, warp, warp_labels

__all__ = [
    "bias_field",
    "cartesian_to_polar",
    "elastic_displacement",
    "fftn_c",
    "fractal_field",
    "gaussian_blur",
    "gaussian_kernel1d",
    "ghosting",
    "identity_grid",
    "ifftn_c",
    "motion_lines",
    "n_bias_coeffs",
    "normalize_percentiles",
    "partial_fourier_mask",
    "polar_to_cartesian",
    "rayleigh_speckle",
    "resample_to_spacing",
    "rician_magnitude",
    "sector_grid",
    "smooth_field",
    "truncate_kspace",
    "undersample",
    "warp",
    "warp_labels",
    "winograd_conv3x3",
    "winograd_weights",
    "window",
    "zscore",
]
