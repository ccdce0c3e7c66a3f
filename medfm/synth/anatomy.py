"""Anatomy-like label maps: a body outline, unlabelled "distractor" tissue and labelled structures.

Every structure is a level set ``rho < 1`` of a smooth field: a star-convex blob (an ellipse /
ellipsoid whose radius varies smoothly with direction, through low-order polynomials of the
unit direction) or a tube (distance to a smooth Bezier curve over its radius). All structures
are deformed by one smooth displacement of the coordinates, can be confined inside a container
structure (organs inside the body, an inner structure inside its organ), can be thin shells
(walls, rims), and are painted in order, so later structures cover earlier ones and neighbours
abut. With probability ``p_large`` a case's first label is a dominant structure (radius
``large_size``, near the middle of the field: a fetal head filling the ultrasound sector, a
liver across an abdominal crop), so that boxes spanning most of the image occur too. A label can
cover several structures: a wall with the cavity it encloses (``p_filled``: a bladder, a vessel,
a skull with its contents) and an object with internal parts of other tissues (``p_parts``: an
organ with its vessels, a head with its brain), so that a box or a click anywhere on a
heterogeneous object asks for the whole of it. With probability ``p_split`` a label is one part of
a structure cut in two by a gently curved surface, its other part the next label, both of one
tissue and texture (the hippocampus's head and body, an organ's segments): the boundary between
them is in no intensity, and a box around one part holds some of the other. The sampled
parameters are plain numbers (`AnatomyParams`); `render_anatomy` turns a batch of them into slot
maps on any device.

Coordinates are isotropic and normalised: along axis j,
``(index - (S_j - 1) / 2) * 2 / (max(S) - 1)``, so the longest axis spans [-1, 1].
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from medfm.kernels import smooth_field
from medfm.synth.rng import Draw

TISSUES = ("air", "lung", "fat", "fluid", "soft", "muscle", "organ", "enhanced", "bone")


class AnatomyConfig(BaseModel):
    """How label maps are drawn. Sizes are radii in normalised units (1 = half the field)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_labels: tuple[int, int] = (1, 5)
    n_distractors: tuple[int, int] = (3, 8)
    size: tuple[float, float] = (0.05, 0.4)
    p_tube: float = Field(0.15, ge=0, le=1)
    p_nested: float = Field(0.2, ge=0, le=1)
    p_rim: float = Field(0.12, ge=0, le=1)
    p_touch: float = Field(0.35, ge=0, le=1)
    p_filled: float = Field(0.5, ge=0, le=1)
    p_parts: float = Field(0.3, ge=0, le=1)
    p_large: float = Field(0.25, ge=0, le=1)
    p_split: float = Field(0.15, ge=0, le=1)
    large_size: tuple[float, float] = (0.4, 0.75)
    # walls (p_rim): the cavity's tissues, the wall's thickness as a fraction of its radius, and
    # the wall's tissues (empty: the label's tissue). A skull around its brain is a thin bright
    # wall ("bone" in CT and MRI; "enhanced" in ultrasound, where a fetal skull lets the beam
    # through) whose inside can look like the tissue around it ("soft", "muscle"): only the
    # ring tells where the head ends.
    rim_cavity_tissues: tuple[str, ...] = ("fluid", "organ", "enhanced")
    rim_shell: tuple[float, float] = (0.12, 0.3)
    rim_wall_tissues: tuple[str, ...] = ()
    wobble: float = Field(0.18, ge=0, le=1)
    deform: tuple[float, float] = (0.0, 0.08)
    min_voxels: int = 12

    @field_validator("rim_cavity_tissues", "rim_wall_tissues")
    @classmethod
    def _known_tissues(cls, v: tuple[str, ...], info) -> tuple[str, ...]:
        unknown = [t for t in v if t not in TISSUES]
        if (not v and info.field_name == "rim_cavity_tissues") or unknown:
            raise ValueError(f"give one or more of {', '.join(TISSUES)}; got {list(v)}")
        return v

    @field_validator("rim_shell")
    @classmethod
    def _shell_fraction(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] < 1:
            raise ValueError(f"a wall's thickness is a fraction 0 < low <= high < 1, got {v}")
        return v


