"""The segmentation model zoo: SAM ViT-B/L/H, MedSAM and medfm-tiny, all as segment-anything `Sam`.

Every model is segment-anything's ``Sam(image_encoder, prompt_encoder, mask_decoder)`` built from
segment-anything's own modules; only medfm-tiny brings an image encoder of its own
(`medfm.seg.tiny`: 256x256 input, a 256x64x64 embedding like SAM's). ``SEG_MODELS`` maps each
name to a builder of the randomly initialised architecture; `build_model` adds the weights.

Weights come from two formats (read and written by `medfm.io.weights`):

- official SAM / MedSAM ``.pth`` files (a state dict, read with ``torch.load(weights_only=True)``),
  see `load_sam_checkpoint`;
- medfm's own model folder, ``config.json`` (a `SegModelConfig`) + ``model.safetensors``,
  written by `save_pretrained` and read by `load_pretrained`. medfm writes no pickle here (the
  one exception is `medfm.seg.export`, for segment-anything's loader).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT, PromptEncoder, Sam
from torch import nn

from medfm.errors import MedfmError
from medfm.io.memory import check_memory
from medfm.io.weights import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_shapes,
    few_keys,
    read_config_json,
    read_state_dict,
    safetensors_bytes,
    safetensors_shapes,
    save_weights,
    write_config_json,
)
from medfm.seg.config import SegModelConfig
from medfm.seg.decoder import sam_mask_decoder
from medfm.seg.tiny import build_medfm_tiny

__all__ = [
    "BUNDLED_DIR",
    "SEG_MODELS",
    "VIT_SPECS",
    "SamSpec",
    "SegModelConfig",
    "architecture_shapes",
    "build_architecture",
    "build_model",
    "build_sam_vit",
    "check_pretrained",
    "list_models",
    "load_pretrained",
    "load_sam_checkpoint",
    "model_folder",
    "read_config",
    "read_model_config",
    "run_model_dir",
    "save_pretrained",
    "spec_from_config",
    "spec_of",
    "weights_for",
    "write_model_config",
]

BUNDLED_DIR = Path(__file__).resolve().parent / "weights" / "medfm-tiny"
"""medfm-tiny's weights shipped in the package (config.json + model.safetensors)."""

# --------------------------------------------------------------------------------------------
# SAM ViT models


@dataclass(frozen=True)
class SamSpec:
    """The numbers of a SAM ViT model (those of segment_anything/build_sam.py's ``_build_sam``).

    image_size is the padded square input (px); the embedding is image_size / patch_size wide.
    """

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256


