"""`DiffusionModel`: MONAI's ``DiffusionModelUNet`` with MedDiff-FM's inputs (the position
embedding as extra channels, the region as a class embedding), saved diffusers-style as
``config.json`` + ``model.safetensors``.

A ControlNet (MONAI's, next to this model) feeds ``down_block_additional_residuals`` and
``mid_block_additional_residual``: `forward` passes them through, and `unet_kwargs` gives the
architecture a ControlNet copies.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from medfm.diffusion.config import DiffusionConfig
from medfm.diffusion.position import position_embedding, whole_box
from medfm.errors import MedfmError
from medfm.io.weights import (
    CONFIG_NAME,
    read_checked_weights,
    read_config_json,
    read_family_config,
    save_weights,
)

__all__ = ["DiffusionModel", "is_diffusion_folder"]


class DiffusionModel(nn.Module):
    """The noise predictor eps(x_t, t | position, region) of one `DiffusionConfig`."""

    def __init__(self, config: DiffusionConfig) -> None:
        super().__init__()
        self.config = config
        self.unet = DiffusionModelUNet(**self.unet_kwargs(config))
        #: the sha256 of the weights file it was loaded from (None: not loaded from a file);
        #: a ControlNet records its base's and is refused with any other
        self.weights_sha256: str | None = None
        self.source: str | None = None

    @staticmethod
    def unet_kwargs(config: DiffusionConfig) -> dict:
        """The arguments of MONAI's DiffusionModelUNet (and ControlNet) for ``config``."""
        u = config.unet
        return {
            "spatial_dims": u.spatial_dims,
            "in_channels": u.image_channels + u.position_channels,
            "out_channels": u.image_channels,
            "num_res_blocks": u.num_res_blocks,
            "channels": u.channels,
            "attention_levels": u.attention_levels,
            "norm_num_groups": u.norm_num_groups,
            "num_head_channels": u.num_head_channels,
            "num_class_embeds": len(u.regions) or None,
        }

    def enable_checkpointing(self) -> None:
        """Recompute each UNet block's activations in the backward pass instead of keeping
        them (activation checkpointing: far less memory for a 128^3 patch, ~30% more time)."""
        from torch.utils.checkpoint import checkpoint

        u = self.unet
        for block in [*u.down_blocks, u.middle_block, *u.up_blocks]:
            if getattr(block, "_medfm_checkpointed", False):
                continue
            inner = block.forward

            def forward(*args, _inner=inner, **kwargs):
                if torch.is_grad_enabled() and self.training:
                    return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
                return _inner(*args, **kwargs)

            block.forward = forward
            block._medfm_checkpointed = True

    def region_index(self, region: str | None) -> int | None:
        """The class index of a region name; None (no region given) is "other" when the model
        knows it. MedfmError for a name the model does not know."""
        regions = self.config.unet.regions
        if not regions:
            return None
        if region is None:
            region = "other" if "other" in regions else None
            if region is None:
                raise MedfmError(f"give a region: one of {', '.join(regions)}")
        if region not in regions:
            raise MedfmError(f"unknown region {region!r}; this model knows {', '.join(regions)}")
        return regions.index(region)

    def positions(
        self, boxes: torch.Tensor, shape: tuple[int, ...], *, like: torch.Tensor
    ) -> torch.Tensor:
        """The position channels (B, P, *shape) of patches covering ``boxes`` (B, dims, 2), on
        ``like``'s device and dtype."""
        pos = position_embedding(
            boxes.to(like.device, like.dtype), shape, self.config.unet.pos_frequencies
        )
        return pos

    def model_inputs(
        self,
        x: torch.Tensor,
        boxes: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` (B, C, *patch) with its position channels appended: ``positions`` (B, P,
        *patch) as given, else those of ``boxes`` (B, dims, 2), else of whole volumes."""
        if positions is None:
            if boxes is None:
                boxes = whole_box(x.shape[0], self.config.unet.spatial_dims, x.device)
            positions = self.positions(boxes, tuple(x.shape[2:]), like=x)
        return torch.cat([x, positions.to(x.dtype)], dim=1)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        *,
        boxes: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        regions: torch.Tensor | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The predicted noise (B, C, *patch) of ``x`` (B, C, *patch) at ``timesteps`` (B,)
        for patches covering ``boxes`` (B, dims, 2) (or with their precomputed ``positions``,
        `model_inputs`) of regions ``regions`` (B,) (class indices; None: "other" or none)."""
        if regions is None and self.config.unet.regions:
            regions = torch.full(
                (x.shape[0],), self.region_index(None), dtype=torch.long, device=x.device
            )
        return self.unet(
            self.model_inputs(x, boxes, positions),
            timesteps,
            class_labels=regions,
            down_block_additional_residuals=down_block_additional_residuals,
            mid_block_additional_residual=mid_block_additional_residual,
        )

    def save_pretrained(
        self, folder: str | os.PathLike, *, dtype: torch.dtype | None = None
    ) -> Path:
        """Write ``folder/config.json`` + ``folder/model.safetensors`` (atomically, weights
        first), the floating-point weights in ``dtype`` (None: as they are; the bundled model
        ships in float16 and is loaded back in float32); returns the folder."""
        from medfm import __version__

        config = self.config.model_copy(update={"medfm_version": __version__})
        meta = {"format": "pt", "family": config.family}
        state = {
            k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
            for k, v in self.state_dict().items()
        }
        return save_weights(folder, state, config.model_dump(mode="json"), metadata=meta)

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, *, device: torch.device | str = "cpu"
    ) -> DiffusionModel:
        """The model (eval mode) of a folder written by `save_pretrained`. The architecture is
        checked against the weights' shapes before any layer is allocated."""
        config = read_diffusion_config(folder)
        state, sha = read_checked_weights(
            folder, lambda: cls(config), what=f"the architecture of {Path(folder) / CONFIG_NAME}",
            hint="config.json and the weights are not of one model",
        )  # fmt: skip
        model = cls(config)
        model.load_state_dict(state)  # float16 weights are cast to the model's float32
        model.weights_sha256 = sha
        model.source = str(folder)
        return model.to(device).eval()


def is_diffusion_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a diffusion model's config.json (a cheap look, no validation)."""
    try:
        return read_config_json(folder).get("family") == "medfm-diffusion"
    except MedfmError:
        return False


def read_diffusion_config(folder: str | os.PathLike) -> DiffusionConfig:
    """The validated `DiffusionConfig` of a model folder; one-line MedfmError otherwise."""
    return read_family_config(
        folder, "medfm-diffusion", DiffusionConfig, "medfm diffusion model",
        "give a diffusion run or model folder",
    )  # fmt: skip