class Structure(BaseModel):
    """One structure. ``container`` and ``touches`` are indices into the structure list."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["blob", "tube"]
    tissue: str
    label: int = 0
    center: tuple[float, ...]
    radii: tuple[float, ...] = ()
    rotation: tuple[float, ...] = ()
    harmonics: tuple[float, ...] = ()
    points: tuple[tuple[float, ...], ...] = ()
    tube_radius: float = 0.0
    shell: float = 0.0
    container: int = -1
    margin: float = 0.0
    touches: int = -1


class AnatomyParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    structures: tuple[Structure, ...]
    deform: float
    n_labels: int


def is_split_part(s: Structure) -> bool:
    """Whether ``s`` is the second part of a structure cut in two (``p_split``): a large sphere
    confined to the whole (``touches`` = ``container``), so its centre and radii are not those
    of anything in the image."""
    return s.touches >= 0 and s.touches == s.container


def n_harmonics(ndim: int) -> int:
    """Number of monomials of degree 1..3 in ``ndim`` variables."""
    return sum(math.comb(ndim + d - 1, d) for d in (1, 2, 3))


def _monomial_exponents(ndim: int) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    for d in (1, 2, 3):
        for e in _compositions(d, ndim):
            out.append(e)
    return out


def _compositions(total: int, parts: int) -> list[tuple[int, ...]]:
    if parts == 1:
        return [(total,)]
    return [
        (i, *rest) for i in range(total, -1, -1) for rest in _compositions(total - i, parts - 1)
    ]


def _rotation(draw: Draw, ndim: int) -> list[float]:
    if ndim == 2:
        a = draw.uniform(0, 2 * math.pi)
        return [math.cos(a), -math.sin(a), math.sin(a), math.cos(a)]
    w, x, y, z = (draw.normal() for _ in range(4))
    n = math.sqrt(w * w + x * x + y * y + z * z) or 1.0
    w, x, y, z = w / n, x / n, y / n, z / n
    return [
        1 - 2 * (y * y + z * z),
        2 * (x * y - z * w),
        2 * (x * z + y * w),
        2 * (x * y + z * w),
        1 - 2 * (x * x + z * z),
        2 * (y * z - x * w),
        2 * (x * z - y * w),
        2 * (y * z + x * w),
        1 - 2 * (x * x + y * y),
    ]


def _harmonics(draw: Draw, ndim: int, amp: float) -> list[float]:
    return [draw.normal(0.0, amp / sum(e)) for e in _monomial_exponents(ndim)]


def _in_ball(draw: Draw, radii: list[float], center: list[float]) -> list[float]:
    d = draw.unit_vector(len(radii))
    s = draw.uniform() ** (1.0 / len(radii))
    return [c + r * s * x for c, r, x in zip(center, radii, d, strict=True)]


def field_extent(shape: tuple[int, ...]) -> list[float]:
    """Half-extent of the field along each axis in normalised units."""
    m = max(shape) - 1
    return [(s - 1) / m if m > 0 else 1.0 for s in shape]


def sample_anatomy(
    cfg: AnatomyConfig,
    shape: tuple[int, ...],
    draw: Draw,
    *,
    body: bool,
    tissue_weights: dict[str, float],
    distractor_weights: dict[str, float],
) -> AnatomyParams:
    """Draw one case's structures. ``body=False`` (ultrasound) fills the field with tissue."""
    nd = len(shape)
    ext = field_extent(shape)
    structs: list[dict] = []
    eye = [1.0 if i == j else 0.0 for i in range(nd) for j in range(nd)]

    if body:
        radii = [e * draw.uniform(0.78, 0.95) for e in ext]
        radii[0] *= draw.uniform(0.7, 0.95)  # bodies are flatter front-to-back
        if nd == 3:
            radii[2] = 10.0  # a cylinder along the slice axis
        center = [draw.normal(0, 0.02) for _ in range(nd)]
        harm = _harmonics(draw, nd, 0.06)
        rot = _rotation(draw, 2) if nd == 2 else eye
        fat = draw.uniform(0.03, 0.1)
        structs.append(
            dict(
                kind="blob", tissue="fat", center=center, radii=radii, rotation=rot, harmonics=harm
            )
        )
        inner_r = [r * (1 - fat) for r in radii]
        if nd == 3:
            inner_r[2] = 10.0
        inner_tissue = draw.choice(["soft", "muscle"], [0.6, 0.4])
        structs.append(
            dict(
                kind="blob",
                tissue=inner_tissue,
                center=center,
                radii=inner_r,
                rotation=rot,
                harmonics=harm,
            )
        )
        room = [r * 0.8 for r in inner_r]
        if nd == 3:
            room[2] = ext[2]
        container = 1
    else:
        structs.append(
            dict(
                kind="blob",
                tissue=draw.choice(["soft", "organ", "muscle"]),
                center=[0.0] * nd,
                radii=[100.0] * nd,
                rotation=eye,
                harmonics=[0.0] * n_harmonics(nd),
            )
        )
        # Near-field layers under the probe (skin, fat, muscle): wide flat blobs whose lower
        # edge is a gently curved band boundary, deepest painted first.
        depths = sorted((draw.uniform(0.02, 0.45) for _ in range(draw.randint(1, 3))), reverse=True)
        for i, d in enumerate(depths):
            big = draw.uniform(1.5, 4.0)
            c = [-ext[0] + d * 2 * ext[0] - big] + [draw.normal(0, 0.2) for _ in range(nd - 1)]
            tissue = (
                "enhanced"
                if i == len(depths) - 1 and d < 0.05
                else draw.choice(["fat", "muscle", "soft"])
            )
            structs.append(
                dict(
                    kind="blob",
                    tissue=tissue,
                    center=c,
                    radii=[big] + [big * draw.uniform(1.5, 3.0)] * (nd - 1),
                    rotation=eye,
                    harmonics=_harmonics(draw, nd, 0.02),
                )
            )
        center = [0.0] * nd
        room = list(ext)
        container = -1

    def blob(
        tissue: str, label: int = 0, size: float | None = None, at=None, large: bool = False
    ) -> dict:
        """``large``: a dominant structure, radius from ``large_size``, centred within 0.3 of
        the room's radius of its middle."""
        if large:
            size = draw.log_uniform(*cfg.large_size)
            at = _in_ball(draw, [x * 0.3 for x in room], center)
        r = size if size is not None else draw.log_uniform(*cfg.size)
        radii = [r * draw.uniform(0.6, 1.4) for _ in range(nd)]
        return dict(
            kind="blob",
            tissue=tissue,
            label=label,
            center=at if at is not None else _in_ball(draw, room, center),
            radii=radii,
            rotation=_rotation(draw, nd),
            harmonics=_harmonics(draw, nd, cfg.wobble),
            container=container,
            margin=draw.uniform(0.0, 0.05),
        )

    def tube(tissue: str, label: int = 0) -> dict:
        p0 = _in_ball(draw, room, center)
        d = draw.unit_vector(nd)
        length = draw.uniform(0.4, 1.6)
        bend = [draw.normal(0, 0.3) for _ in range(nd)]
        p2 = [a + length * x for a, x in zip(p0, d, strict=True)]
        p1 = [(a + b) / 2 + c for a, b, c in zip(p0, p2, bend, strict=True)]
        ts = [i / 11 for i in range(12)]
        pts = [
            tuple(
                (1 - t) ** 2 * a + 2 * (1 - t) * t * b + t * t * c
                for a, b, c in zip(p0, p1, p2, strict=True)
            )
            for t in ts
        ]
        return dict(
            kind="tube",
            tissue=tissue,
            label=label,
            center=p0,
            points=pts,
            tube_radius=draw.log_uniform(0.012, 0.06),
            container=container,
            margin=0.0,
        )

    tissues = list(tissue_weights)
    t_w = list(tissue_weights.values())
    d_tissues = list(distractor_weights)
    d_w = list(distractor_weights.values())

    def add_parts(parent: int, label: int, margin: float) -> None:
        """With probability ``p_parts``, 1..3 blobs of other tissues inside structure ``parent``
        (kept ``margin`` inside its edge) that carry its label."""
        if not draw.bernoulli(cfg.p_parts):
            return
        p = structs[parent]
        for _ in range(draw.randint(1, 3)):
            at = _in_ball(draw, [r * 0.5 for r in p["radii"]], p["center"])
            part = blob(draw.choice(d_tissues, d_w), label, at=at)
            part["radii"] = [r * draw.uniform(0.15, 0.45) for r in p["radii"]]
            part["container"] = parent
            part["margin"] = margin + draw.uniform(0.02, 0.15)
            structs.append(part)

    def split(tissue: str, label: int) -> None:
        """A blob (``label``) and, drawn over it and confined to it, a sphere of radius 2..6
        whose surface cuts it within 0.4 of its radius from its centre (``label + 1``, same
        tissue; ``touches`` = ``container`` = the blob tells the texture to continue it)."""
        whole = blob(tissue, label, size=draw.log_uniform(max(cfg.size[0], 0.12), cfg.size[1]))
        structs.append(whole)
        d = draw.unit_vector(nd)
        cut = draw.uniform(-0.4, 0.4) * sum(whole["radii"]) / nd
        big_r = draw.uniform(2.0, 6.0)
        at = [c + (cut + big_r) * x for c, x in zip(whole["center"], d, strict=True)]
        part = blob(tissue, label + 1, size=big_r, at=at)
        part.update(
            radii=[big_r] * nd,
            harmonics=_harmonics(draw, nd, 0.05),
            container=len(structs) - 1,
            touches=len(structs) - 1,
            margin=0.0,
        )
        structs.append(part)

    for _ in range(draw.randint(*cfg.n_distractors)):
        tissue = draw.choice(d_tissues, d_w)
        if draw.bernoulli(0.25):
            structs.append(tube(draw.choice(["enhanced", "fluid", "fat"]), 0))
        else:
            structs.append(blob(tissue))

    n_labels = draw.randint(*cfg.n_labels)
    # p_large == 0 draws nothing, so such configs give the cases they gave before p_large
    large = cfg.p_large > 0 and draw.bernoulli(cfg.p_large)
    label = 1
    while label <= n_labels:
        tissue = draw.choice(tissues, t_w)
        big = large and label == 1  # the first label is the dominant one (not a tube)
        # p_split == 0 draws nothing, as p_large
        if cfg.p_split > 0 and label < n_labels and not big and draw.bernoulli(cfg.p_split):
            split(tissue, label)
            label += 2
            continue
        u = draw.uniform()
        if u < cfg.p_tube and not big:
            structs.append(tube(tissue, label))
            label += 1
        elif u < cfg.p_tube + cfg.p_nested and label < n_labels:
            parent = (
                blob(tissue, label, large=True)
                if big
                else blob(tissue, label, size=draw.log_uniform(max(cfg.size[0], 0.12), cfg.size[1]))
            )
            structs.append(parent)
            inner_r = [r * draw.uniform(0.25, 0.6) for r in parent["radii"]]
            offset = _in_ball(draw, [r * 0.3 for r in parent["radii"]], parent["center"])
            child = blob(draw.choice(tissues, t_w), label + 1, at=offset)
            child["radii"] = inner_r
            child["container"] = len(structs) - 1
            child["margin"] = draw.uniform(0.1, 0.3)
            structs.append(child)
            label += 2
        elif u < cfg.p_tube + cfg.p_nested + cfg.p_rim:
            filled = draw.bernoulli(cfg.p_filled)
            cavity = blob(
                draw.choice(list(cfg.rim_cavity_tissues)), label if filled else 0, large=big
            )
            structs.append(cavity)
            wall = dict(cavity, tissue=tissue, label=label, shell=draw.uniform(*cfg.rim_shell))
            # no rim_wall_tissues draws nothing, so configs without them give the cases they gave
            if cfg.rim_wall_tissues:
                wall["tissue"] = draw.choice(list(cfg.rim_wall_tissues))
            structs.append(wall)
            if filled:
                add_parts(len(structs) - 2, label, wall["shell"])
            label += 1
        elif (
            u < cfg.p_tube + cfg.p_nested + cfg.p_rim + cfg.p_touch and len(structs) > 2 and not big
        ):
            nb_index = draw.randint(2 if body else 1, len(structs) - 1)
            nb = structs[nb_index]
            new = blob(tissue, label)
            if nb["kind"] == "blob":
                d = draw.unit_vector(nd)
                reach = sum(r for r in nb["radii"]) / nd + sum(new["radii"]) / nd * 0.8
                new["center"] = [c + reach * x for c, x in zip(nb["center"], d, strict=True)]
                new["touches"] = nb_index
            structs.append(new)
            add_parts(len(structs) - 1, label, 0.0)
            label += 1
        else:
            structs.append(blob(tissue, label, large=big))
            add_parts(len(structs) - 1, label, 0.0)
            label += 1

    deform = draw.uniform(*cfg.deform)
    return AnatomyParams(
        structures=tuple(Structure(**s) for s in structs), deform=deform, n_labels=n_labels
    )


