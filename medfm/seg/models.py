"""The segmentation model zoo: SAM ViT-B/L/H, MedSAM and medfm-tiny, all as segment-anything `Sam`.

Every model is segment-anything's ``Sam(image_encoder, prompt_encoder, mask_decoder)`` built from
segment-anything's own modules; only medfm-tiny brings an image encoder of its own
(`TinyImageEncoder`, 256x256 input, a 256x64x64 embedding like SAM's). ``SEG_MODELS`` maps each
name to a builder of the randomly initialised architecture; `build_model` adds the weights.

Weights come from two formats:

- official SAM / MedSAM ``.pth`` files (a state dict, read with ``torch.load(weights_only=True)``),
  see `load_sam_checkpoint`;
- medfm's own model folder, ``config.json`` + ``model.safetensors``, written by `save_pretrained`
  and read by `load_pretrained`. medfm writes no pickle here (the one exception is
  `medfm.seg.export`, for segment-anything's loader).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from medfm.errors import MedfmError
from medfm.io.atomic import atomic_path, atomic_write_text
from medfm.seg.fused import fused_forward, use_fused

__all__ = [
    "BUNDLED_DIR",
    "SEG_MODELS",
    "VIT_SPECS",
    "SamSpec",
    "TinyImageEncoder",
    "build_architecture",
    "build_medfm_tiny",
    "build_model",
    "build_sam_vit",
    "load_pretrained",
    "load_sam_checkpoint",
    "model_folder",
    "read_config",
    "run_model_dir",
    "save_pretrained",
    "spec_of",
    "weights_for",
]

BUNDLED_DIR = Path(__file__).resolve().parent / "weights" / "medfm-tiny"
"""medfm-tiny's weights shipped in the package (config.json + model.safetensors)."""

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


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
        mask_decoder=_sam_mask_decoder(spec.prompt_embed_dim),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def _sam_mask_decoder(dim: int = 256) -> MaskDecoder:
    return MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=2048, num_heads=8),
        transformer_dim=dim,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )


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


# --------------------------------------------------------------------------------------------
# medfm-tiny


def _conv_bn_act(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU()
    )


