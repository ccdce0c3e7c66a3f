"""One synthetic case: `sample_case` draws every parameter (JSON-serialisable `CaseParams`),
`render_cases` turns a batch of them into images and label maps on any device.

The stages are separate (shapes -> textures -> modality physics) and each is a pair
``sample_*(cfg, ..., draw) -> Params`` / deterministic render.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from medfm.kernels import normalize_percentiles
from medfm.synth import ct, mri, us
from medfm.synth.anatomy import (
    AnatomyConfig,
    AnatomyParams,
    anatomy_noise_shape,
    field_slots,
    normalized_grid,
    render_anatomy,
    sample_anatomy,
)
from medfm.synth.ct import CTConfig, CTParams
from medfm.synth.mri import MRIConfig, MRIParams
from medfm.synth.rng import Draw, case_seed, noise_generator
from medfm.synth.texture import (
    TextureConfig,
    TextureParams,
    gather_slots,
    octave_shapes,
    render_texture,
    sample_texture,
)
from medfm.synth.us import USConfig, USParams

ModalityName = Literal["ct", "mri", "us"]


class SynthConfig(BaseModel):
    """Every knob of the generator (defaults are the ones the CLI uses)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    anatomy: AnatomyConfig = AnatomyConfig()
    texture: TextureConfig = TextureConfig()
    ct: CTConfig = CTConfig()
    mri: MRIConfig = MRIConfig()
    us: USConfig = USConfig()
    coarse_factor: int = Field(4, ge=1, le=8)


Physics = Annotated[CTParams | MRIParams | USParams, Field(discriminator="modality")]