def n_field_structures(params: AnatomyParams) -> int:
    """How many leading structures make up the body (CT, MRI: the fat layer and the body
    inside it, both about the one centre) or the field (ultrasound: the tissue filling it and
    the near-field layers under the probe, radius 1.5 or more): unlabelled, never a target."""
    first = params.structures[0]
    n = 0
    for s in params.structures:
        if s.label != 0 or s.kind != "blob":
            break
        if max(s.radii) < 1.5 and s.center != first.center:
            break
        n += 1
    return n


def field_slots(params: list[AnatomyParams], n_slots: int) -> torch.Tensor:
    """(B, n_slots) bool: True at slot k + 1 of each of the `n_field_structures` of a case."""
    out = torch.zeros(len(params), n_slots, dtype=torch.bool)
    for b, p in enumerate(params):
        out[b, 1 : 1 + n_field_structures(p)] = True
    return out


def normalized_grid(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(ndim, *shape) isotropic normalised coordinates (see module docstring)."""
    m = max(max(shape) - 1, 1)
    axes = [
        (torch.arange(s, device=device, dtype=torch.float32) - (s - 1) / 2) * (2 / m) for s in shape
    ]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def coarse_shape(shape: tuple[int, ...], factor: int) -> tuple[int, ...]:
    return tuple(-(-s // factor) for s in shape)


def anatomy_noise_shape(ndim: int) -> tuple[int, ...]:
    """Shape of the coarse noise (per case) that drives the global deformation."""
    return (ndim,) + (5,) * ndim


def _coarse_grid(shape: tuple[int, ...], factor: int, device) -> torch.Tensor:
    """Normalised coordinates of the coarse voxel centres: coarse voxel j sits at full-res
    position j * factor + (factor - 1) / 2, so upsampling by ``factor`` (align_corners=False)
    lands exactly on the full-res grid."""
    m = max(max(shape) - 1, 1)
    cs = coarse_shape(shape, factor)
    axes = [
        (
            (torch.arange(c, device=device, dtype=torch.float32) * factor + (factor - 1) / 2)
            - (s - 1) / 2
        )
        * (2 / m)
        for c, s in zip(cs, shape, strict=True)
    ]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def _upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(C, *c) -> (C, *(c * factor)), linear, align_corners=False."""
    if factor == 1:
        return x
    mode = "bilinear" if x.dim() == 3 else "trilinear"
    return F.interpolate(x.unsqueeze(0), scale_factor=factor, mode=mode, align_corners=False)[0]


_TABLE_SIZE = {2: (1, 512), 3: (64, 128)}  # (polar, azimuth) samples of the radial factor
_MONO: dict[int, torch.Tensor] = {}


def _table_monomials(ndim: int) -> torch.Tensor:
    """(Nt * Np, n_harmonics) monomials of the unit directions of the radial-factor table:
    azimuth phi_j = -pi + 2 pi j / (Np - 1) and (3D) polar angle theta_i = pi i / (Nt - 1)."""
    if ndim not in _MONO:
        nt, n_phi = _TABLE_SIZE[ndim]
        phi = torch.linspace(-math.pi, math.pi, n_phi, dtype=torch.float64)
        if ndim == 2:
            d = torch.stack([phi.cos(), phi.sin()])  # (2, Np)
        else:
            theta = torch.linspace(0, math.pi, nt, dtype=torch.float64)[:, None]
            d = torch.stack(
                [theta.sin() * phi.cos(), theta.sin() * phi.sin(), theta.cos().expand(nt, n_phi)]
            ).reshape(3, -1)
        cols = []
        for e in _monomial_exponents(ndim):
            term = torch.ones(d.shape[1], dtype=torch.float64)
            for axis, p in enumerate(e):
                term = term * d[axis] ** p
            cols.append(term)
        _MONO[ndim] = torch.stack(cols, 1).float()
    return _MONO[ndim]


def radial_table(harmonics: tuple[float, ...], ndim: int) -> torch.Tensor:
    """The star-convex radius factor f(direction) = 1 + sum_m h_m monomial_m(direction),
    clamped >= 0.35, tabulated on a direction grid: (1, 1, Nt, Np)."""
    f = 1 + _table_monomials(ndim) @ torch.tensor(harmonics, dtype=torch.float32)
    return f.clamp_min(0.35).view(1, 1, *_TABLE_SIZE[ndim])


def _blob_rho(s: Structure, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x (ndim, *S) normalised coordinates -> rho (*S) = |u| / f(u / |u|), with
    u = R^T (x - c) / r and f looked up bilinearly in ``table`` (see `radial_table`)."""
    nd = x.shape[0]
    u = []
    for i in range(nd):  # u_i = sum_j R_ji (x_j - c_j) / r_i, with python scalars
        acc = None
        for j in range(nd):
            w = s.rotation[j * nd + i] / s.radii[i]
            if w != 0.0:
                t = (x[j] - s.center[j]) * w
                acc = t if acc is None else acc.add_(t)
        u.append(acc if acc is not None else torch.zeros_like(x[0]))
    norm = torch.sqrt(sum(v * v for v in u)).clamp_min_(1e-6)
    gx = torch.atan2(u[1], u[0]).mul_(1 / math.pi)
    if nd == 2:
        gy = torch.zeros_like(gx)
    else:
        gy = torch.acos((u[2] / norm).clamp_(-1, 1)).mul_(2 / math.pi).sub_(1)
    grid = torch.stack([gx, gy], -1).view(1, 1, -1, 2)
    f = F.grid_sample(table.to(x.device), grid, mode="bilinear", align_corners=True)
    return norm / f.view(norm.shape)


def _tube_rho(s: Structure, x: torch.Tensor) -> torch.Tensor:
    """Distance to the polyline through ``s.points`` over the tube radius (one segment at a
    time, keeping the nearest: no (segments, ndim, *S) intermediates)."""
    nd = x.shape[0]
    p = torch.tensor(s.points, device=x.device)
    a, d = p[:-1], p[1:] - p[:-1]  # (J, nd)
    dd = (d * d).sum(1).clamp_min(1e-12)
    best = None
    for j in range(a.shape[0]):
        rel = [x[i] - a[j, i] for i in range(nd)]
        dot = rel[0] * d[j, 0]
        for i in range(1, nd):
            dot = dot + rel[i] * d[j, i]
        t = (dot / dd[j]).clamp_(0, 1)
        dist = None
        for i in range(nd):
            e = rel[i] - t * d[j, i]
            dist = e * e if dist is None else dist.add_(e * e)
        best = dist if best is None else torch.minimum(best, dist, out=best)
    return best.sqrt_().div_(s.tube_radius)


def _extent(
    s: Structure, ndim: int, max_disp: float, table: torch.Tensor | None
) -> tuple[list[float], list[float]]:
    """Conservative normalised bounding box (lo, hi) of a structure; ``max_disp`` bounds the
    deformation; ``table`` is the blob's `radial_table` (None for tubes)."""
    margin = max_disp + 0.02
    if s.kind == "tube":
        p = torch.tensor(s.points)
        r = s.tube_radius + margin
        return (p.amin(0) - r).tolist(), (p.amax(0) + r).tolist()
    reach = max(s.radii) * float(table.max()) * 1.02 + margin
    return [c - reach for c in s.center], [c + reach for c in s.center]


def _level(s: Structure, factor: int, step: float) -> int:
    """The coarsest grid factor (factor, factor / 2, ..., 1) on which the structure's thinnest
    part (its smallest radius, or the tube radius) spans at least 1.5 voxels of size ``step``."""
    r = s.tube_radius if s.kind == "tube" else min(s.radii) * (1 - 2 * s.shell / 3)
    fs = factor
    while fs > 1 and r < 1.5 * fs * step:
        fs //= 2
    return fs


def _crop(lo, hi, shape, factor) -> tuple[slice, ...]:
    """Coarse index slices covering the normalised box [lo, hi] (clipped to the field)."""
    m = max(max(shape) - 1, 1)
    out = []
    for a, b, s in zip(lo, hi, shape, strict=True):
        c = -(-s // factor)
        ia = (a * m / 2 + (s - 1) / 2 - (factor - 1) / 2) / factor
        ib = (b * m / 2 + (s - 1) / 2 - (factor - 1) / 2) / factor
        j0 = max(0, min(c, math.floor(ia) - 1))
        j1 = max(0, min(c, math.ceil(ib) + 2))
        out.append(slice(j0, j1))
    return tuple(out)


def _full(crop: tuple[slice, ...], factor: int) -> tuple[slice, ...]:
    return tuple(slice(c.start * factor, c.stop * factor) for c in crop)


def _contained_rho(structures: tuple[Structure, ...], k: int, x: torch.Tensor) -> torch.Tensor:
    """rho of blob ``k`` at coordinates ``x``, clipped by its own containers (as it is drawn)."""
    s = structures[k]
    rho = _blob_rho(s, x, radial_table(s.harmonics, x.shape[0]))
    if s.container >= 0:
        rho = torch.maximum(rho, _contained_rho(structures, s.container, x) / (1 - s.margin))
    return rho


def render_anatomy(
    params: list[AnatomyParams],
    shape: tuple[int, ...],
    deform_noise: torch.Tensor,
    *,
    coarse_factor: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paint a batch of anatomies.

    Blob level sets are evaluated on a grid ``coarse_factor`` times coarser, inside each
    structure's bounding box only, and upsampled linearly before thresholding at full
    resolution; tubes are evaluated at full resolution in their box.

    deform_noise: (B, ndim, 5, ..) standard normal (see `anatomy_noise_shape`).
    Returns ``slots`` (B, *shape) int64, where 0 is outside every structure and s + 1 is
    structure s (painted in order), and ``label_lut`` (B, K + 1) int64 mapping slot -> label
    (0 for unlabelled slots).
    """
    device = deform_noise.device
    nd = len(shape)
    f = coarse_factor
    K = max(len(p.structures) for p in params)
    cshape = coarse_shape(shape, f)
    padded = tuple(c * f for c in cshape)
    grid = _coarse_grid(shape, f, device)
    step = 2 / max(max(shape) - 1, 1)  # one full-res voxel in normalised units
    label_lut = torch.zeros(len(params), K + 1, dtype=torch.long)
    out = []
    for b, p in enumerate(params):
        for k, s in enumerate(p.structures):
            label_lut[b, k + 1] = s.label
        disp = smooth_field(deform_noise[b : b + 1], cshape)[0] * p.deform
        max_disp = float(disp.abs().max())
        x = grid + disp  # (nd, *c)
        slots = torch.zeros(padded, dtype=torch.long, device=device)
        containers = {s.container for s in p.structures if s.container >= 0}
        full_rho: dict[int, torch.Tensor] = {}
        for k, s in enumerate(p.structures):
            table = radial_table(s.harmonics, nd) if s.kind == "blob" else None
            lo, hi = _extent(s, nd, max_disp, table)
            crop = _crop(lo, hi, shape, f)
            if any(c.stop <= c.start for c in crop):
                continue
            if k in containers and s.kind == "blob":
                # what it contains stays inside it as drawn, i.e. clipped by its own container
                rho_k = _blob_rho(s, x, table)
                if s.container >= 0 and s.container in full_rho:
                    rho_k = torch.maximum(rho_k, full_rho[s.container] / (1 - s.margin))
                full_rho[k] = rho_k
            # Each structure is evaluated on the coarsest grid (factor f, f/2, ..., 1 of the
            # full resolution) on which its thinnest part spans >= 1.5 voxels, in its box only.
            fs = _level(s, f, step)
            sub = f // fs
            if s.kind == "blob" and sub == 1 and k in full_rho:
                rho = full_rho[k][crop]
            else:
                xl = _upsample(x[(slice(None), *crop)], sub)
                if s.kind == "tube":
                    rho = _tube_rho(s, xl)
                else:
                    rho = _blob_rho(s, xl, table)
            if s.container >= 0 and s.container in full_rho:
                # the container as it was drawn: from the coarse grid, or exactly where it
                # was drawn finer (a small parent), so what it contains stays inside it
                if sub == 1 or _level(p.structures[s.container], f, step) == f:
                    cont = _upsample(full_rho[s.container][crop].unsqueeze(0), sub)[0]
                else:
                    cont = _contained_rho(p.structures, s.container, xl)
                rho = torch.maximum(rho, cont / (1 - s.margin))
            if s.shell > 0:
                rho = (rho - (1 - s.shell / 2)).abs() / (s.shell / 2)
            region = _full(crop, f)
            lo_hi = torch.aminmax(rho)
            if float(lo_hi.max) < 0.9:  # covers its whole box (e.g. background tissue)
                slots[region].fill_(k + 1)
            elif float(lo_hi.min) <= 1.1:  # else it is nowhere in its box
                slots[region].masked_fill_(_upsample(rho.unsqueeze(0), fs)[0] < 1, k + 1)
        out.append(slots[tuple(slice(0, n) for n in shape)])
    return torch.stack(out), label_lut
