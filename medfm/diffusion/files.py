"""Models and volumes as files: which model a ``--model`` names, and a NIfTI volume in the
model's units and back (same grid, same affine, the input's own intensity units).

``--model``: nothing (the bundled ``medfm-diff-tiny``), a training run's folder (its final
``model/``) or a model folder (config.json + model.safetensors).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from medfm.diffusion.intensity import IntensityMap, intensity_map
from medfm.diffusion.model import DiffusionModel, read_diffusion_config
from medfm.errors import MedfmError
from medfm.io import Volume, load_volume, save_volume
from medfm.io.weights import CONFIG_NAME

__all__ = [
    "BUNDLED_CONTROLNETS",
    "BUNDLED_DIFFUSION",
    "BUNDLED_DIR",
    "ScaledVolume",
    "diffusion_model_folder",
    "load_controlnet",
    "load_diffusion_model",
    "read_scaled",
    "write_unscaled",
]

BUNDLED_DIFFUSION = "medfm-diff-tiny"
BUNDLED_DIR = Path(__file__).resolve().parent / "weights" / BUNDLED_DIFFUSION
#: task -> the folder of the ControlNet shipped beside the bundled model for it (if any)
BUNDLED_CONTROLNETS = {
    task: BUNDLED_DIR.parent / f"{BUNDLED_DIFFUSION}-{task}" for task in ("superres", "mask")
}


def diffusion_model_folder(model: str | os.PathLike | None) -> Path:
    """The model folder ``model`` names (None or "medfm-diff-tiny": the bundled one)."""
    if model is None or str(model) == BUNDLED_DIFFUSION:
        if not (BUNDLED_DIR / CONFIG_NAME).is_file():
            raise MedfmError(
                f"the bundled {BUNDLED_DIFFUSION} is not installed with this medfm; "
                "give --model RUN_OR_MODEL_FOLDER"
            )
        return BUNDLED_DIR
    folder = Path(model)
    if (folder / "model" / CONFIG_NAME).is_file():
        folder = folder / "model"
    read_diffusion_config(folder)  # one line for anything that is not a diffusion model
    return folder


def load_diffusion_model(
    model: str | os.PathLike | None = None, *, device: torch.device | str = "cpu"
) -> DiffusionModel:
    """The model (eval mode, on ``device``) that ``model`` names (`diffusion_model_folder`)."""
    return DiffusionModel.from_pretrained(diffusion_model_folder(model), device=device)


def load_controlnet(
    controlnet: str | os.PathLike | None, base: DiffusionModel, task: str, *, required: bool
):
    """The ControlNet ``controlnet`` names on ``base`` for ``task`` (refused in one line for
    another base or task); None: the one shipped for ``task`` when ``base`` is the bundled
    model, else None (``required``: a MedfmError that says to give one)."""
    from medfm.diffusion.controlnet import ControlNet

    if controlnet is None:
        shipped = BUNDLED_CONTROLNETS.get(task)
        bundled = base.source is not None and Path(base.source).resolve() == BUNDLED_DIR
        if bundled and shipped is not None and (shipped / CONFIG_NAME).is_file():
            return ControlNet.from_pretrained(shipped, base, task=task)
        if required:
            raise MedfmError(
                f"give --controlnet: a {task} ControlNet of this model "
                f"(medfm diffusion controlnet-train --task {task})"
            )
        return None
    return ControlNet.from_pretrained(controlnet, base, task=task)


@dataclass
class ScaledVolume:
    """A volume read for a model: the file's `Volume`, its intensity map and ``x`` (1, 1, *S)
    in model units (float32, on the model's device)."""

    volume: Volume
    imap: IntensityMap
    x: torch.Tensor


def read_scaled(
    path: str | os.PathLike,
    model: DiffusionModel,
    *,
    region: str | None = None,
    what: str = "--input",
) -> ScaledVolume:
    """Read a single-channel volume of the model's dimension and map it to model units."""
    vol = load_volume(path)
    dims = model.config.unet.spatial_dims
    if vol.ndim != dims or vol.data.shape[0] != 1:
        kind = f"{vol.ndim}D image with {vol.data.shape[0]} channels"
        raise MedfmError(f"{what} {path} is a {kind}; this model takes single-channel {dims}D")
    data = vol.data.float()
    imap = intensity_map(data, model.config.modality, region)
    device = next(model.parameters()).device
    return ScaledVolume(vol, imap, imap.forward(data)[None].to(device))


def write_unscaled(
    y: torch.Tensor, scaled: ScaledVolume, path: str | os.PathLike, *, units: bool = True
) -> Path:
    """Write ``y`` (1, 1, *S) on the input's grid and affine: mapped back to the input's
    intensity units (``units``), or as it is (maps, masks)."""
    data = scaled.imap.inverse(y[0].cpu()) if units else y[0].cpu().float()
    return save_volume(Volume(data=data, affine=scaled.volume.affine), path)
