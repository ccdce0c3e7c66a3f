"""A segmentation model folder's config.json as one pydantic model, `SegModelConfig`.

Who writes which keys:

- `medfm.seg.models.save_pretrained`: ``model`` (a name of ``SEG_MODELS``), ``spec`` (the
  `SamSpec` fields of a ViT model, null for medfm-tiny), ``medfm_version``;
- training (`medfm.seg.train`): ``base_checkpoint``, ``trained`` (the trained parameter
  prefixes), ``train_config`` (the run's TrainConfig as JSON);
- averaging (`medfm.seg.average`): ``averaged_from`` (each source's folder, base checkpoint and
  training config) and ``multimask_clicks``;
- calibration (`medfm.seg.calibrate`): ``mask_thresholds``, ``box_crop`` and ``calibration``.

Keys it does not know are kept as they are (``extra="allow"``): a folder written by a newer
medfm still loads, and rewriting config.json (calibration) never drops what another writer put
there. A key that a folder lacks stays absent when the config is written back.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from medfm.errors import MedfmError, validation_message

__all__ = ["AveragedFrom", "SegModelConfig", "SpecBounds"]


class SpecBounds(BaseModel):
    """The bounds a ``spec`` (the `medfm.seg.models.SamSpec` of a ViT model) must keep before
    anything is built from it: positive sizes, and upper bounds far above any SAM (ViT-H:
    1280 wide, 32 deep, 1024 px) that keep even an empty (meta) build of it quick. That the
    spec fits the folder's weights is checked against the safetensors header
    (`medfm.seg.models.load_pretrained`); these bounds only keep absurd numbers out."""

    model_config = ConfigDict(extra="forbid", strict=True)

    encoder_embed_dim: int = Field(ge=1, le=65536)
    encoder_depth: int = Field(ge=1, le=256)
    encoder_num_heads: int = Field(ge=1, le=4096)
    encoder_global_attn_indexes: list[int] | tuple[int, ...]
    image_size: int = Field(ge=1, le=65536)
    patch_size: int = Field(ge=1, le=65536)
    window_size: int = Field(ge=0, le=65536)
    prompt_embed_dim: int = Field(ge=1, le=65536)

    @model_validator(mode="after")
    def _consistent(self) -> SpecBounds:
        if self.encoder_embed_dim % self.encoder_num_heads:
            raise ValueError(
                f"encoder_embed_dim {self.encoder_embed_dim} is not a multiple of "
                f"encoder_num_heads {self.encoder_num_heads}"
            )
        if self.patch_size > self.image_size:
            raise ValueError(f"patch_size {self.patch_size} exceeds image_size {self.image_size}")
        bad = [i for i in self.encoder_global_attn_indexes if not 0 <= i < self.encoder_depth]
        if bad:
            raise ValueError(
                f"encoder_global_attn_indexes {bad} lie outside the {self.encoder_depth} blocks"
            )
        return self


class AveragedFrom(BaseModel):
    """One source of an averaged model (`medfm.seg.average`)."""

    model_config = ConfigDict(extra="forbid")

    folder: str
    base_checkpoint: str | None = None
    train_config: dict[str, Any] | None = None


class SegModelConfig(BaseModel):
    """config.json of a medfm segmentation model folder (module docstring).

    Written back with `to_json`: the keys the folder had, in the file's order, then the keys
    set since, in the order declared here (unknown keys last).
    """

    model_config = ConfigDict(extra="allow")
    _order: list[str] = PrivateAttr(default_factory=list)

    model: str
    spec: dict[str, Any] | None = None
    medfm_version: str | None = None
    base_checkpoint: str | None = None
    trained: list[str] | None = None
    train_config: dict[str, Any] | None = None
    averaged_from: list[AveragedFrom] | None = None
    multimask_clicks: bool | None = None
    mask_thresholds: dict[str, float] | None = None
    box_crop: bool | None = None
    calibration: dict[str, Any] | None = None

    @field_validator("spec")
    @classmethod
    def _spec(cls, given: dict[str, Any] | None) -> dict[str, Any] | None:
        if given is not None:
            try:
                SpecBounds.model_validate(given)
            except ValidationError as e:
                raise ValueError(f"config.json's spec: {validation_message(e)}") from None
        return given

    @field_validator("mask_thresholds", mode="before")
    @classmethod
    def _numbers(cls, given: object) -> object:
        ok = given is None or (
            isinstance(given, dict)
            and all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                for v in given.values()
            )
        )
        if not ok:
            raise ValueError(
                f"config.json's mask_thresholds must map prompt kinds to numbers, got {given!r}"
            )
        return given

    @field_validator("box_crop", "multimask_clicks", mode="before")
    @classmethod
    def _bool(cls, given: object, info) -> object:
        if given is not None and not isinstance(given, bool):
            raise ValueError(
                f"config.json's {info.field_name} must be true or false, got {given!r}"
            )
        return given

    @classmethod
    def parse(cls, data: dict, path: str | os.PathLike = "config.json") -> SegModelConfig:
        """``data`` (config.json's object) checked; MedfmError in one line naming ``path``."""
        try:
            config = cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(map(str, err["loc"]))
            msg = err["msg"].removeprefix("Value error, ")
            if not msg.startswith("config.json's"):
                msg = f"'{where}' {msg[:1].lower()}{msg[1:]}"
            raise MedfmError(f"{Path(path)}: {msg}") from None
        config._order = list(data)
        return config

    def to_json(self) -> dict:
        """The JSON object to write as config.json (module docstring)."""
        out = self.model_dump(mode="json", exclude_unset=True)
        first = [k for k in self._order if k in out]
        return {k: out[k] for k in first} | {k: v for k, v in out.items() if k not in first}

    def thresholds(self) -> dict[str, float]:
        """The calibrated logit threshold per prompt kind ({} when it has none)."""
        return {k: float(v) for k, v in (self.mask_thresholds or {}).items()}

    def click_multimask(self) -> bool:
        """Whether single clicks get SAM's three outputs: ``multimask_clicks`` (an average of
        models), else what training gave them (``train_config.prompt.multimask``); True when
        neither says."""
        if self.multimask_clicks is not None:
            return self.multimask_clicks
        prompt = (self.train_config or {}).get("prompt") or {}
        return bool(prompt.get("multimask", True))
