"""CT: tissue classes in Hounsfield units, detector blur, quantum noise with std ~ 1/sqrt(dose),
streaks and beam hardening near bone, and a display window for 2D output (3D stays in HU)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from medfm.kernels import gaussian_blur, gaussian_kernel1d, window
from medfm.synth.anatomy import AnatomyParams, is_split_part
from medfm.synth.rng import Draw, as_draw

# tissue -> (HU low, HU high, texture spread in HU)
HU = {
    "air": (-1000.0, -990.0, 5.0),
    "lung": (-900.0, -780.0, 40.0),
    "fat": (-120.0, -80.0, 12.0),
    "fluid": (0.0, 20.0, 6.0),
    "soft": (25.0, 55.0, 12.0),
    "muscle": (40.0, 60.0, 10.0),
    "organ": (45.0, 110.0, 14.0),
    "enhanced": (120.0, 300.0, 20.0),
    "bone": (300.0, 1200.0, 120.0),
}
LABEL_TISSUES = {
    "organ": 4.0,
    "enhanced": 2.0,
    "soft": 1.5,
    "muscle": 1.0,
    "fluid": 1.0,
    "fat": 0.5,
    "bone": 1.0,
    "lung": 0.3,
}
DISTRACTOR_TISSUES = {
    "organ": 2.0,
    "soft": 1.0,
    "muscle": 1.0,
    "fat": 1.0,
    "fluid": 0.5,
    "bone": 1.5,
    "lung": 0.4,
    "air": 0.3,
    "enhanced": 0.7,
}
# display windows: (level, width) presets and their weights
WINDOWS = {
    "soft": (40.0, 400.0),
    "abdomen": (60.0, 360.0),
    "liver": (70.0, 180.0),
    "mediastinum": (50.0, 500.0),
    "bone": (400.0, 1800.0),
    "lung": (-600.0, 1500.0),
}
WINDOW_WEIGHTS = {
    "soft": 3.0,
    "abdomen": 3.0,
    "liver": 1.0,
    "mediastinum": 1.0,
    "bone": 0.5,
    "lung": 0.5,
}


class CTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dose: tuple[float, float] = (0.25, 4.0)
    noise_hu: tuple[float, float] = (8.0, 25.0)
    psf: tuple[float, float] = (0.5, 1.1)
    p_streaks: float = Field(0.35, ge=0, le=1)
    streak_hu: tuple[float, float] = (30.0, 200.0)
    p_beam_hardening: float = Field(0.5, ge=0, le=1)
    beam_hu: tuple[float, float] = (20.0, 80.0)
    window_jitter: float = Field(0.15, ge=0, le=1)


class CTParams(BaseModel):
    """``streaks`` are (angle rad, amplitude HU, width, decay) lines through ``bone_center``;
    ``beam`` is (x0.., x1.., amplitude HU, width): a dark band between two bones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modality: Literal["ct"] = "ct"
    dose: float
    noise_hu: float
    psf: float
    bone_center: tuple[float, ...] = ()
    streaks: tuple[tuple[float, float, float, float], ...] = ()
    beam: tuple[float, ...] = ()
    level: float
    width: float


def tissue_value(tissue: str, draw: Draw) -> tuple[float, float]:
    lo, hi, spread = HU[tissue]
    return draw.uniform(lo, hi), spread


def sample_params(
    cfg: CTConfig,
    generator: torch.Generator | Draw,
    *,
    anatomy: AnatomyParams,
    shape: tuple[int, ...],
) -> CTParams:
    """Draw the CT parameters of one case (``generator``: its parameter stream)."""
    draw = as_draw(generator)
    bones = [
        s
        for s in anatomy.structures
        if s.tissue == "bone" and s.kind == "blob" and not is_split_part(s)
    ]
    bones.sort(key=lambda s: -math.prod(s.radii))
    streaks: list[tuple[float, float, float, float]] = []
    center: tuple[float, ...] = ()
    beam: tuple[float, ...] = ()
    if bones:
        center = tuple(bones[0].center[:2])
        if draw.bernoulli(cfg.p_streaks):
            for _ in range(draw.randint(2, 8)):
                amp = draw.uniform(*cfg.streak_hu) * (1 if draw.bernoulli(0.5) else -1)
                streaks.append(
                    (
                        draw.uniform(0, math.pi),
                        amp,
                        draw.uniform(0.004, 0.015),
                        draw.uniform(0.3, 1.0),
                    )
                )
        if len(bones) > 1 and draw.bernoulli(cfg.p_beam_hardening):
            beam = (
                *bones[0].center[:2],
                *bones[1].center[:2],
                -draw.uniform(*cfg.beam_hu),
                draw.uniform(0.02, 0.08),
            )
    name = draw.choice(list(WINDOW_WEIGHTS), list(WINDOW_WEIGHTS.values()))
    level, width = WINDOWS[name]
    j = cfg.window_jitter
    return CTParams(
        dose=draw.log_uniform(*cfg.dose),
        noise_hu=draw.uniform(*cfg.noise_hu),
        psf=draw.uniform(*cfg.psf),
        bone_center=center,
        streaks=tuple(streaks),
        beam=beam,
        level=level + draw.uniform(-j, j) * width * 0.5,
        width=width * (1 + draw.uniform(-j, j)),
    )


