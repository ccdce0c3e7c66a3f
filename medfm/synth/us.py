"""Ultrasound: sector (phased array), curvilinear and linear probes, with the field outside
the beam black. Echogenicity, acoustic impedance and attenuation are resampled into the
probe's polar frame (depth x angle), where speckle is formed from complex Gaussian
scatterers filtered by the probe's PSF (fully developed speckle: Rayleigh envelope), specular
reflections are added at interfaces, depth attenuation and shadowing behind strong reflectors
are integrated along each beam, time-gain compensation applied, and the result log-compressed
and scan-converted back to the image grid."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from medfm.kernels import (
    cartesian_to_polar,
    gaussian_blur,
    polar_to_cartesian,
    rayleigh_speckle,
)
from medfm.synth.anatomy import AnatomyParams
from medfm.synth.rng import Draw, as_draw

# tissue -> (echogenicity low, high, spread, impedance MRayl, attenuation (relative to soft))
TISSUE = {
    "air": (0.0, 0.001, 0.0, 0.0004, 40.0),
    "lung": (0.05, 0.1, 0.02, 0.3, 30.0),
    "fat": (0.15, 0.4, 0.06, 1.38, 0.8),
    "fluid": (0.0005, 0.003, 0.0005, 1.5, 0.05),
    "soft": (0.3, 0.6, 0.1, 1.6, 1.0),
    "muscle": (0.1, 0.25, 0.05, 1.7, 1.3),
    "organ": (0.25, 0.9, 0.15, 1.65, 1.0),
    "enhanced": (1.5, 4.0, 0.5, 1.75, 1.5),
    "bone": (2.0, 5.0, 0.5, 7.8, 40.0),
}
LABEL_TISSUES = {
    "organ": 2.5,
    "fluid": 2.0,
    "soft": 1.5,
    "muscle": 1.0,
    "enhanced": 1.0,
    "fat": 0.7,
}
DISTRACTOR_TISSUES = {
    "organ": 1.5,
    "soft": 1.5,
    "muscle": 1.0,
    "fat": 1.0,
    "fluid": 1.0,
    "enhanced": 0.8,
    "bone": 0.4,
}
LINEAR_APEX = 40.0  # a linear probe is a sector whose apex lies 40 image heights above
NEPERS = 1.5  # one-way attenuation over one image height of soft tissue, per unit `attenuation`


class USConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    probes: dict[Literal["sector", "curvilinear", "linear"], float] = {
        "sector": 0.4,
        "curvilinear": 0.35,
        "linear": 0.25,
    }
    psf_axial: tuple[float, float] = (0.5, 1.0)
    psf_lateral: tuple[float, float] = (1.0, 2.5)
    psf_elevation: tuple[float, float] = (1.0, 2.0)
    attenuation: tuple[float, float] = (0.5, 2.0)
    tgc: tuple[float, float] = (0.6, 1.0)
    specular: tuple[float, float] = (4.0, 12.0)
    gain_db: tuple[float, float] = (-16.0, -6.0)
    dynamic_range_db: tuple[float, float] = (40.0, 60.0)
    p_linear_width: tuple[float, float] = Field((0.6, 0.95))


class USParams(BaseModel):
    """Probe geometry in output pixels: apex (row, col), radii (r_min, r_max), angles
    (theta_min, theta_max) in radians (0 = straight down)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modality: Literal["us"] = "us"
    probe: Literal["sector", "curvilinear", "linear"]
    apex: tuple[float, float]
    radii: tuple[float, float]
    angles: tuple[float, float]
    psf: tuple[float, ...]
    attenuation: float
    tgc: float
    specular: float
    gain_db: float
    dynamic_range_db: float


def tissue_value(tissue: str, draw: Draw) -> tuple[float, float]:
    lo, hi, _, _, _ = TISSUE[tissue]
    mean = draw.uniform(lo, hi)
    return mean, 0.2 * mean  # echogenicity varies by a fraction of its level


