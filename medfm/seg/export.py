"""Export to segment-anything's own checkpoint format, so its tools load medfm's models.

``export_sam_checkpoint`` writes what ``segment_anything.sam_model_registry[name](checkpoint=)``
reads: ``torch.save`` of the model's state dict (a plain dict of tensors, the layout of
``sam_vit_b_01ec64.pth``). This is the one pickle medfm writes, because segment-anything's loader
only reads that format; it holds tensors only, so ``torch.load(weights_only=True)`` reads it back.
Only the ViT models export: segment-anything has no builder for medfm-tiny.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT, Sam

from medfm.errors import MedfmError
from medfm.io.atomic import atomic_path
from medfm.seg.config import SegModelConfig
from medfm.seg.models import VIT_SPECS, load_pretrained, spec_of

__all__ = ["EXPORT_ENDINGS", "export_notes", "export_run", "export_sam_checkpoint", "official_name"]

EXPORT_ENDINGS = (".pth", ".pt")
"""The names segment-anything's checkpoints go by."""


def export_sam_checkpoint(model: Sam, path: str | os.PathLike) -> Path:
    """Write ``model``'s state dict to ``path`` (atomically) in segment-anything's .pth format.

    ``sam_model_registry[name](checkpoint=path)`` loads it when the model has an official size
    (vit_b / medsam, vit_l, vit_h); a model built from another `SamSpec` loads into a ``Sam``
    built with the same numbers. Returns the path.
    """
    if not isinstance(model.image_encoder, ImageEncoderViT):
        raise MedfmError(
            "only the SAM ViT models (vit_b, vit_l, vit_h, medsam) export to segment-anything's "
            "format; it has no builder for medfm-tiny, which stays a medfm model folder"
        )
    path = Path(path)
    if path.is_dir():
        raise MedfmError(f"{path} is a folder; give the .pth file to write, e.g. {path}/sam.pth")
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def official_name(model: Sam) -> str | None:
    """The sam_model_registry key that builds ``model``'s architecture, or None."""
    spec = spec_of(model)
    for name in ("vit_b", "vit_l", "vit_h"):
        if spec == VIT_SPECS[name]:
            return name
    return None


def export_run(model_dir: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Export a medfm model folder (config.json + model.safetensors, e.g. a training run) to
    segment-anything's .pth format at ``out_path``; returns the path."""
    model, config = load_pretrained(model_dir)
    if not isinstance(model.image_encoder, ImageEncoderViT):
        raise MedfmError(
            f"{model_dir} holds a {config.model} model; only the SAM ViT models (vit_b, vit_l, "
            "vit_h, medsam) export to segment-anything's format"
        )
    return export_sam_checkpoint(model, out_path)


def export_notes(config: SegModelConfig | dict) -> list[str]:
    """What a medfm model folder's config.json adds to its weights, which a .pth cannot carry
    (segment-anything's ``SamPredictor`` then predicts with the weights alone). ``config``: a
    `SegModelConfig`, or config.json's object (`medfm.seg.models.read_config`)."""
    if isinstance(config, dict):
        config = SegModelConfig.parse(config)
    notes = ["medfm's pixel-exact prompt mapping (SamPredictor: x * scale)"]
    if config.mask_thresholds:
        notes.append(f"the calibrated mask thresholds {config.mask_thresholds} (SamPredictor: 0)")
    if config.box_crop:
        notes.append("box masks cropped to their box (SamPredictor: uncropped)")
    return notes