VIT_SPECS: dict[str, SamSpec] = {
    "vit_b": SamSpec(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamSpec(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamSpec(1280, 32, 16, (7, 15, 23, 31)),
}
VIT_SPECS["medsam"] = VIT_SPECS["vit_b"]


def build_sam_vit(spec: SamSpec) -> Sam:
    """A randomly initialised SAM ViT, the same modules, key names and shapes as
    segment-anything's ``_build_sam`` for the official specs (eval mode)."""
    embedding_size = spec.image_size // spec.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=spec.encoder_depth,
            embed_dim=spec.encoder_embed_dim,
            img_size=spec.image_size,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=spec.encoder_num_heads,
            patch_size=spec.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(spec.encoder_global_attn_indexes),
            window_size=spec.window_size,
            out_chans=spec.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=spec.prompt_embed_dim,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(spec.image_size, spec.image_size),
            mask_in_chans=16,
        ),
        mask_decoder=sam_mask_decoder(spec.prompt_embed_dim),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def spec_of(model: Sam) -> SamSpec | None:
    """The SamSpec a SAM ViT model was built from (read off its modules); None for medfm-tiny."""
    enc = model.image_encoder
    if not isinstance(enc, ImageEncoderViT):
        return None
    windows = [blk.window_size for blk in enc.blocks]
    return SamSpec(
        encoder_embed_dim=enc.patch_embed.proj.out_channels,
        encoder_depth=len(enc.blocks),
        encoder_num_heads=enc.blocks[0].attn.num_heads,
        encoder_global_attn_indexes=tuple(i for i, w in enumerate(windows) if w == 0),
        image_size=enc.img_size,
        patch_size=enc.patch_embed.proj.kernel_size[0],
        window_size=next((w for w in windows if w > 0), 0),
        prompt_embed_dim=model.prompt_encoder.embed_dim,
    )


SEG_MODELS: dict[str, Callable[[], Sam]] = {
    "vit_b": partial(build_sam_vit, VIT_SPECS["vit_b"]),
    "vit_l": partial(build_sam_vit, VIT_SPECS["vit_l"]),
    "vit_h": partial(build_sam_vit, VIT_SPECS["vit_h"]),
    "medsam": partial(build_sam_vit, VIT_SPECS["medsam"]),
    "medfm-tiny": build_medfm_tiny,
}


def list_models() -> list[str]:
    """The names of the model zoo (`SEG_MODELS`), sorted."""
    return sorted(SEG_MODELS)


def build_architecture(name: str, spec: SamSpec | None = None) -> Sam:
    """The model ``name`` with its constructors' random weights (nothing loaded)."""
    if name not in SEG_MODELS:
        raise MedfmError(f"unknown model {name!r}; choose one of {', '.join(SEG_MODELS)}")
    if spec is None:
        return SEG_MODELS[name]()
    if name not in VIT_SPECS:
        raise MedfmError(
            f"a SamSpec applies to the ViT models ({', '.join(VIT_SPECS)}), not {name}"
        )
    return build_sam_vit(spec)


def architecture_shapes(name: str, spec: SamSpec | None = None) -> dict[str, torch.Size]:
    """The state dict's tensor shapes of ``build_architecture(name, spec)``, from a build on
    torch's meta device: no memory is allocated and no weight drawn, so an untrusted spec is
    checked against a weights file before the real model is built."""
    with torch.device("meta"):
        model = build_architecture(name, spec)
    return {k: v.shape for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# Reading state dicts and checking them against a model

_OFFICIAL_SIZES = {
    (VIT_SPECS[n].encoder_embed_dim, VIT_SPECS[n].encoder_depth): n
    for n in ("vit_b", "vit_l", "vit_h")  # medsam has vit_b's layout
}
_BLOCK_KEY = re.compile(r"image_encoder\.blocks\.(\d+)\.")
_HINT = "give a SAM / MedSAM .pth or a medfm .safetensors file"


def _describe(state: Mapping[str, tuple[int, ...]]) -> str | None:
    """What kind of model a state dict is from (given by its tensors' shapes), in words; None
    without an image encoder."""
    patch = state.get("image_encoder.patch_embed.proj.weight")
    if patch is not None and len(patch) == 4:
        embed = int(patch[0])
        depth = len({m.group(1) for k in state if (m := _BLOCK_KEY.match(k))})
        official = _OFFICIAL_SIZES.get((embed, depth))
        what = f"a {official} SAM checkpoint" if official else "a SAM ViT checkpoint"
        return f"{what} (embed {embed}, {depth} blocks)"
    if any(k.startswith("image_encoder.stem.") for k in state):
        return "a medfm-tiny checkpoint"
    if any(k.startswith("image_encoder.") for k in state):
        return "a checkpoint with an image encoder medfm does not know"
    return None


def _check_fits(
    own: Mapping[str, tuple[int, ...]],
    state: Mapping[str, tuple[int, ...]],
    path: Path | str,
    expected: str,
) -> None:
    """Refuse a checkpoint whose tensors (``state``: name -> shape) are not those of the model
    (``own``: name -> shape), naming what the checkpoint is."""
    got, want = _describe(state), _describe(own)
    if got is not None and want is not None and got != want:
        size = want[want.find("(") :] if "(" in want else ""
        raise MedfmError(
            f"checkpoint {path} is {got} but --model {expected} was asked for {size}".rstrip()
            + "; pass the --model that matches the checkpoint"
        )
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({few_keys(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({few_keys(unexpected)})")
        raise MedfmError(
            f"checkpoint {path} does not fit model {expected}: keys {'; '.join(parts)}; "
            "is it a checkpoint of this model?"
        )
    wrong = [k for k, v in own.items() if tuple(state[k]) != tuple(v)]
    if wrong:
        k = wrong[0]
        raise MedfmError(
            f"checkpoint {path} does not fit model {expected}: {len(wrong)} tensors have other "
            f"shapes, e.g. {k} {tuple(state[k])} where the model has {tuple(own[k])}"
        )


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _load_checked(
    model: Sam, state: dict[str, torch.Tensor], path: Path | str, expected: str
) -> None:
    """Load ``state`` into ``model`` after checking that it is a checkpoint of this model."""
    _check_fits(_shapes(model.state_dict()), _shapes(state), path, expected)
    model.load_state_dict(state)


def load_sam_checkpoint(model: Sam, path: str | os.PathLike, expected: str) -> None:
    """Load an official SAM / MedSAM ``.pth`` (or a medfm ``.safetensors`` / model folder) into
    ``model``, in place.

    The file is read with ``torch.load(map_location="cpu", weights_only=True)``; a state dict
    nested under "model" or "state_dict" and a "module." prefix (DDP) are accepted. ``expected``
    is the model name asked for, used in the messages. A missing, corrupt or unreadable file, a
    checkpoint of another model (told apart by its patch embedding width and block count) and
    missing / unexpected keys or other shapes raise MedfmError. A .safetensors file is checked
    from its header before any tensor is read; a .pth is memory-mapped, so a huge or foreign
    one costs nothing before it is refused.
    """
    file = Path(path) / WEIGHTS_NAME if Path(path).is_dir() else Path(path)
    if file.suffix == ".safetensors" and file.is_file():
        _check_fits(_shapes(model.state_dict()), safetensors_shapes(file), path, expected)
    _load_checked(model, read_state_dict(path, hint=_HINT), path, expected)


# --------------------------------------------------------------------------------------------
# medfm's own format and the model entry point


def _medfm_version() -> str:
    from medfm import __version__

    return __version__


def save_pretrained(
    model: Sam,
    folder: str | os.PathLike,
    *,
    name: str,
    extra: Mapping | SegModelConfig | None = None,
) -> Path:
    """Write ``folder/config.json`` and ``folder/model.safetensors`` (each atomically, the weights
    first, so a folder with a config.json is complete).

    config.json is a `SegModelConfig`: ``model`` = name, ``spec`` = the SamSpec fields (ViT
    models) or null, ``medfm_version``, then ``extra`` (a dict of its keys, or a SegModelConfig),
    which may repeat the first three but not change them. Returns the folder.
    """
    if name not in SEG_MODELS:
        raise MedfmError(f"unknown model {name!r}; choose one of {', '.join(SEG_MODELS)}")
    spec = spec_of(model)
    if (spec is not None) != (name in VIT_SPECS):
        kind = "a SAM ViT" if spec is not None else "a medfm-tiny"
        raise MedfmError(f"cannot save {kind} model under the name {name}; pass its own name")
    own = {"model": name, "spec": asdict(spec) if spec else None}
    own["medfm_version"] = _medfm_version()
    if isinstance(extra, SegModelConfig):
        extra = extra.to_json()
    clash = sorted(k for k, v in (extra or {}).items() if k in own and v != own[k])
    if clash:
        raise MedfmError(f"extra config keys {clash} would overwrite medfm's own; rename them")
    config = SegModelConfig.parse({**own, **(extra or {})}, Path(folder) / CONFIG_NAME)
    metadata = {"format": "pt", "model": name}
    return save_weights(folder, model.state_dict(), config.to_json(), metadata=metadata)


def read_model_config(folder: str | os.PathLike) -> SegModelConfig:
    """The config.json of a medfm model folder, checked: a known ``model``, a ``spec`` that is
    null or has the `SamSpec` fields, and the types of every key `SegModelConfig` knows."""
    path = Path(folder) / CONFIG_NAME
    raw = read_config_json(folder)
    if raw.get("model") not in SEG_MODELS:
        got = raw.get("model")
        raise MedfmError(f"{path} names model {got!r}; expected one of {', '.join(SEG_MODELS)}")
    spec = raw.get("spec")
    if spec is not None:
        names = {f.name for f in fields(SamSpec)}
        if not isinstance(spec, dict) or set(spec) != names:
            raise MedfmError(f"{path}: 'spec' must be null or have the fields {sorted(names)}")
    return SegModelConfig.parse(raw, path)


def write_model_config(folder: str | os.PathLike, config: SegModelConfig) -> Path:
    """Rewrite ``folder/config.json`` from ``config`` (atomically); returns its path."""
    return write_config_json(folder, config.to_json())


def read_config(folder: str | os.PathLike) -> dict:
    """`read_model_config` as the JSON object of config.json (for callers that rewrite it)."""
    return read_model_config(folder).to_json()


def run_model_dir(path: str | os.PathLike) -> Path:
    """A training run's folder -> its final model folder (``model/``); any other path as is."""
    folder = Path(path)
    return folder / "model" if (folder / "model" / CONFIG_NAME).is_file() else folder


def model_folder(model: str | os.PathLike, *, purpose: str) -> Path:
    """A medfm model folder (config.json + model.safetensors), or a training run's folder (its
    final ``model/``) -> that model folder. ``purpose`` ends the error for anything else (what
    the caller does with the folder)."""
    folder = run_model_dir(model)
    if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise MedfmError(
            f"{model} is not a medfm model folder (config.json + model.safetensors) or a "
            f"training run's folder; {purpose}"
        )
    return folder


def spec_from_config(config: SegModelConfig) -> SamSpec | None:
    """The SamSpec recorded in a config (None for medfm-tiny)."""
    spec = config.spec
    if spec is None:
        return None
    spec = dict(spec, encoder_global_attn_indexes=tuple(spec["encoder_global_attn_indexes"]))
    return SamSpec(**spec)


def check_pretrained(folder: str | os.PathLike) -> tuple[SegModelConfig, SamSpec | None, int]:
    """A model folder checked before anything is built from it: its config.json (bounds of
    `SegModelConfig`), and the architecture that config describes against the tensor shapes
    in the weights file's header (an untrusted config.json cannot make medfm build a model of
    any size). Returns (config, spec, the bytes building and loading the model takes)."""
    folder = Path(folder)
    config = read_model_config(folder)
    try:
        spec = spec_from_config(config)
        shapes = architecture_shapes(config.model, spec)
    except (TypeError, ValueError) as e:
        if isinstance(e, MedfmError):
            raise
        raise MedfmError(f"{folder / CONFIG_NAME}: bad 'spec' ({e})") from None
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise MedfmError(
            f"{folder} is a folder without {WEIGHTS_NAME}; give a medfm model folder "
            f"({CONFIG_NAME} + {WEIGHTS_NAME})"
        )
    check_shapes(
        shapes,
        weights,
        what=f"the architecture of {folder / CONFIG_NAME}",
        hint=f"{CONFIG_NAME} and the weights are not of one model; restore the {CONFIG_NAME} "
        "written with them",
    )
    model_bytes = sum(4 * int(torch.Size(s).numel()) for s in shapes.values())
    return config, spec, model_bytes + safetensors_bytes(weights)


def load_pretrained(folder: str | os.PathLike) -> tuple[Sam, SegModelConfig]:
    """(model in eval mode, its config) from a folder written by `save_pretrained`; checked
    with `check_pretrained` and `medfm.io.check_memory` before the model is built."""
    config, spec, nbytes = check_pretrained(folder)
    name = config.model
    check_memory(
        nbytes, f"loading the model {folder}", hint="load it on a machine with more memory"
    )
    model = build_architecture(name, spec)
    state = read_state_dict(folder, hint=_HINT)
    _load_checked(model, state, Path(folder) / WEIGHTS_NAME, name)
    return model.eval(), config


def weights_for(name: str, checkpoint: str | os.PathLike | None) -> str | os.PathLike | None:
    """Where the weights of model ``name`` come from: ``checkpoint``, or for medfm-tiny without
    one the folder bundled in the package (`BUNDLED_DIR`) when it is there; None: random."""
    if checkpoint is None and name == "medfm-tiny" and (BUNDLED_DIR / WEIGHTS_NAME).is_file():
        return BUNDLED_DIR
    return checkpoint


def build_model(
    name: str, checkpoint: str | os.PathLike | None = None, *, spec: SamSpec | None = None
) -> Sam:
    """The model ``name`` of `SEG_MODELS` in eval mode, with weights from ``checkpoint``.

    - ViT models (vit_b, vit_l, vit_h, medsam): built from ``spec`` (default ``VIT_SPECS[name]``);
      ``checkpoint`` is an official .pth (or a medfm .safetensors / model folder); without one
      the weights are random (for benchmarks and tests).
    - medfm-tiny: ``checkpoint`` is a medfm model folder or .safetensors file; without one, the
      weights bundled in the package (`BUNDLED_DIR`), or random ones with a warning when the
      package has none.
    """
    model = build_architecture(name, spec)
    checkpoint = weights_for(name, checkpoint)
    if checkpoint is None and name == "medfm-tiny":
        warnings.warn(
            f"medfm-tiny has no bundled weights ({BUNDLED_DIR} is missing): the model is "
            "randomly initialised; train one (medfm run recipes/medfm_tiny.yaml) or pass a "
            "checkpoint",
            stacklevel=2,
        )
    if checkpoint is not None:
        load_sam_checkpoint(model, checkpoint, name)
    return model.eval()