def noise_shapes(shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    return {"quantum": (1, *shape)}


# exp(-0.5 q^2) is exactly 0 in float32 once 0.5 q^2 > 104 (q > 14.4): a streak or a band is
# evaluated only within this many widths of its line, and is exactly 0 beyond
_BAND = 15.0


def _line_artifacts(params: list[CTParams], grid: torch.Tensor) -> torch.Tensor | None:
    """In-plane (axes 0, 1) streaks and beam-hardening bands, (B, 1, H, W) in HU, or None.

    Each line's Gaussian profile is computed only where it is not exactly zero (within
    ``_BAND`` widths of the line), which gives the values of computing it everywhere."""
    if not any(p.streaks or p.beam for p in params):
        return None
    x = grid[:2]
    if grid.shape[0] == 3:
        x = x[..., 0]
    out = torch.zeros(len(params), 1, *x.shape[1:], device=grid.device)
    for b, p in enumerate(params):
        if p.streaks:
            st = torch.tensor(p.streaks, device=grid.device, dtype=torch.float32)
            c = torch.tensor(p.bone_center, device=grid.device).view(2, 1, 1)
            rel = x - c  # (2, H, W)
            ang, amp, width, decay = (st[:, i].view(-1, 1, 1) for i in range(4))
            cos, sin = torch.cos(ang), torch.sin(ang)
            lines = torch.zeros_like(rel[0])
            for k in range(st.shape[0]):
                across = -rel[0] * sin[k] + rel[1] * cos[k]
                near = across.abs() < _BAND * width[k]
                if not bool(near.any()):
                    continue
                r0, r1, a_near = rel[0][near], rel[1][near], across[near]
                along = r0 * cos[k] + r1 * sin[k]
                line = torch.zeros_like(lines)
                line[near] = amp[k] * torch.exp(
                    -0.5 * (a_near / width[k]) ** 2 - along.abs() / decay[k]
                )
                lines += line
            out[b, 0] += lines
        if p.beam:
            a = torch.tensor(p.beam[:2], device=grid.device).view(2, 1, 1)
            e = torch.tensor(p.beam[2:4], device=grid.device).view(2, 1, 1)
            amp, width = p.beam[4], p.beam[5]
            d = e - a
            t = (((x - a) * d).sum(0) / (d * d).sum().clamp_min(1e-6)).clamp(0, 1)
            diff = x - (a + t * d)
            # a cheap distance picks the pixels near the band; the band's own distance there
            dist2 = diff[0].square() + diff[1].square()
            near = dist2 < (_BAND * width) ** 2
            if bool(near.any()):
                dist = dist2[near].sqrt()
                band = torch.zeros_like(out[b, 0])
                band[near] = amp * torch.exp(-0.5 * (dist / width) ** 2)
                out[b, 0] += band
    return out


def noise_gain(sigma: float) -> float:
    """Std of white unit noise after a Gaussian blur of ``sigma`` (per axis, one axis)."""
    k = gaussian_kernel1d(sigma)
    return float(k.pow(2).sum().sqrt())


def render_hu(
    params: list[CTParams], image: torch.Tensor, grid: torch.Tensor, noise: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Textured HU image (B, 1, *S) -> CT image in HU: streaks and beam hardening, quantum
    noise of std ``noise_hu / sqrt(dose)``, then the reconstruction PSF (a Gaussian of
    ``psf`` voxels), which also gives the noise its spatial correlation."""
    device = image.device
    nd = image.dim() - 2
    lines = _line_artifacts(params, grid)
    if lines is not None:
        image = image + (lines.unsqueeze(-1) if nd == 3 else lines)
    psf = torch.tensor([p.psf for p in params], device=device)
    # white noise scaled so that its std after the PSF blur is exactly noise_hu / sqrt(dose)
    std = torch.tensor(
        [p.noise_hu / math.sqrt(p.dose) / noise_gain(p.psf) ** nd for p in params], device=device
    )
    shape = (-1,) + (1,) * (nd + 1)
    return gaussian_blur(image + std.view(shape) * noise["quantum"], psf)


def to_display(params: list[CTParams], hu: torch.Tensor) -> torch.Tensor:
    """HU -> [0, 1] through each case's window."""
    level = torch.tensor([p.level for p in params], device=hu.device)
    width = torch.tensor([p.width for p in params], device=hu.device)
    return window(hu, level, width)
