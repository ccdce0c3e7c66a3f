"""Training volumes and the patches drawn from them.

Sources: nnU-Net v2 raw folders (``imagesTr/*_0000.nii.gz``) or plain folders of NIfTI files,
several mixed; each volume resampled to the model's spacing (if set), mapped to [-1, 1]
(`medfm.diffusion.intensity`, clipped) and kept in memory as float16. A case's region comes
from ``--region``, else dataset.json's ``regions`` ({case: region}) or ``region`` (the whole
set), else "other".

Any sequence of `TrainVolume` is a source (the CLI adds one that makes synthetic volumes on
the fly): training draws a source uniformly, then a volume of it, then a patch, all from the
step's generator, so a step draws the same patch on every run and resume.

Patches (MedDiff-FM's image and patch levels), each kind with equal probability by default:
``whole``: the whole volume resized to the patch; ``zoom``: a crop twice the patch resized
down; ``crop``: a crop of the patch's size. Each comes with its box in the volume's frame
(`medfm.diffusion.position`); crops larger than the volume are padded with -1 (background).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from medfm.diffusion.intensity import intensity_map
from medfm.diffusion.position import crop_box, whole_box
from medfm.errors import MedfmError
from medfm.io import load_volume, resample_volume

__all__ = [
    "PATCH_KINDS",
    "TrainVolume",
    "draw_labelled_patches",
    "draw_patches",
    "list_volume_files",
    "load_training_volumes",
    "sample_patch",
]

PATCH_KINDS = ("whole", "zoom", "crop")
_NIFTI = (".nii.gz", ".nii")


@dataclass(frozen=True)
class TrainVolume:
    """One training volume: ``image`` (1, *S) in [-1, 1] (float16), its region, its name and
    (for a ControlNet's mask task) its ``label`` map (1, *S) (uint8), else None."""

    image: torch.Tensor
    region: str | None
    name: str
    label: torch.Tensor | None = None


def list_volume_files(folder: str | os.PathLike) -> list[Path]:
    """The image files of a folder: nnU-Net raw (channel 0 of imagesTr) or plain NIfTI files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MedfmError(f"--data {folder} is not a folder; give nnU-Net raw or NIfTI folders")
    images = folder / "imagesTr"
    if (folder / "dataset.json").is_file() and images.is_dir():
        files = sorted(p for p in images.iterdir() if p.name.split(".")[0].endswith("_0000"))
    else:
        files = sorted(p for p in folder.iterdir() if p.name.lower().endswith(_NIFTI))
    files = [p for p in files if p.name.lower().endswith(_NIFTI) and not p.name.startswith(".")]
    if not files:
        raise MedfmError(f"--data {folder} holds no NIfTI volumes (.nii, .nii.gz)")
    return files


def _case_name(path: Path) -> str:
    name = path.name
    for end in _NIFTI:
        if name.lower().endswith(end):
            name = name[: -len(end)]
    return name[:-5] if name.endswith("_0000") else name


def _dataset_regions(folder: Path) -> tuple[str | None, dict[str, str]]:
    """(the set's region, {case: region}) from dataset.json's optional fields."""
    path = folder / "dataset.json"
    if not path.is_file():
        return None, {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError, OSError) as e:
        raise MedfmError(f"{path} is not valid JSON ({type(e).__name__}); fix it") from None
    region = raw.get("region") if isinstance(raw, dict) else None
    regions = raw.get("regions") if isinstance(raw, dict) else None
    if region is not None and not isinstance(region, str):
        raise MedfmError(f"{path}: 'region' must be a name such as abdomen")
    if regions is not None and not (
        isinstance(regions, dict) and all(isinstance(v, str) for v in regions.values())
    ):
        raise MedfmError(f"{path}: 'regions' must map case ids to region names")
    return region, regions or {}


def load_training_volumes(
    folders: Sequence[str | os.PathLike],
    *,
    modality: str,
    spacing: Sequence[float] | None = None,
    region: str | None = None,
    dims: int = 3,
    labels: bool = False,
) -> list[TrainVolume]:
    """Every volume of ``folders``, resampled to ``spacing`` (mm; None: as stored), mapped to
    [-1, 1] and clipped; ``region`` overrides the folders' own. ``labels``: with each
    volume's label map (nnU-Net raw folders' labelsTr; resampled by nearest neighbour)."""
    out: list[TrainVolume] = []
    for folder in folders:
        set_region, case_regions = _dataset_regions(Path(folder))
        for path in list_volume_files(folder):
            vol = load_volume(path)
            label = _label_of(Path(folder), path, vol) if labels else None
            if vol.ndim != dims or vol.data.shape[0] != 1:
                raise MedfmError(
                    f"{path} is a {vol.ndim}D image with {vol.data.shape[0]} channels; "
                    f"training needs single-channel {dims}D volumes"
                )
            if spacing is not None:
                vol = resample_volume(vol, spacing)
                if label is not None:
                    label = resample_volume(label, spacing, mode="nearest")
            name = _case_name(path)
            reg = region or case_regions.get(name) or set_region
            image = vol.data.float()
            scaled = intensity_map(image, modality, reg).forward(image, clip=True)
            lab = None if label is None else label.data.round().clamp(0, 255).to(torch.uint8)
            out.append(TrainVolume(scaled.to(torch.float16), reg, name, lab))
    return out


def _label_of(folder: Path, image_path: Path, image):
    """The label `Volume` of an nnU-Net raw folder's image file, checked against the image."""
    if image_path.parent.name != "imagesTr":
        raise MedfmError(
            f"--data {folder} has no labels; a mask ControlNet trains on nnU-Net raw folders "
            "(imagesTr + labelsTr)"
        )
    name = image_path.name
    ending = ".nii.gz" if name.lower().endswith(".nii.gz") else ".nii"
    path = folder / "labelsTr" / (_case_name(image_path) + ending)
    if not path.is_file():
        raise MedfmError(f"{image_path} has no label {path}; every case needs one")
    label = load_volume(path)
    if tuple(label.data.shape) != tuple(image.data.shape):
        raise MedfmError(
            f"{path} has shape {tuple(label.data.shape)}, its image "
            f"{tuple(image.data.shape)}; a label lies on its image's grid"
        )
    return label


def _resize(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(C, *S) -> (C, *shape), (tri)linear, antialiased by area averaging when shrinking."""
    mode = "trilinear" if x.ndim == 4 else "bilinear"
    if all(s >= t for s, t in zip(x.shape[1:], shape, strict=True)):
        return F.adaptive_avg_pool3d(x, shape) if x.ndim == 4 else F.adaptive_avg_pool2d(x, shape)
    return F.interpolate(x[None], size=tuple(shape), mode=mode, align_corners=False)[0]


def _crop(
    x: torch.Tensor, size: Sequence[int], generator: torch.Generator
) -> tuple[torch.Tensor, list[int]]:
    """A crop of ``size`` at a random start (negative where the volume is smaller: padded
    with -1); returns it and its start."""
    starts = []
    for n, c in zip(x.shape[1:], size, strict=True):
        lo, hi = min(0, n - c), max(0, n - c)
        starts.append(int(torch.randint(lo, hi + 1, (1,), generator=generator)))
    pads = []
    for n, c, s in zip(reversed(x.shape[1:]), reversed(size), reversed(starts), strict=True):
        pads += [max(0, -s), max(0, s + c - n)]
    if any(pads):
        x = F.pad(x, pads, value=-1.0)
    sl = tuple(slice(max(0, s), max(0, s) + c) for s, c in zip(starts, size, strict=True))
    return x[(slice(None), *sl)], starts


def sample_patch(
    image: torch.Tensor, patch: Sequence[int], kind: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(patch (C, *patch) float32, box (dims, 2)) of ``image`` (C, *S) by ``kind``."""
    x = image.float()
    shape, patch = tuple(x.shape[1:]), tuple(patch)
    if kind == "whole":
        return _resize(x, patch), whole_box(1, len(patch))[0]
    size = tuple(2 * p for p in patch) if kind == "zoom" else patch
    if kind not in PATCH_KINDS:
        raise ValueError(f"unknown patch kind {kind!r}")
    crop, starts = _crop(x, size, generator)
    return _resize(crop, patch), crop_box(starts, size, shape)


def draw_patches(
    sources: Sequence[Sequence[TrainVolume]],
    patch: Sequence[int],
    batch: int,
    generator: torch.Generator,
    kinds: Sequence[float] = (1.0, 1.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor, list[str | None]]:
    """``batch`` patches (B, 1, *patch), their boxes (B, dims, 2) and regions: each a source
    drawn uniformly, a volume of it uniformly, a patch kind by the weights ``kinds``
    (whole, zoom, crop)."""
    images, boxes, regions, _ = draw_labelled_patches(sources, patch, batch, generator, kinds)
    return images, boxes, regions


def draw_labelled_patches(
    sources: Sequence[Sequence[TrainVolume]],
    patch: Sequence[int],
    batch: int,
    generator: torch.Generator,
    kinds: Sequence[float] = (1.0, 1.0, 1.0),
    labels: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, list[str | None], torch.Tensor | None]:
    """`draw_patches`, and with ``labels`` K > 0 each patch's one-hot labels 1..K (B, K,
    *patch) (0 or 1; resized with the image, then thresholded at one half); labels above K
    count as K."""
    weights = torch.tensor(kinds, dtype=torch.float64)
    images, boxes, regions, onehots = [], [], [], []
    for _ in range(batch):
        src = sources[int(torch.randint(len(sources), (1,), generator=generator))]
        vol = src[int(torch.randint(len(src), (1,), generator=generator))]
        kind = PATCH_KINDS[int(torch.multinomial(weights, 1, generator=generator))]
        x = vol.image
        if labels:
            if vol.label is None:
                raise MedfmError(f"volume {vol.name} has no label map")
            lab = vol.label.long().clamp(max=labels)
            values = torch.arange(1, labels + 1).view(labels, *[1] * (lab.ndim - 1))
            x = torch.cat([x.float(), (lab == values).float()])
        img, box = sample_patch(x, patch, kind, generator)
        images.append(img[:1])
        onehots.append((img[1:] > 0.5).float())
        boxes.append(box)
        regions.append(vol.region)
    onehot = torch.stack(onehots) if labels else None
    return torch.stack(images), torch.stack(boxes), regions, onehot