class _ResBlock(nn.Module):
    """x + pw(gelu(pw(bn(depthwise 3x3 conv, dilated)))): a MobileNet/ConvNeXt-style block."""

    def __init__(self, channels: int, dilation: int = 1, ratio: int = 2) -> None:
        super().__init__()
        self.dw = nn.Conv2d(
            channels, channels, 3, padding=dilation, dilation=dilation, groups=channels, bias=False
        )
        self.norm = nn.BatchNorm2d(channels)
        self.pw1 = nn.Conv2d(channels, channels * ratio, 1)
        self.act = nn.GELU()
        self.pw2 = nn.Conv2d(channels * ratio, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pw2(self.act(self.pw1(self.norm(self.dw(x)))))


class _GlobalAttention(nn.Module):
    """One pre-norm transformer layer over all positions of a BxCxHxW map (global context)."""

    def __init__(self, channels: int, num_heads: int = 8) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            channels,
            num_heads,
            dim_feedforward=2 * channels,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.layer(x.flatten(2).transpose(1, 2))  # B x HW x C
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class TinyImageEncoder(nn.Module):
    """medfm-tiny's image encoder: Bx3x256x256 normalised image -> Bx256x64x64 embedding.

    A small CNN with a feature pyramid: a strided stem to 64x64, depthwise-separable residual
    blocks at 64x64 (64 channels), 32x32 (128) and 16x16 (192, dilations 1, 2, 4, 8, then one
    global self-attention layer over the 256 positions), merged top-down onto 64x64 and finished
    by a neck like SAM's (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) to 256 channels.
    About 2.1 M parameters. On the CPU, in eval mode without gradients, it runs
    `medfm.seg.fused`'s folded weights (BatchNorm into convolutions, the neck's LayerNorm into
    its 3x3 conv): ~50 ms per image on 2 CPU threads of an AVX2 machine, where the modules take
    ~85 ms. ``img_size`` is read by ``Sam.preprocess`` (pads to it) and ``ResizeLongestSide``.
    """

    img_size = 256
    fused = True  # False: always run the modules (see medfm.seg.fused)

    def __init__(self, widths: tuple[int, int, int, int] = (32, 64, 128, 192)) -> None:
        super().__init__()
        w0, w1, w2, w3 = widths
        fuse = 128
        self.stem = nn.Sequential(_conv_bn_act(3, w0, 2), _conv_bn_act(w0, w1, 2))  # 64x64
        self.stage1 = nn.Sequential(_ResBlock(w1), _ResBlock(w1))
        self.down2 = _conv_bn_act(w1, w2, 2)  # 32x32
        self.stage2 = nn.Sequential(_ResBlock(w2), _ResBlock(w2))
        self.down3 = _conv_bn_act(w2, w3, 2)  # 16x16
        self.stage3 = nn.Sequential(*[_ResBlock(w3, dilation=d) for d in (1, 2, 4, 8)])
        self.context = _GlobalAttention(w3)
        self.lateral = nn.ModuleList([nn.Conv2d(c, fuse, 1) for c in (w1, w2, w3)])
        self.neck = nn.Sequential(
            nn.Conv2d(fuse, 256, kernel_size=1, bias=False),
            LayerNorm2d(256),
            nn.Conv2d(256, 256, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(256),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x Bx3x256x256 (normalised, padded) -> Bx256x64x64."""
        if use_fused(self, x):
            return fused_forward(self, x)
        f1 = self.stage1(self.stem(x))
        f2 = self.stage2(self.down2(f1))
        f3 = self.context(self.stage3(self.down3(f2)))
        y = self.lateral[2](f3)
        for feat, lateral in ((f2, self.lateral[1]), (f1, self.lateral[0])):
            y = lateral(feat) + F.interpolate(y, size=feat.shape[-2:], mode="nearest")
        return self.neck(y)


def build_medfm_tiny() -> Sam:
    """medfm-tiny, randomly initialised: TinyImageEncoder + SAM's prompt encoder and mask decoder
    at a 256x256 input (64x64 embedding, 256x256 low-resolution masks), eval mode."""
    sam = Sam(
        image_encoder=TinyImageEncoder(),
        prompt_encoder=PromptEncoder(
            embed_dim=256,
            image_embedding_size=(64, 64),
            input_image_size=(256, 256),
            mask_in_chans=16,
        ),
        mask_decoder=_sam_mask_decoder(256),
    )
    return sam.eval()


SEG_MODELS: dict[str, Callable[[], Sam]] = {
    "vit_b": partial(build_sam_vit, VIT_SPECS["vit_b"]),
    "vit_l": partial(build_sam_vit, VIT_SPECS["vit_l"]),
    "vit_h": partial(build_sam_vit, VIT_SPECS["vit_h"]),
    "medsam": partial(build_sam_vit, VIT_SPECS["medsam"]),
    "medfm-tiny": build_medfm_tiny,
}


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


# --------------------------------------------------------------------------------------------
# Reading state dicts and checking them against a model

_OFFICIAL_SIZES = {
    (VIT_SPECS[n].encoder_embed_dim, VIT_SPECS[n].encoder_depth): n
    for n in ("vit_b", "vit_l", "vit_h")  # medsam has vit_b's layout
}
_BLOCK_KEY = re.compile(r"image_encoder\.blocks\.(\d+)\.")
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _describe(state: dict[str, torch.Tensor]) -> str | None:
    """What kind of model a state dict is from, in words; None without an image encoder."""
    patch = state.get("image_encoder.patch_embed.proj.weight")
    if patch is not None and patch.ndim == 4:
        embed = int(patch.shape[0])
        depth = len({m.group(1) for k in state if (m := _BLOCK_KEY.match(k))})
        official = _OFFICIAL_SIZES.get((embed, depth))
        what = f"a {official} SAM checkpoint" if official else "a SAM ViT checkpoint"
        return f"{what} (embed {embed}, {depth} blocks)"
    if any(k.startswith("image_encoder.stem.") for k in state):
        return "a medfm-tiny checkpoint"
    if any(k.startswith("image_encoder.") for k in state):
        return "a checkpoint with an image encoder medfm does not know"
    return None


def _few(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a loaded checkpoint: plain, or under "model" / "state_dict"."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise MedfmError(
            f"checkpoint {path} holds no state dict (got {type(obj).__name__}); "
            "give a SAM / MedSAM .pth or a medfm .safetensors file"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise MedfmError(
            f"checkpoint {path} is not a plain state dict: {_few(bad)} are not tensors; "
            "give a SAM / MedSAM .pth or a medfm .safetensors file"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a .pth (weights_only), a .safetensors file or a medfm model folder."""
    path = Path(path)
    if path.is_dir():
        if not (path / WEIGHTS_NAME).is_file():
            raise MedfmError(
                f"{path} is a folder without {WEIGHTS_NAME}; give a medfm model folder "
                "(config.json + model.safetensors) or a checkpoint file"
            )
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise MedfmError(f"checkpoint {path} does not exist; check the path")
    if path.suffix == ".safetensors":
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            reason = " ".join(str(e).split())[:160]
            raise MedfmError(
                f"cannot read {path} as a safetensors file ({type(e).__name__}: {reason}); "
                "is the file complete?"
            ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load fails on a damaged file with many exception types
        found = _UNSUPPORTED_GLOBAL.search(str(e))
        if found:
            raise MedfmError(
                f"checkpoint {path} holds objects other than tensors ({found.group(1)}), which "
                "medfm does not load (torch.load weights_only=True); save its state dict alone"
            ) from None
        reason = " ".join(str(e).split(". ")[0].split())[:160]
        raise MedfmError(
            f"cannot read checkpoint {path} ({type(e).__name__}: {reason}); is the file complete "
            "and a PyTorch checkpoint?"
        ) from None
    return _unwrap(obj, path)


def _load_checked(
    model: Sam, state: dict[str, torch.Tensor], path: Path | str, expected: str
) -> None:
    """Load ``state`` into ``model`` after checking that it is a checkpoint of this model."""
    own = model.state_dict()
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
            parts.append(f"{len(missing)} missing ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
        raise MedfmError(
            f"checkpoint {path} does not fit model {expected}: keys {'; '.join(parts)}; "
            "is it a checkpoint of this model?"
        )
    wrong = [k for k, v in own.items() if state[k].shape != v.shape]
    if wrong:
        k = wrong[0]
        raise MedfmError(
            f"checkpoint {path} does not fit model {expected}: {len(wrong)} tensors have other "
            f"shapes, e.g. {k} {tuple(state[k].shape)} where the model has {tuple(own[k].shape)}"
        )
    model.load_state_dict(state)


def load_sam_checkpoint(model: Sam, path: str | os.PathLike, expected: str) -> None:
    """Load an official SAM / MedSAM ``.pth`` (or a medfm ``.safetensors`` / model folder) into
    ``model``, in place.

    The file is read with ``torch.load(map_location="cpu", weights_only=True)``; a state dict
    nested under "model" or "state_dict" and a "module." prefix (DDP) are accepted. ``expected``
    is the model name asked for, used in the messages. A missing, corrupt or unreadable file, a
    checkpoint of another model (told apart by its patch embedding width and block count) and
    missing / unexpected keys or other shapes raise MedfmError.
    """
    _load_checked(model, _read_state_dict(path), path, expected)


# --------------------------------------------------------------------------------------------
# medfm's own format and the model entry point


def _medfm_version() -> str:
    from medfm import __version__

    return __version__


def save_pretrained(
    model: Sam, folder: str | os.PathLike, *, name: str, extra: dict | None = None
) -> Path:
    """Write ``folder/config.json`` and ``folder/model.safetensors`` (each atomically).

    config.json: ``{"model": name, "spec": SamSpec fields (ViT models) or null,
    "medfm_version": ..., **extra}``; extra may repeat the first three but not change them.
    The weights are written first, so a folder with a config.json is complete. Returns the folder.
    """
    if name not in SEG_MODELS:
        raise MedfmError(f"unknown model {name!r}; choose one of {', '.join(SEG_MODELS)}")
    spec = spec_of(model)
    if (spec is not None) != (name in VIT_SPECS):
        kind = "a SAM ViT" if spec is not None else "a medfm-tiny"
        raise MedfmError(f"cannot save {kind} model under the name {name}; pass its own name")
    config = {"model": name, "spec": asdict(spec) if spec else None}
    config["medfm_version"] = _medfm_version()
    clash = sorted(k for k, v in (extra or {}).items() if k in config and v != config[k])
    if clash:
        raise MedfmError(f"extra config keys {clash} would overwrite medfm's own; rename them")
    config.update(extra or {})
    folder = Path(folder)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "model": name})
    atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return folder


def read_config(folder: str | os.PathLike) -> dict:
    """The config.json of a medfm model folder, checked for "model" (and "spec")."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise MedfmError(f"model folder {folder} does not exist; check the path")
    if not path.is_file():
        raise MedfmError(
            f"{folder} has no {CONFIG_NAME}; give a folder written by medfm "
            "(config.json + model.safetensors)"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MedfmError(f"{path} is not valid JSON ({e}); is the file complete?") from None
    if not isinstance(config, dict) or config.get("model") not in SEG_MODELS:
        got = config.get("model") if isinstance(config, dict) else None
        raise MedfmError(f"{path} names model {got!r}; expected one of {', '.join(SEG_MODELS)}")
    spec = config.get("spec")
    if spec is not None:
        names = {f.name for f in fields(SamSpec)}
        if not isinstance(spec, dict) or set(spec) != names:
            raise MedfmError(f"{path}: 'spec' must be null or have the fields {sorted(names)}")
    return config


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


def _spec_from_config(config: dict) -> SamSpec | None:
    spec = config.get("spec")
    if spec is None:
        return None
    spec = dict(spec, encoder_global_attn_indexes=tuple(spec["encoder_global_attn_indexes"]))
    return SamSpec(**spec)


def load_pretrained(folder: str | os.PathLike) -> tuple[Sam, dict]:
    """(model in eval mode, config) from a folder written by `save_pretrained`."""
    config = read_config(folder)
    name = config["model"]
    try:
        spec = _spec_from_config(config)
        model = build_architecture(name, spec)
    except (TypeError, ValueError) as e:
        if isinstance(e, MedfmError):
            raise
        raise MedfmError(f"{Path(folder) / CONFIG_NAME}: bad 'spec' ({e})") from None
    _load_checked(model, _read_state_dict(folder), Path(folder) / WEIGHTS_NAME, name)
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
