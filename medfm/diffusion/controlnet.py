"""ControlNet on a frozen `DiffusionModel`: MedDiff-FM's fine-tuned tasks (super-resolution,
mask-conditioned generation, guided inpainting).

`ControlNet` wraps MONAI's ``ControlNet``: a trainable copy of the base UNet's time and class
embeddings, input convolution, down blocks and middle block (weights copied from the base),
whose features reach the base's skip connections through zero-initialised 1x1 convolutions,
so an untrained ControlNet leaves the base's output exactly as it was. The condition enters at
full resolution: the embedding has one stage (a 3x3 convolution, SiLU, a zero-initialised
3x3 convolution) instead of MONAI's default 8x downsampling meant for latents.

`Controlled` is the base and a ControlNet as one noise predictor: it takes the condition
(B, K, *patch) beside the sample, windows cut it with the sample (`medfm.diffusion.sampling`),
and every task that takes a `DiffusionModel` takes it.

The conditions (model units, on the sample's grid):

- ``superres``: 2 channels, the low-resolution volume linearly interpolated along the axis
  (corners aligned: slice F*k is input slice k) and the indicator of the kept slices
  (`superres_condition`);
- ``mask``: K channels, the indicator of each label 1..K of a label map (`mask_condition`).

A ControlNet folder is its own: config.json (family ``medfm-controlnet``, the task, the base
model's name and the sha256 of its weights file) and model.safetensors. It is refused, in one
line, with any other base.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.nets import ControlNet as MonaiControlNet
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from medfm.diffusion.config import DiffusionConfig
from medfm.diffusion.model import DiffusionModel
from medfm.errors import MedfmError, validation_message
from medfm.io.weights import (
    CONFIG_NAME,
    read_checked_weights,
    read_config_json,
    read_family_config,
    save_weights,
)

__all__ = [
    "CONTROL_TASKS",
    "ControlNet",
    "ControlNetConfig",
    "Controlled",
    "is_controlnet_folder",
    "mask_condition",
    "superres_condition",
    "superres_shape",
]

CONTROL_TASKS = ("superres", "mask")


class ControlNetConfig(BaseModel):
    """A ControlNet folder's config.json.

    ``task``: ``superres`` or ``mask``; ``labels``: the mask task's label count K (its
    condition channels); ``factor`` / ``axis``: the super-resolution it was trained for (it
    serves other factors too: the condition marks the kept slices); ``base_name`` /
    ``base_sha256``: the base model it was trained on (name for messages, hash for the check).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: Literal["medfm-controlnet"] = "medfm-controlnet"
    task: Literal["superres", "mask"]
    labels: int = Field(1, ge=1, le=64)
    factor: int = Field(4, ge=2, le=16)
    axis: int = Field(2, ge=0, le=2)
    base_name: str
    base_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    medfm_version: str | None = None

    @property
    def condition_channels(self) -> int:
        return 2 if self.task == "superres" else self.labels

    @model_validator(mode="after")
    def _check(self) -> ControlNetConfig:
        if self.task == "superres" and self.labels != 1:
            raise ValueError("labels is for the mask task; superres takes none")
        return self


