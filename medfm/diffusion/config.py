"""A diffusion model's settings: the UNet's sizes, the position embedding, the region classes
and the noise schedule, as one pydantic model that is the model folder's ``config.json``.

Every size is a field (diffusers' habit: the constructor arguments are the config). The
defaults are MedDiff-FM's as far as they are known (arXiv 2410.15432): base channels 32, one
residual block per level, attention only at the coarsest level, a cosine schedule of 1000
steps with the noise as the prediction target.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["DEFAULT_REGIONS", "DiffusionConfig", "ScheduleConfig", "UNetConfig"]

# Anatomical regions known to the class embedding; MRI collections may name their own.
DEFAULT_REGIONS: tuple[str, ...] = ("head-neck", "chest", "abdomen", "other")

# Bounds that keep an untrusted config.json from building a model that cannot fit anywhere.
_MAX_CHANNELS = 2048
_MAX_LEVELS = 6


class UNetConfig(BaseModel):
    """The denoising UNet (MONAI's ``DiffusionModelUNet``) and what is fed to it.

    ``channels[i]``: feature channels at level i (each divisible by ``norm_num_groups``);
    ``attention_levels[i]``: self-attention at level i; ``pos_frequencies``: NeRF sinusoid
    frequencies per axis of the position embedding (0: no position input);
    ``regions``: the names of the region classes (an empty tuple: no class embedding).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    spatial_dims: Literal[2, 3] = 3
    image_channels: int = Field(1, ge=1, le=16)
    channels: tuple[int, ...] = (32, 64, 128, 256)
    attention_levels: tuple[bool, ...] = (False, False, False, True)
    num_res_blocks: int = Field(1, ge=1, le=4)
    num_head_channels: int = Field(32, ge=1, le=_MAX_CHANNELS)
    norm_num_groups: int = Field(32, ge=1, le=_MAX_CHANNELS)
    pos_frequencies: int = Field(4, ge=0, le=16)
    regions: tuple[str, ...] = DEFAULT_REGIONS

    @model_validator(mode="after")
    def _check(self) -> UNetConfig:
        n = len(self.channels)
        if not 1 <= n <= _MAX_LEVELS:
            raise ValueError(f"channels needs 1 to {_MAX_LEVELS} levels, got {n}")
        if len(self.attention_levels) != n:
            raise ValueError(
                f"attention_levels has {len(self.attention_levels)} entries for {n} levels"
            )
        for c in self.channels:
            if not 1 <= c <= _MAX_CHANNELS:
                raise ValueError(f"channels must lie in 1..{_MAX_CHANNELS}, got {c}")
            if c % self.norm_num_groups:
                raise ValueError(f"channels {c} is not divisible by norm_num_groups")
        for c, att in zip(self.channels, self.attention_levels, strict=True):
            if att and c % self.num_head_channels:
                raise ValueError(f"channels {c} is not divisible by num_head_channels")
        if len(set(self.regions)) != len(self.regions):
            raise ValueError("regions must be distinct names")
        return self

    @property
    def downsampling(self) -> int:
        """The factor between the input and the coarsest level: patch sizes divide by it."""
        return 2 ** (len(self.channels) - 1)

    @property
    def position_channels(self) -> int:
        """Input channels the position embedding adds (`medfm.diffusion.position`)."""
        return self.spatial_dims * (2 * self.pos_frequencies + 1) if self.pos_frequencies else 0


class ScheduleConfig(BaseModel):
    """The forward (noising) process, in diffusers' scheduler terms."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_train_timesteps: int = Field(1000, ge=2, le=100_000)
    beta_schedule: Literal["cosine", "linear", "scaled_linear"] = "cosine"
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"


class DiffusionConfig(BaseModel):
    """A diffusion model folder's config.json: what builds the model and how it sees data.

    ``patch``: the training patch (voxels, each axis divisible by the UNet's downsampling);
    ``spacing``: the voxel size (mm) volumes are resampled to, or None to keep theirs;
    ``modality``: how intensities are scaled to [-1, 1] (``medfm.diffusion.intensity``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: Literal["medfm-diffusion"] = "medfm-diffusion"
    unet: UNetConfig = UNetConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    patch: tuple[int, ...] = (64, 64, 64)
    spacing: tuple[float, ...] | None = None
    modality: Literal["ct", "mri"] = "mri"
    medfm_version: str | None = None

    @model_validator(mode="after")
    def _check(self) -> DiffusionConfig:
        d = self.unet.spatial_dims
        if len(self.patch) != d:
            raise ValueError(f"patch has {len(self.patch)} axes for a {d}D model")
        f = self.unet.downsampling
        for p in self.patch:
            if p < f or p % f or p > 1024:
                raise ValueError(f"patch sizes must be multiples of {f} up to 1024, got {p}")
        if self.spacing is not None:
            if len(self.spacing) != d or not all(0 < s < 100 for s in self.spacing):
                raise ValueError(f"spacing must be {d} sizes in mm between 0 and 100")
        return self
