"""Textures: per-structure intensities, multi-scale noise textures, smooth intensity gradients
inside structures and partial-volume edges, with a difficulty knob.

The intensities are in the modality's units (HU for CT, signal for MRI, echogenicity for
ultrasound); the modality supplies them through a ``tissue_value(tissue, draw)`` function.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field

from medfm.kernels import fractal_field, gaussian_blur, smooth_field
from medfm.synth.anatomy import AnatomyParams, is_split_part
from medfm.synth.rng import Draw


class TextureConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    edge_sigma: tuple[float, float] = (0.3, 1.2)
    difficulty: tuple[float, float] = (0.0, 1.0)
    gradient: float = Field(0.15, ge=0)
    persistence: tuple[float, float] = (0.35, 0.75)
    p_random_contrast: float = Field(0.3, ge=0, le=1)


class TextureParams(BaseModel):
    """Per slot (index 0 = outside every structure): mean, texture spread, texture mix (0..1
    between two noise fields), and an intensity gradient per axis (units per normalised unit)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    means: tuple[float, ...]
    spreads: tuple[float, ...]
    mixes: tuple[float, ...]
    gradients: tuple[tuple[float, ...], ...]
    edge_sigma: float
    persistence: float
    difficulty: float


TissueValue = Callable[[str, Draw], tuple[float, float]]


def sample_texture(
    cfg: TextureConfig,
    anatomy: AnatomyParams,
    ndim: int,
    draw: Draw,
    tissue_value: TissueValue,
    outside: float,
    value_range: tuple[float, float],
    log_range: bool = False,
) -> TextureParams:
    """Draw intensities for every slot; ``tissue_value`` gives (mean, spread) for a tissue."""
    difficulty = draw.uniform(*cfg.difficulty)
    lo, hi = value_range
    span = hi - lo
    means = [outside]
    spreads = [0.0]
    mixes = [0.0]
    grads: list[tuple[float, ...]] = [(0.0,) * ndim]
    for s in anatomy.structures:
        if is_split_part(s):
            # one part of a structure cut in two (anatomy's p_split): the part continues the
            # whole's intensity, texture and gradient (mean at the centre, hence the shift)
            w = s.touches + 1
            c_w = anatomy.structures[s.touches].center
            means.append(
                means[w] + sum(g * (a - b) for g, a, b in zip(grads[w], s.center, c_w, strict=True))
            )
            spreads.append(spreads[w])
            mixes.append(mixes[w])
            grads.append(grads[w])
            continue
        mean, spread = tissue_value(s.tissue, draw)
        base = mean
        if s.label > 0 and draw.bernoulli(cfg.p_random_contrast):
            mean = draw.log_uniform(lo, hi) if log_range else draw.uniform(lo, hi)
        if s.touches >= 0:
            # Weak contrast to the neighbour it abuts: the gap shrinks with difficulty.
            nb = means[s.touches + 1]
            sign = 1 if draw.bernoulli(0.5) else -1
            if log_range:  # a ratio: 0.1 .. 1.6 nepers
                mean = nb * math.exp(sign * ((1 - difficulty) * draw.uniform(0.2, 1.5) + 0.1))
            else:
                mean = nb + sign * span * ((1 - difficulty) * draw.uniform(0.05, 0.3) + 0.02)
        if log_range:  # the texture spread scales with the mean
            spread *= mean / max(base, 1e-6)
        means.append(mean)
        spreads.append(spread * draw.uniform(0.5, 1.5))
        mixes.append(draw.uniform())
        scale = abs(mean) if log_range else span  # log-range intensities vary by a fraction
        g = cfg.gradient * scale * draw.uniform(0, 1) if s.label > 0 or s.kind == "blob" else 0.0
        grads.append(tuple(g * x for x in draw.unit_vector(ndim)))
    edge = cfg.edge_sigma[0] + (cfg.edge_sigma[1] - cfg.edge_sigma[0]) * (
        0.5 * difficulty + 0.5 * draw.uniform()
    )
    return TextureParams(
        means=tuple(means),
        spreads=tuple(spreads),
        mixes=tuple(mixes),
        gradients=tuple(grads),
        edge_sigma=edge,
        persistence=draw.uniform(*cfg.persistence),
        difficulty=difficulty,
    )


def octave_shapes(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Coarse grid shapes of the texture octaves (4, 8, 16, ... up to an eighth of the field;
    finer grain comes from each modality's noise)."""
    top = max(shape)
    out = []
    n = 4
    while n <= max(4, top // 8):
        out.append(tuple(max(2, round(s / top * n)) for s in shape))
        n *= 2
    return out


def slot_table(params: list[TextureParams], anatomies: list[AnatomyParams], device) -> torch.Tensor:
    """(B, K + 1, 3 + ndim): [mean - g.c, spread, mix, g_1..g_ndim] per slot."""
    B = len(params)
    K1 = max(len(p.means) for p in params)
    nd = len(params[0].gradients[0])
    tab = torch.zeros(B, K1, 3 + nd, dtype=torch.float64)
    for b, (p, a) in enumerate(zip(params, anatomies, strict=True)):
        n = len(p.means)
        g = torch.tensor(p.gradients, dtype=torch.float64)
        centers = torch.tensor(
            [(0.0,) * nd] + [s.center for s in a.structures], dtype=torch.float64
        )
        tab[b, :n, 0] = torch.tensor(p.means, dtype=torch.float64) - (g * centers).sum(1)
        tab[b, :n, 1] = torch.tensor(p.spreads, dtype=torch.float64)
        tab[b, :n, 2] = torch.tensor(p.mixes, dtype=torch.float64)
        tab[b, :n, 3:] = g
    return tab.to(device=device, dtype=torch.float32)


def gather_slots(table: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """table (B, K, F), slots (B, *S) int64 -> (B, F, *S)."""
    B, _, nf = table.shape
    idx = slots.reshape(B, 1, -1).expand(B, nf, -1)
    # gather from a contiguous (B, F, K) table: several times faster than from its transpose
    return table.transpose(1, 2).contiguous().gather(2, idx).view(B, nf, *slots.shape[1:])


def render_texture(
    params: list[TextureParams],
    anatomies: list[AnatomyParams],
    slots: torch.Tensor,
    grid: torch.Tensor,
    octaves: list[torch.Tensor],
) -> torch.Tensor:
    """Intensity image (B, 1, *S) from slot maps (B, *S), the normalised grid (ndim, *S) and
    texture octaves (each (B, 2, *c_i), standard normal)."""
    device = slots.device
    tab = slot_table(params, anatomies, device)
    vals = gather_slots(tab, slots)  # (B, 3 + nd, *S)
    mean = vals[:, :1] + (vals[:, 3:] * grid.unsqueeze(0)).sum(1, keepdim=True)
    sigma = torch.tensor([p.edge_sigma for p in params], device=device)
    mean = gaussian_blur(mean, sigma)
    pers = torch.tensor([p.persistence for p in params], device=device)
    # The octaves are at most an eighth of the field: sum them at a quarter of the
    # resolution, then upsample once.
    shape = tuple(slots.shape[1:])
    quarter = tuple(max(2, s // 4) for s in shape)
    tex = smooth_field(fractal_field(octaves, quarter, pers), shape)  # (B, 2, *S)
    mix = vals[:, 2:3]
    t = mix * tex[:, :1] + torch.sqrt((1 - mix * mix).clamp_min(0)) * tex[:, 1:2]
    return mean + vals[:, 1:2] * t
