"""MRI: T1- or T2-like tissue contrast, smooth multiplicative bias field, k-space artifacts
(Gibbs ringing from truncation, ghosting, motion lines, partial Fourier, undersampling) and
Rician noise (the magnitude of complex Gaussian noise: Rayleigh where there is no signal)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from medfm.kernels import (
    bias_field,
    fftn_c,
    ghosting,
    ifftn_c,
    motion_lines,
    n_bias_coeffs,
    partial_fourier_mask,
    rician_magnitude,
    truncate_kspace,
    undersample,
)
from medfm.synth.anatomy import AnatomyParams
from medfm.synth.rng import Draw, as_draw

# tissue -> ((T1 low, high), (T2 low, high), spread); signal in [0, 1]
SIGNAL = {
    "air": ((0.0, 0.0), (0.0, 0.0), 0.0),
    "lung": ((0.02, 0.08), (0.02, 0.08), 0.02),
    "fat": ((0.8, 0.95), (0.55, 0.8), 0.04),
    "fluid": ((0.08, 0.2), (0.8, 1.0), 0.03),
    "soft": ((0.4, 0.55), (0.35, 0.5), 0.04),
    "muscle": ((0.3, 0.4), (0.2, 0.3), 0.03),
    "organ": ((0.45, 0.7), (0.3, 0.6), 0.05),
    "enhanced": ((0.6, 0.85), (0.45, 0.7), 0.05),
    "bone": ((0.05, 0.15), (0.05, 0.12), 0.03),
}
LABEL_TISSUES = {
    "organ": 3.0,
    "enhanced": 1.0,
    "soft": 2.0,
    "muscle": 1.0,
    "fluid": 1.5,
    "fat": 0.7,
    "bone": 0.3,
}
DISTRACTOR_TISSUES = {
    "organ": 2.0,
    "soft": 1.0,
    "muscle": 1.5,
    "fat": 1.5,
    "fluid": 1.0,
    "bone": 0.8,
    "air": 0.2,
    "enhanced": 0.5,
}


class MRIConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    p_t2: float = Field(0.5, ge=0, le=1)
    bias_order: int = Field(3, ge=0, le=5)
    bias: tuple[float, float] = (0.0, 0.35)
    p_gibbs: float = Field(0.5, ge=0, le=1)
    gibbs_keep: tuple[float, float] = (0.4, 0.85)
    p_ghosting: float = Field(0.2, ge=0, le=1)
    ghosts: tuple[int, int] = (2, 6)
    ghost_intensity: tuple[float, float] = (0.3, 0.9)
    p_motion: float = Field(0.2, ge=0, le=1)
    motion_shift: tuple[float, float] = (0.5, 4.0)
    motion_fraction: tuple[float, float] = (0.05, 0.35)
    p_partial_fourier: float = Field(0.2, ge=0, le=1)
    partial_fourier: tuple[float, float] = (0.6, 0.9)
    p_undersample: float = Field(0.15, ge=0, le=1)
    acceleration: tuple[float, float] = (1.5, 3.0)
    noise: tuple[float, float] = (0.01, 0.05)


class MRIParams(BaseModel):
    """k-space steps are skipped when their parameter is at its identity value (keep 1,
    ghost intensity 0, motion fraction 0, partial Fourier 1, acceleration 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modality: Literal["mri"] = "mri"
    weighting: Literal["t1", "t2"]
    bias: tuple[float, ...]
    bias_order: int
    phase_axis: int
    gibbs_keep: float = 1.0
    ghosts: int = 2
    ghost_intensity: float = 0.0
    motion_start: float = 0.0
    motion_fraction: float = 0.0
    motion_shift: tuple[float, ...] = ()
    partial_fourier: float = 1.0
    acceleration: float = 1.0
    noise: float


def tissue_value_for(weighting: str):
    def tissue_value(tissue: str, draw: Draw) -> tuple[float, float]:
        t1, t2, spread = SIGNAL[tissue]
        lo, hi = t1 if weighting == "t1" else t2
        return draw.uniform(lo, hi), spread

    return tissue_value


def sample_params(
    cfg: MRIConfig,
    generator: torch.Generator | Draw,
    *,
    anatomy: AnatomyParams,
    shape: tuple[int, ...],
) -> MRIParams:
    """Draw the MRI parameters of one case (``generator``: its parameter stream)."""
    draw = as_draw(generator)
    ndim = len(shape)
    del anatomy
    s = draw.uniform(*cfg.bias)
    bias = tuple(draw.uniform(-s, s) for _ in range(n_bias_coeffs(ndim, cfg.bias_order)))
    kw: dict = {}
    if draw.bernoulli(cfg.p_gibbs):
        kw["gibbs_keep"] = draw.uniform(*cfg.gibbs_keep)
    if draw.bernoulli(cfg.p_ghosting):
        kw["ghosts"] = draw.randint(*cfg.ghosts)
        kw["ghost_intensity"] = draw.uniform(*cfg.ghost_intensity)
    if draw.bernoulli(cfg.p_motion):
        kw["motion_fraction"] = draw.uniform(*cfg.motion_fraction)
        kw["motion_start"] = draw.uniform(0, 1 - kw["motion_fraction"])
        shift = draw.uniform(*cfg.motion_shift)
        kw["motion_shift"] = tuple(shift * x for x in draw.unit_vector(ndim))
    if draw.bernoulli(cfg.p_partial_fourier):
        kw["partial_fourier"] = draw.uniform(*cfg.partial_fourier)
    elif draw.bernoulli(cfg.p_undersample):
        kw["acceleration"] = draw.uniform(*cfg.acceleration)
    return MRIParams(
        weighting="t2" if draw.bernoulli(cfg.p_t2) else "t1",
        bias=bias,
        bias_order=cfg.bias_order,
        phase_axis=draw.randint(0, 1),
        noise=draw.uniform(*cfg.noise),
        **kw,
    )


def noise_shapes(shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    return {"real": (1, *shape), "imag": (1, *shape), "lines": (max(shape[:2]),)}


def _line_mask(params: list[MRIParams], noise: torch.Tensor, axis_len: int):
    """Per-case masks (B, axis_len) of lines to keep (undersampling / partial Fourier) and of
    lines acquired after the motion (motion)."""
    device = noise.device
    idx = torch.arange(axis_len, device=device, dtype=torch.float32)
    keep, moved = [], []
    centre = torch.abs(idx - axis_len // 2) <= max(1, axis_len * 0.04)
    for b, p in enumerate(params):
        k = torch.ones(axis_len, dtype=torch.bool, device=device)
        if p.partial_fourier < 1:
            k = partial_fourier_mask(axis_len, p.partial_fourier, device=device)
        elif p.acceleration > 1:
            k = (noise[b, :axis_len] < 1.0 / p.acceleration) | centre
        keep.append(k)
        lo = p.motion_start * axis_len
        moved.append((idx >= lo) & (idx < lo + p.motion_fraction * axis_len))
    return torch.stack(keep), torch.stack(moved)


def render(
    params: list[MRIParams], image: torch.Tensor, noise: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Textured signal (B, 1, *S) in [0, ~1] -> magnitude image (same units)."""
    device = image.device
    nd = image.dim() - 2
    shape = tuple(image.shape[2:])
    image = image.clamp_min(0)
    order = params[0].bias_order
    if any(any(p.bias) for p in params):
        coeffs = torch.tensor([p.bias for p in params], device=device)
        image = image * bias_field(coeffs, shape, order)
    k = fftn_c(image.to(torch.complex64))
    keep = torch.tensor([p.gibbs_keep for p in params], device=device)
    if bool((keep < 1).any()):
        k = truncate_kspace(k, keep)
    for axis in (0, 1):
        sel = [b for b, p in enumerate(params) if p.phase_axis == axis]
        if not sel:
            continue
        ax = axis - nd  # negative spatial axis index
        sub = k[sel]
        ps = [params[b] for b in sel]
        inten = torch.tensor([p.ghost_intensity for p in ps], device=device)
        if bool((inten > 0).any()):
            n = torch.tensor([p.ghosts for p in ps], device=device)
            sub = ghosting(sub, n, inten, axis=ax)
        keep_lines, moved = _line_mask(ps, noise["lines"][sel], shape[axis])
        if any(p.motion_fraction > 0 for p in ps):
            shift = torch.tensor(
                [p.motion_shift if p.motion_shift else (0.0,) * nd for p in ps], device=device
            )
            sub = motion_lines(sub, moved, shift, axis=ax)
        if not bool(keep_lines.all()):
            sub = undersample(sub, keep_lines, axis=ax)
        k = k.index_copy(0, torch.tensor(sel, device=device), sub)
    img = ifftn_c(k)
    sigma = torch.tensor([p.noise for p in params], device=device)
    return rician_magnitude(img, noise["real"], noise["imag"], sigma)