def sample_params(
    cfg: USConfig,
    generator: torch.Generator | Draw,
    *,
    anatomy: AnatomyParams,
    shape: tuple[int, ...],
) -> USParams:
    """Draw the ultrasound parameters of one case (``generator``: its parameter stream)."""
    draw = as_draw(generator)
    ndim = len(shape)
    del anatomy
    H, W = shape[0], shape[1]
    probe = draw.choice(list(cfg.probes), list(cfg.probes.values()))
    if probe == "sector":
        half = draw.uniform(0.55, 0.8)
        apex = (draw.uniform(0.0, 0.03) * H, (W - 1) / 2)
        r_max = min((H - 1 - apex[0]) * draw.uniform(0.92, 1.0), (W - 1) / 2 / math.sin(half))
        radii = (draw.uniform(0.0, 0.04) * H, r_max)
    elif probe == "curvilinear":
        half = draw.uniform(0.3, 0.55)
        r0 = draw.uniform(0.35, 0.8) * H
        apex = (-r0 + draw.uniform(0.01, 0.04) * H, (W - 1) / 2)
        r_max = (H - 1 - apex[0]) * draw.uniform(0.92, 1.0)
        half = min(half, math.asin(min(1.0, (W - 1) / 2 / r_max)) * 0.98)
        radii = (r0, r_max)
    else:
        r0 = LINEAR_APEX * H
        apex = (-r0 + draw.uniform(0.0, 0.03) * H, (W - 1) / 2)
        width = draw.uniform(*cfg.p_linear_width) * (W - 1)
        half = width / 2 / r0
        radii = (r0, -apex[0] + draw.uniform(0.85, 1.0) * (H - 1))
    psf = [draw.uniform(*cfg.psf_axial), draw.uniform(*cfg.psf_lateral)]
    if ndim == 3:
        psf.append(draw.uniform(*cfg.psf_elevation))
    return USParams(
        probe=probe,
        apex=apex,
        radii=radii,
        angles=(-half, half),
        psf=tuple(psf),
        attenuation=draw.uniform(*cfg.attenuation),
        tgc=draw.uniform(*cfg.tgc),
        specular=draw.uniform(*cfg.specular),
        gain_db=draw.uniform(*cfg.gain_db),
        dynamic_range_db=draw.uniform(*cfg.dynamic_range_db),
    )