class ControlNet(nn.Module):
    """MONAI's ControlNet shaped like ``base``'s UNet, taking ``config``'s condition."""

    def __init__(self, config: ControlNetConfig, base: DiffusionConfig) -> None:
        super().__init__()
        self.config = config
        self.base_config = base
        #: the sha256 of the weights file it was loaded from (None: not loaded from a file)
        self.weights_sha256: str | None = None
        kwargs = DiffusionModel.unet_kwargs(base)
        kwargs.pop("out_channels")
        self.net = MonaiControlNet(
            **kwargs,
            conditioning_embedding_in_channels=config.condition_channels,
            conditioning_embedding_num_channels=(base.unet.channels[0],),  # one stage
        )

    @classmethod
    def from_base(cls, base: DiffusionModel, task: str, **settings) -> ControlNet:
        """A new ControlNet for ``base`` (loaded from a folder): the base's encoder weights
        copied, its zero convolutions zero. ``settings``: `ControlNetConfig`'s other fields."""
        if base.weights_sha256 is None:
            raise MedfmError("a ControlNet's base must be loaded from a model folder")
        name = Path(base.source).name if base.source else "base"
        try:
            config = ControlNetConfig(
                task=task, base_name=name, base_sha256=base.weights_sha256, **settings
            )
        except ValidationError as e:
            raise MedfmError(validation_message(e, as_option=True)) from None
        net = cls(config, base.config)
        base_state = base.unet.state_dict()
        own = net.net.state_dict()
        copied = {k: v for k, v in base_state.items() if k in own and own[k].shape == v.shape}
        net.net.load_state_dict(copied, strict=False)
        return net.to(next(base.parameters()).device)

    def forward(
        self,
        inputs: torch.Tensor,
        timesteps: torch.Tensor,
        condition: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        scale: float = 1.0,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The residuals (down blocks, middle block) for the base's UNet, from its ``inputs``
        (the sample with its position channels) and ``condition`` (B, K, *patch)."""
        return self.net(
            inputs, timesteps, condition.to(inputs.dtype), conditioning_scale=scale,
            class_labels=class_labels,
        )  # fmt: skip

    def check_base(self, base: DiffusionModel) -> None:
        """MedfmError unless ``base`` is the model this ControlNet was trained on."""
        _check_base(self.config, base)

    def check_task(self, task: str) -> None:
        """MedfmError unless this ControlNet does ``task``."""
        _check_task(self.config, task)

    def save_pretrained(
        self, folder: str | os.PathLike, *, dtype: torch.dtype | None = None
    ) -> Path:
        """Write config.json + model.safetensors (atomically, weights first)."""
        from medfm import __version__

        config = self.config.model_copy(update={"medfm_version": __version__})
        state = {
            k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
            for k, v in self.state_dict().items()
        }
        meta = {"format": "pt", "family": config.family}
        return save_weights(folder, state, config.model_dump(mode="json"), metadata=meta)

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, base: DiffusionModel, *, task: str | None = None
    ) -> ControlNet:
        """The ControlNet of ``folder`` (or a run folder's ``model/``) on ``base``, on its
        device (eval mode). Refused in one line: another base, or another ``task``."""
        folder = controlnet_folder(folder)
        config = read_controlnet_config(folder)
        _check_base(config, base)
        if task is not None:
            _check_task(config, task)
        state, sha = read_checked_weights(
            folder, lambda: cls(config, base.config),
            what=f"the ControlNet of {folder / CONFIG_NAME} on its base",
            hint="config.json and the weights are not of one ControlNet",
        )  # fmt: skip
        net = cls(config, base.config)
        net.load_state_dict(state)
        net.weights_sha256 = sha
        return net.to(next(base.parameters()).device).eval()


def _check_base(config: ControlNetConfig, base: DiffusionModel) -> None:
    if base.weights_sha256 != config.base_sha256:
        given = Path(base.source).name if base.source else "the model given"
        raise MedfmError(
            f"this ControlNet was trained on {config.base_name} (weights "
            f"{config.base_sha256[:12]}), not on {given} "
            f"({(base.weights_sha256 or 'unsaved')[:12]}); give --model its base"
        )


def _check_task(config: ControlNetConfig, task: str) -> None:
    if config.task != task:
        raise MedfmError(
            f"this ControlNet does the {config.task} task, not {task}; give a {task} "
            f"ControlNet (medfm diffusion controlnet-train --task {task})"
        )


def controlnet_folder(folder: str | os.PathLike) -> Path:
    """A ControlNet model folder, or a training run's ``model/`` inside it."""
    folder = Path(folder)
    if (folder / "model" / CONFIG_NAME).is_file() and not (folder / CONFIG_NAME).is_file():
        folder = folder / "model"
    return folder


def is_controlnet_folder(folder: str | os.PathLike) -> bool:
    try:
        return read_config_json(controlnet_folder(folder)).get("family") == "medfm-controlnet"
    except MedfmError:
        return False


def read_controlnet_config(folder: str | os.PathLike) -> ControlNetConfig:
    return read_family_config(
        folder, "medfm-controlnet", ControlNetConfig, "medfm ControlNet",
        "give one written by medfm diffusion controlnet-train",
    )  # fmt: skip


class Controlled(nn.Module):
    """A base model steered by a ControlNet: the noise predictor the tasks call, with the
    condition windowed beside the sample. ``scale`` multiplies the ControlNet's residuals."""

    def __init__(self, base: DiffusionModel, controlnet: ControlNet, scale: float = 1.0) -> None:
        super().__init__()
        controlnet.check_base(base)
        self.base = base
        self.controlnet = controlnet
        self.scale = scale
        self.config = base.config

    def region_index(self, region: str | None) -> int | None:
        return self.base.region_index(region)

    def positions(self, boxes, shape, *, like):
        return self.base.positions(boxes, shape, like=like)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        *,
        condition: torch.Tensor,
        boxes: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        regions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        base = self.base
        if regions is None and base.config.unet.regions:
            regions = torch.full(
                (x.shape[0],), base.region_index(None), dtype=torch.long, device=x.device
            )
        inputs = base.model_inputs(x, boxes, positions)
        down, mid = self.controlnet(inputs, timesteps, condition, regions, self.scale)
        return base.unet(
            inputs, timesteps, class_labels=regions,
            down_block_additional_residuals=down, mid_block_additional_residual=mid,
        )  # fmt: skip


def superres_shape(n: int, factor: int) -> int:
    """Slices along the axis after super-resolution of ``n`` slices by ``factor``."""
    return factor * (n - 1) + 1


def _check_superres(low: torch.Tensor, factor: int, axis: int) -> int:
    dims = low.ndim - 2
    if not -dims <= axis < dims:
        raise MedfmError(f"--axis {axis} is not an axis of a {dims}D volume (0..{dims - 1})")
    if factor < 2:
        raise MedfmError(f"--factor must be 2 or more, got {factor}")
    axis = axis % dims
    if low.shape[2 + axis] < 2:
        raise MedfmError(
            f"the low-resolution volume has {low.shape[2 + axis]} slice on axis {axis}; "
            "super-resolution needs at least 2 to interpolate between"
        )
    return axis


def superres_condition(low: torch.Tensor, factor: int, axis: int = -1) -> torch.Tensor:
    """The super-resolution condition (B, 2, *S') of ``low`` (B, 1, *S): its linear
    interpolation along ``axis`` to F(n-1)+1 slices (slice F*k = input slice k) and the
    indicator of those kept slices."""
    axis = _check_superres(low, factor, axis)
    n = low.shape[2 + axis]
    m = superres_shape(n, factor)
    moved = low.movedim(2 + axis, -1)
    flat = moved.reshape(-1, 1, n).float()
    up = F.interpolate(flat, size=m, mode="linear", align_corners=True)
    up = up.reshape(*moved.shape[:-1], m).movedim(-1, 2 + axis)
    known = torch.zeros(m, dtype=up.dtype, device=up.device)
    known[::factor] = 1.0
    view = [1] * up.ndim
    view[2 + axis] = m
    known = known.view(view).expand_as(up)
    return torch.cat([up, known], dim=1)


def superres_training_condition(
    x0: torch.Tensor, factor: int, axis: int, generator: torch.Generator
) -> torch.Tensor:
    """The condition (B, 2, *patch) of clean patches ``x0`` (B, 1, *patch) thinned to every
    ``factor``-th slice along ``axis`` from a random phase per patch; outside the first and last
    kept slice the interpolation holds the edge value."""
    b, p = x0.shape[0], x0.shape[2 + axis]
    phases = torch.randint(factor, (b,), generator=generator).tolist()
    conds = []
    idx = torch.arange(p)
    for i, phase in enumerate(phases):
        kept = torch.arange(phase, p, factor)
        k0 = ((idx - phase).div(factor, rounding_mode="floor") * factor + phase).clamp(
            int(kept[0]), int(kept[-1])
        )
        k1 = (k0 + factor).clamp(max=int(kept[-1]))
        w = ((idx - k0).float() / factor).clamp(0, 1)
        w = torch.where(k1 == k0, torch.zeros_like(w), w)
        x = x0[i].movedim(1 + axis, -1)
        up = x[..., k0] * (1 - w) + x[..., k1] * w
        known = torch.zeros(p)
        known[kept] = 1.0
        conds.append(
            torch.cat([up.movedim(-1, 1 + axis), known.expand_as(x).movedim(-1, 1 + axis)])
        )
    return torch.stack(conds)


def mask_condition(mask: torch.Tensor, labels: int) -> torch.Tensor:
    """The mask condition (B, K, *S) of a label map ``mask`` (B, 1, *S): channel k is where the
    label is k + 1. MedfmError for a label above K or below 0."""
    m = mask.round().long()
    top, low = int(m.max()), int(m.min())
    if low < 0 or top > labels:
        raise MedfmError(
            f"the mask holds labels {low}..{top}; this ControlNet knows 0..{labels} (0 background)"
        )
    values = torch.arange(1, labels + 1, device=m.device).view(1, labels, *[1] * (m.ndim - 2))
    return (m == values).float()