class CaseParams(BaseModel):
    """Everything that defines a case; `render_cases` of it is deterministic per device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modality: ModalityName
    seed: int
    shape: tuple[int, ...]
    anatomy: AnatomyParams
    physics: Physics
    texture: TextureParams
    noise_seed: int
    coarse_factor: int
    min_voxels: int


@dataclass(frozen=True)
class Modality:
    name: str
    channel_name: str
    body: bool
    label_tissues: dict[str, float]
    distractor_tissues: dict[str, float]
    outside: float
    value_range: tuple[float, float]
    noise_shapes: Callable[[tuple[int, ...]], dict[str, tuple[int, ...]]]
    log_range: bool = False


MODALITIES: dict[str, Modality] = {
    "ct": Modality(
        "ct",
        "CT",
        True,
        ct.LABEL_TISSUES,
        ct.DISTRACTOR_TISSUES,
        -1000.0,
        (-120.0, 250.0),
        ct.noise_shapes,
    ),
    "mri": Modality(
        "mri",
        "MRI",
        True,
        mri.LABEL_TISSUES,
        mri.DISTRACTOR_TISSUES,
        0.0,
        (0.03, 1.0),
        mri.noise_shapes,
    ),
    "us": Modality(
        "us",
        "US",
        False,
        us.LABEL_TISSUES,
        us.DISTRACTOR_TISSUES,
        0.0,
        (0.003, 3.0),
        us.noise_shapes,
        log_range=True,
    ),
}


def sample_case(
    cfg: SynthConfig, modality: str, shape: tuple[int, ...], seed: int, index: int
) -> CaseParams:
    """Draw case ``index`` of a run with ``seed``: a function of (seed, index) alone."""
    mod = MODALITIES[modality]
    cs = case_seed(seed, index)
    g = torch.Generator()
    g.manual_seed(cs)
    draw = Draw(g)
    nd = len(shape)
    anatomy = sample_anatomy(
        cfg.anatomy,
        shape,
        draw,
        body=mod.body,
        tissue_weights=mod.label_tissues,
        distractor_weights=mod.distractor_tissues,
    )
    if modality == "ct":
        physics = ct.sample_params(cfg.ct, draw, anatomy=anatomy, shape=shape)
        tissue_value = ct.tissue_value
    elif modality == "mri":
        physics = mri.sample_params(cfg.mri, draw, anatomy=anatomy, shape=shape)
        tissue_value = mri.tissue_value_for(physics.weighting)
    else:
        physics = us.sample_params(cfg.us, draw, anatomy=anatomy, shape=shape)
        tissue_value = us.tissue_value
    texture = sample_texture(
        cfg.texture, anatomy, nd, draw, tissue_value, mod.outside, mod.value_range, mod.log_range
    )
    return CaseParams(
        modality=modality,
        seed=cs,
        shape=tuple(shape),
        anatomy=anatomy,
        physics=physics,
        texture=texture,
        noise_seed=draw.seed(),
        coarse_factor=cfg.coarse_factor,
        min_voxels=cfg.anatomy.min_voxels,
    )


@dataclass
class Rendered:
    """image (B, 1, *S) float32 in the modality's units (CT: HU, MRI: magnitude, US: [0, 1]);
    label (B, 1, *S) uint8, labels numbered 1..n in structure order (absent ones dropped)."""

    image: torch.Tensor
    label: torch.Tensor


def draw_noise(case: CaseParams, device: torch.device) -> dict[str, torch.Tensor]:
    """All random tensors a case needs, from its own generator on ``device``, in fixed order."""
    g = noise_generator(case.noise_seed, device)
    nd = len(case.shape)
    out = {"deform": torch.randn(anatomy_noise_shape(nd), generator=g, device=device)}
    for i, s in enumerate(octave_shapes(case.shape)):
        out[f"octave{i}"] = torch.randn((2, *s), generator=g, device=device)
    for name, s in MODALITIES[case.modality].noise_shapes(case.shape).items():
        if name == "lines":
            out[name] = torch.rand(s, generator=g, device=device)
        else:
            out[name] = torch.randn(s, generator=g, device=device)
    return out


def _compact_labels(
    slots: torch.Tensor,
    label_lut: torch.Tensor,
    min_voxels: int,
    visible: torch.Tensor | None,
    field: torch.Tensor,
) -> torch.Tensor:
    """Drop labels with fewer than ``min_voxels`` visible voxels and renumber the rest 1..n.

    A case whose drawn labels are all out of view (outside the ultrasound beam, covered, or
    too small for its grid) gets one label all the same, so every label map shows a structure:
    the unlabelled structure with the most visible voxels (``min_voxels`` or more) that is not
    part of the body or the field (``field``, (B, K + 1) bool), else the visible structure with
    the most voxels (the body in CT and MRI, the tissue in the beam in ultrasound). A case with
    a drawn label in view is unchanged."""
    B, K1 = label_lut.shape
    counts = torch.zeros(B, K1, device=slots.device, dtype=torch.long)
    ones = torch.ones_like(slots.flatten(1)) if visible is None else visible.flatten(1).long()
    counts.scatter_add_(1, slots.flatten(1), ones)
    lut = label_lut.to(slots.device)
    keep = (lut > 0) & (counts >= min_voxels)
    empty = ~keep.any(1)
    if bool(empty.any()):
        counts[:, 0] = 0  # slot 0: outside every structure
        field = field.to(slots.device)
        inner = torch.where(field | (counts < min_voxels), 0, counts)
        best = torch.where(inner.amax(1) > 0, inner.argmax(1), counts.argmax(1))
        promoted = torch.zeros_like(keep).scatter_(1, best.unsqueeze(1), True) & empty[:, None]
        lut = torch.where(promoted, 1, lut)
        keep = keep | promoted
    present = torch.zeros(B, int(lut.max()) + 2, dtype=torch.long, device=slots.device)
    present.scatter_(1, torch.where(keep, lut, 0), 1)
    present[:, 0] = 0
    rank = present.cumsum(1)
    return torch.where(keep, rank.gather(1, lut), torch.zeros_like(lut))


@torch.inference_mode()
def render_cases(cases: list[CaseParams], device: torch.device | str = "cpu") -> Rendered:
    """Render cases of one modality and shape as a batch. Each case's output depends only on
    its own parameters (not on the batch it is rendered in)."""
    device = torch.device(device)
    modality = cases[0].modality
    shape = tuple(cases[0].shape)
    if any(c.modality != modality or tuple(c.shape) != shape for c in cases):
        raise ValueError("render_cases needs cases of one modality and one shape")
    noises = [draw_noise(c, device) for c in cases]
    noise = {k: torch.stack([n[k] for n in noises]) for k in noises[0]}
    anatomies = [c.anatomy for c in cases]
    slots, label_lut = render_anatomy(
        anatomies, shape, noise["deform"], coarse_factor=cases[0].coarse_factor
    )
    physics = [c.physics for c in cases]
    grid = normalized_grid(shape, device)
    octaves = [noise[f"octave{i}"] for i in range(len(octave_shapes(shape)))]
    image = render_texture([c.texture for c in cases], anatomies, slots, grid, octaves)
    visible = None
    if modality == "ct":
        image = ct.render_hu(physics, image, grid, noise)
    elif modality == "mri":
        image = mri.render(physics, image, noise)
    else:
        tissues = [[s.tissue for s in a.structures] for a in anatomies]
        acoustic = gather_slots(us.acoustic_table(tissues, device), slots)
        image, visible = us.render(physics, image, acoustic, noise)
        visible = visible[:, 0]  # labels only inside the beam
    field = field_slots(anatomies, label_lut.shape[1])
    lut = _compact_labels(slots, label_lut, cases[0].min_voxels, visible, field)
    label = lut.gather(1, slots.flatten(1)).view(slots.shape).unsqueeze(1)
    if visible is not None:
        label = label * visible.unsqueeze(1)
    return Rendered(image=image.float(), label=label.to(torch.uint8))


@torch.inference_mode()
def to_output(cases: list[CaseParams], image: torch.Tensor) -> torch.Tensor:
    """Rendered images -> what is written: 2D uint8 grey; 3D CT int16 HU, MRI/US float32."""
    modality = cases[0].modality
    nd = image.dim() - 2
    if nd == 2:
        if modality == "ct":
            disp = ct.to_display([c.physics for c in cases], image)
        elif modality == "mri":
            disp = normalize_percentiles(image, 0.0, 99.5)
        else:
            disp = image
        return (disp.clamp(0, 1) * 255).round().to(torch.uint8)
    if modality == "ct":
        return image.round().clamp(-1024, 3071).to(torch.int16)
    if modality == "mri":
        return normalize_percentiles(image, 0.0, 99.5, clip=False).float()
    return image.float()