def noise_shapes(shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    return {"real": (1, *shape), "imag": (1, *shape)}


def acoustic_table(tissues: list[list[str]], device) -> torch.Tensor:
    """(B, K + 1, 2) [impedance, attenuation] per slot (slot 0: outside = soft tissue)."""
    K1 = max(len(t) for t in tissues) + 1
    tab = torch.zeros(len(tissues), K1, 2)
    for b, names in enumerate(tissues):
        tab[b, 0] = torch.tensor(TISSUE["soft"][3:])
        for k, name in enumerate(names):
            tab[b, k + 1] = torch.tensor(TISSUE[name][3:])
    return tab.to(device)


def _geometry(params: list[USParams], device):
    apex = torch.tensor([p.apex for p in params], device=device)
    radii = torch.tensor([p.radii for p in params], device=device)
    angles = torch.tensor([p.angles for p in params], device=device)
    return apex, radii, angles


def envelope(params: list[USParams], noise: dict[str, torch.Tensor]) -> torch.Tensor:
    """Speckle envelope (B, 1, *S) in the polar frame: Rayleigh with E[|z|^2] = 1."""
    psf = torch.tensor([p.psf for p in params], device=noise["real"].device)
    return rayleigh_speckle(noise["real"], noise["imag"], psf)


def polar_log_amplitude(
    params: list[USParams],
    echo: torch.Tensor,
    acoustic: torch.Tensor,
    noise: dict[str, torch.Tensor],
) -> torch.Tensor:
    """echo (B, 1, *S) echogenicity and acoustic (B, 2, *S) [impedance, attenuation] on the
    image grid -> natural log of the echo amplitude (B, 1, Nr, Ntheta[, D]) in the probe's
    polar frame, before log compression: speckle, specular reflections, attenuation,
    shadowing and TGC (the last three are sums of logs along the beam, so no exp is needed)."""
    device = echo.device
    B = echo.shape[0]
    shape = tuple(echo.shape[2:])
    nd = len(shape)
    apex, radii, angles = _geometry(params, device)
    maps = torch.cat([echo.clamp_min(0), acoustic], 1)
    polar = cartesian_to_polar(
        maps, apex, radii, angles, (shape[0], shape[1]), padding_mode="border"
    )  # (B, 3, Nr, Nt[, D])
    e, z, att = polar[:, :1], polar[:, 1:2], polar[:, 2:3]
    view = (B,) + (1,) * (nd + 1)

    speckle = envelope(params, noise)
    # Intensity reflection coefficient at each interface along the beam (depth = axis 2).
    refl = torch.zeros_like(z)
    dz, sz = z[:, :, 1:] - z[:, :, :-1], (z[:, :, 1:] + z[:, :, :-1]).clamp_min(1e-3)
    refl[:, :, :-1] = (dz / sz).square_()
    spec = torch.tensor([p.specular for p in params], device=device).view(view)
    specular = gaussian_blur(refl.sqrt(), [0.7] + [0.0] * (nd - 1)).mul_(spec)
    amp = e.sqrt_().mul_(speckle).add_(specular.mul_(speckle.mul(0.5).add_(0.5)))
    # Two-way attenuation and transmission losses accumulated above each sample, minus TGC.
    dr = ((radii[:, 1] - radii[:, 0]) / shape[0] / shape[0]).view(view)  # image heights / row
    alpha = torch.tensor([p.attenuation for p in params], device=device).view(view)
    tgc = torch.tensor([p.tgc for p in params], device=device).view(view)
    loss = (2 * NEPERS) * alpha * dr * att - 2 * torch.log1p(-refl.clamp_(max=0.999))
    above = torch.cumsum(loss, 2).sub_(loss)
    rows = torch.arange(shape[0], device=device, dtype=torch.float32)
    gain = (2 * NEPERS) * alpha * dr * tgc * rows.view(1, 1, -1, *([1] * (nd - 1)))
    return amp.clamp_min_(1e-6).log_().sub_(above).add_(gain)


def polar_amplitude(
    params: list[USParams],
    echo: torch.Tensor,
    acoustic: torch.Tensor,
    noise: dict[str, torch.Tensor],
) -> torch.Tensor:
    """The echo amplitude (B, 1, Nr, Ntheta[, D]) itself: exp of `polar_log_amplitude`."""
    return polar_log_amplitude(params, echo, acoustic, noise).exp()


def render(
    params: list[USParams],
    echo: torch.Tensor,
    acoustic: torch.Tensor,
    noise: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """echo (B, 1, *S) and acoustic (B, 2, *S) maps on the image grid -> (image (B, 1, *S) in
    [0, 1] after log compression (``gain_db``, ``dynamic_range_db``) and scan conversion,
    inside-the-beam mask (B, 1, *S))."""
    device = echo.device
    shape = tuple(echo.shape[2:])
    view = (echo.shape[0],) + (1,) * (len(shape) + 1)
    log_amp = polar_log_amplitude(params, echo, acoustic, noise)
    apex, radii, angles = _geometry(params, device)
    gain = torch.tensor([p.gain_db for p in params], device=device).view(view)
    dyn = torch.tensor([p.dynamic_range_db for p in params], device=device).view(view)
    db = log_amp.mul_(20 / math.log(10)).add_(gain)  # 20 log10(amplitude) + gain
    img = db.add_(dyn).div_(dyn).clamp_(0, 1)
    return polar_to_cartesian(img, apex, radii, angles, (shape[0], shape[1]))
