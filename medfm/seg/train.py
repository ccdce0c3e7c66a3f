"""Training SAM's prompt encoder and mask decoder (and, for medfm-tiny, optionally its image
encoder) on nnU-Net 2D datasets: the SynthFM recipe.

- Frozen encoder (the default): each image's embedding is computed once into an
  `EmbeddingCache` (fp16, memory-mapped) and training reads only embeddings and label maps.
- ``lowres_prob``: nnU-Net's simulated low resolution, for a trained encoder: an image is
  shrunk by a factor in ``lowres_factor`` (area average) before the model's resize to its input,
  as a small crop or a coarse slice is, whose structures then reach the encoder blurred.
  ``lowres_labels`` coarsens those images' label maps too (each coarse pixel takes the label at
  its centre, then the blocks are enlarged back): the staircase masks, filling their boxes,
  that an annotation made at that resolution has once enlarged.
- Prompt encoder and mask decoder are re-initialised (``keep_decoder`` keeps the checkpoint's).
- Every step draws its images, targets and prompts from a generator seeded by (seed, step), so
  a run resumed from a checkpoint ends, on the CPU, with the weights of an uninterrupted run.
- Loss: SAM's 20 x focal + Dice + IoU MSE, Dice alone (SynthFM), Dice + IoU MSE
  (``dice_iou``: SynthFM's mask loss with SAM's IoU head trained), or Dice + BCE + IoU MSE
  (``dice_ce``: nnU-Net's mask loss); optional gradient-norm clipping; the best of SAM's three
  outputs for ambiguous prompts; iterative refinement clicks with the previous logits fed back.
- AdamW with linear warm-up and cosine decay; mixed precision (bf16) on CUDA; data-parallel
  under ``torchrun --nproc_per_node N -m medfm.cli.main seg train ...`` (the batch is split
  over the processes, gradients averaged, rank 0 writes).
- Checkpoints ``OUT/checkpoints/step_NNNNNNN/`` (config.json, model.safetensors of the
  trained parameters, optimizer.safetensors, state.json written last) and the final model in
  ``OUT/model/``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file

from medfm.devices import parse_device
from medfm.errors import MedfmError
from medfm.io import atomic_write_text, iter_dataset, read_dataset_json
from medfm.seg.decoder import decode_rows
from medfm.seg.losses import dice_loss_only, sam_loss
from medfm.seg.prompts import (
    PromptConfig,
    Prompts,
    random_label_masks,
    refinement_clicks,
    resize_boxes,
    resize_points,
    sample_prompts,
)
from medfm.seg.types import to_rgb_uint8

LOWRES = 256  # SAM's mask decoder predicts 256 x 256 logits (4 x the 64 x 64 embedding)


LOSSES: dict[str, Callable] = {
    "sam": sam_loss,
    "dice": lambda logits, target, iou: dice_loss_only(logits, target),
    "dice_iou": lambda logits, target, iou: sam_loss(logits, target, iou, focal_weight=0.0),
    "dice_ce": lambda logits, target, iou: sam_loss(
        logits, target, iou, focal_weight=0.0, ce_weight=1.0
    ),
}


class TrainConfig(BaseModel):
    """Everything a training run needs; saved as OUT/train_config.json and checked on resume."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "medfm-tiny"
    checkpoint: str | None = None
    data: tuple[str, ...]
    out: str
    steps: int = Field(2000, ge=1)
    batch: int = Field(8, ge=1)
    prompts_per_image: int = Field(4, ge=1)
    area_power: float = Field(0.0, ge=0.0)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup: int = Field(100, ge=0)
    loss: Literal["sam", "dice", "dice_iou", "dice_ce"] = "sam"
    grad_clip: float | None = Field(None, gt=0)
    train_encoder: bool = False
    keep_decoder: bool = False
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0
    device: str = "cpu"
    amp: bool = True
    compile: bool = False
    cache: str | None = None
    prompt: PromptConfig = PromptConfig()
    lowres_prob: float = Field(0.0, ge=0.0, le=1.0)
    lowres_factor: tuple[float, float] = (1.5, 6.0)
    lowres_labels: bool = False

    @model_validator(mode="after")
    def _check_lowres(self) -> TrainConfig:
        lo, hi = self.lowres_factor
        if not 1.0 <= lo <= hi:
            raise ValueError("lowres_factor must be (low, high) with 1 <= low <= high")
        if self.lowres_labels and self.lowres_prob == 0:
            raise ValueError("lowres_labels coarsens the shrunk images' labels: set lowres_prob")
        if self.loss == "dice" and self.prompt.multimask:
            raise ValueError(
                "loss 'dice' trains no IoU head, and that head picks among SAM's three outputs "
                "for a single click: set prompt.multimask false (--no-multimask) or use the "
                "loss dice_iou"
            )
        if self.lowres_prob > 0 and not self.train_encoder:
            raise ValueError(
                "lowres_prob needs train_encoder: a frozen encoder's embeddings are cached "
                "from the images as stored"
            )
        return self


@dataclass
class TrainData:
    """In memory: images (H, W, 3) uint8 and label maps at the decoder's low resolution
    (LOWRES x LOWRES, in the model's padded input frame)."""

    images: list[np.ndarray]
    lowres_labels: torch.Tensor  # (N, LOWRES, LOWRES) uint8
    names: list[str]


def _resize_shape(h: int, w: int, side: int) -> tuple[int, int]:
    scale = side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def lowres_label(label: torch.Tensor, image_size: int) -> torch.Tensor:
    """(H, W) integer label -> (LOWRES, LOWRES) uint8 in the model's input frame: resized so the
    longest side is ``image_size``, zero-padded bottom/right to a square, then downsampled to
    LOWRES (SAM's preprocessing of the image, applied to the labels). Both resizes take the
    label at each new pixel's centre ("nearest-exact"), as the image's resize is centre-aligned
    (torch's "nearest" takes floor(i * in / out), up to half a pixel up and left)."""
    h, w = label.shape
    rh, rw = _resize_shape(h, w, image_size)
    x = F.interpolate(label[None, None].float(), size=(rh, rw), mode="nearest-exact")[0, 0]
    x = F.pad(x, (0, image_size - rw, 0, image_size - rh))
    if image_size != LOWRES:
        x = F.interpolate(x[None, None], size=(LOWRES, LOWRES), mode="nearest-exact")[0, 0]
    return x.to(torch.uint8)


def load_training_data(folders: tuple[str, ...] | list[str], image_size: int) -> TrainData:
    """Read every case of several 2D nnU-Net folders (synthetic, diffusion-made or real)."""
    images, labels, names = [], [], []
    for folder in folders:
        meta = read_dataset_json(folder)
        if meta.file_ending != ".png":
            raise MedfmError(
                f"{folder}: training reads 2D .png datasets, this one is {meta.file_ending}; "
                "generate 2D data with medfm synth generate --dim 2"
            )
        for case, image, label in iter_dataset(folder):
            lab = label.data[0].long()
            if int(lab.max()) == 0:
                continue  # nothing to prompt
            images.append(to_rgb_uint8(image.data))
            labels.append(lowres_label(lab, image_size))
            names.append(f"{Path(folder).name}/{case}")
    if not images:
        raise MedfmError(f"no labelled cases in {', '.join(map(str, folders))}")
    return TrainData(images=images, lowres_labels=torch.stack(labels), names=names)


def simulate_low_resolution(image: np.ndarray, factor: float) -> np.ndarray:
    """(H, W, 3) uint8 -> the same image shrunk by ``factor`` (area average, at least 1 pixel
    per side): what a scan acquired or stored that much coarser gives the model's resize. The
    model's own resize (SAM's ``ResizeLongestSide``) then enlarges it, as it does a small real
    image; MONAI's ``RandSimulateLowResolution`` would upsample with its own interpolation."""
    h, w = image.shape[:2]
    size = (max(1, round(w / factor)), max(1, round(h / factor)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def coarsen_label(label: torch.Tensor, image_shape: tuple[int, int], factor: float) -> torch.Tensor:
    """(LOWRES, LOWRES) label map of an (H, W) image in the model's padded input frame -> the
    same map as annotated on the image shrunk by ``factor`` (`simulate_low_resolution`'s size):
    each coarse pixel takes the label at its centre ("nearest-exact"), enlarged back as blocks
    of label. The padding stays 0."""
    h, w = image_shape
    small = (max(1, round(h / factor)), max(1, round(w / factor)))
    rh, rw = _resize_shape(h, w, LOWRES)
    x = label[None, None, :rh, :rw].float()
    x = F.interpolate(x, size=small, mode="nearest-exact")
    x = F.interpolate(x, size=(rh, rw), mode="nearest-exact")[0, 0]
    out = torch.zeros_like(label)
    out[:rh, :rw] = x.to(label.dtype)
    return out


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one training step: a function of (seed, step) only."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(step) * 7919) & 0x7FFFFFFFFFFFFFFF)
    return g


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def trainable_prefixes(cfg: TrainConfig) -> tuple[str, ...]:
    return (
        ("image_encoder.", "prompt_encoder.", "mask_decoder.")
        if cfg.train_encoder
        else ("prompt_encoder.", "mask_decoder.")
    )


def _reinit(module: torch.nn.Module) -> None:
    for m in module.modules():
        if hasattr(m, "reset_parameters") and m is not module:
            m.reset_parameters()


def init_model(cfg: TrainConfig):
    """Build the model with deterministic initial weights (a function of cfg.seed)."""
    from medfm.seg.models import build_architecture, build_model

    # Module constructors draw from torch's global generator: fork it so the initial weights
    # depend on the seed only, and the caller's global state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.checkpoint is None:
            # from scratch: random weights, also for medfm-tiny (whose bundled weights are what
            # this recipe makes; fine-tune them with checkpoint=medfm.seg.models.BUNDLED_DIR)
            model = build_architecture(cfg.model).eval()
        else:
            model = build_model(cfg.model, cfg.checkpoint)
        if not cfg.keep_decoder and cfg.checkpoint is not None:
            _reinit(model.prompt_encoder)
            _reinit(model.mask_decoder)
    return model


def decode(
    model,
    embeddings: torch.Tensor,
    image_index: torch.Tensor,
    prompts: Prompts,
    mask_input: torch.Tensor | None,
    multimask: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run SAM's prompt encoder and mask decoder for N prompts on B images.

    embeddings (B, C, h, w); image_index (N,); prompt coordinates in LOWRES pixels (taken by
    ``scale`` to the model input with `resize_points` / `resize_boxes`, as `Segmenter` takes a
    medfm model's prompts); mask_input (N, 1, LOWRES, LOWRES) logits or None.
    Returns float32 logits (N, K, LOWRES, LOWRES) and iou predictions (N, K), K = 3 with
    multimask. SAM's prompt encoder takes the same kind of prompt for every row of a call, so
    the prompts are decoded in at most three groups (box, box + points, points), each one
    decoder pass over the prompts of all images together (`decode_rows`): what SAM's decoder
    gives each prompt alone, with a few large kernels instead of two small calls per image.
    """
    n = len(prompts)
    k = 3 if multimask else 1
    # float32 also under bf16 autocast, where the embeddings may be bf16: the loss reads these
    logits = embeddings.new_zeros((n, k, LOWRES, LOWRES), dtype=torch.float32)
    ious = embeddings.new_zeros((n, k), dtype=torch.float32)
    pe = model.prompt_encoder.get_dense_pe()
    has_points = prompts.n_points > 0
    for with_box, with_points in ((True, False), (True, True), (False, True)):
        sel = torch.nonzero((prompts.has_box == with_box) & (has_points == with_points))[:, 0]
        if sel.numel() == 0:
            continue
        p = prompts.subset(sel)
        sparse, dense = model.prompt_encoder(
            points=(resize_points(p.points, scale, scale), p.labels) if with_points else None,
            boxes=resize_boxes(p.boxes, scale, scale) if with_box else None,
            masks=None if mask_input is None else mask_input[sel],
        )
        out = slice(1, None) if multimask else slice(0, 1)  # as MaskDecoder.forward picks
        low, iou = decode_rows(
            model.mask_decoder, embeddings[image_index[sel]] + dense, pe, sparse, out
        )
        logits = logits.index_copy(0, sel, low.float())
        ious = ious.index_copy(0, sel, iou.float())
    return logits, ious


def prompted_loss(
    model,
    embeddings: torch.Tensor,
    image_index: torch.Tensor,
    masks: torch.Tensor,
    prompts: Prompts,
    prompt_cfg: PromptConfig,
    loss: str,
    generator: torch.Generator,
    scale: float,
    *,
    amp: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one training step (to backpropagate) and its last pass's terms (dice, focal,
    iou, averaged over all prompts).

    masks (N, LOWRES, LOWRES) bool targets for the N prompts. In the first decoder pass,
    ambiguous prompts (one point, no box) get SAM's three outputs with the best-matching one
    trained (when ``prompt_cfg.multimask``), all others SAM's single output, which is what
    prediction uses for them. Each of the ``prompt_cfg.refine_iters`` further passes adds a
    click from the error region of the previous mask and feeds its logits back (single
    output). The loss is the mean over prompts and passes.
    """
    n = masks.shape[0]
    target = masks[:, None].float()
    total = torch.zeros((), device=embeddings.device)
    mask_input = None
    n_iter = 1 + prompt_cfg.refine_iters
    loss_fn = LOSSES[loss]
    for it in range(n_iter):
        multi = prompts.ambiguous if (it == 0 and prompt_cfg.multimask) else torch.zeros_like(
            prompts.has_box
        )  # fmt: skip
        best = target.new_zeros((n, 1, LOWRES, LOWRES))
        terms = dict.fromkeys(("dice", "focal", "iou"), 0.0)
        for group, multimask in ((multi, True), (~multi, False)):
            sel = torch.nonzero(group).flatten()
            if sel.numel() == 0:
                continue
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                logits, iou = decode(
                    model, embeddings, image_index[sel], prompts.subset(sel),
                    None if mask_input is None else mask_input[sel], multimask, scale,
                )  # fmt: skip
            out = loss_fn(logits, target[sel], iou)
            total = total + out.total * (sel.numel() / n)
            for k in terms:  # this pass's terms, averaged over both groups of prompts
                terms[k] += float(getattr(out, k).detach()) * (sel.numel() / n)
            pick = out.best[:, None, None, None].expand(-1, 1, LOWRES, LOWRES)
            best = best.index_copy(0, sel, logits.gather(1, pick).detach())
        last = terms
        if it + 1 < n_iter:
            pts, lab = refinement_clicks(
                best[:, 0] > 0, masks, generator=generator, mode=prompt_cfg.refine_mode
            )
            prompts = prompts.add_points(pts, lab)
            mask_input = best
    return total / n_iter, last


class Trainer:
    """One training run (see the module docstring). ``run()`` trains until cfg.steps."""

    def __init__(self, cfg: TrainConfig, *, log: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.device = parse_device(cfg.device)
        self.rank, self.world = init_distributed(self.device)
        if self.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        self.log = (log if self.rank == 0 else None) or (lambda msg: None)
        if cfg.checkpoint is None and not cfg.train_encoder:
            self.log(
                f"warning: no checkpoint: {cfg.model}'s frozen image encoder has random weights "
                "(pass --checkpoint, or --train-encoder)"
            )
        self.model = init_model(cfg).to(self.device)
        if cfg.compile:  # TorchInductor, the image encoder only: minutes to compile
            # Automatic dynamic shapes (static first, then only the sizes that change made
            # symbolic): dynamic=True also makes the image sides symbolic, and torch 2.14's
            # inductor fails on those graphs ("cannot determine truth value of Relational").
            # The decoder runs through `decode_rows`, not its module's forward; compiled, it
            # was slower on 2 CPU cores (5.0 against 4.4 s per ViT-B step of 2 images x 4
            # prompts) and compiled again for each new number of prompts (~2.5 min each).
            encoder = self.model.image_encoder
            encoder.forward = torch.compile(encoder.forward)
        self.image_size = int(self.model.image_encoder.img_size)
        self.scale = self.image_size / LOWRES
        self.data = load_training_data(cfg.data, self.image_size)
        prefixes = trainable_prefixes(cfg)
        self.names = [n for n, _ in self.model.named_parameters() if n.startswith(prefixes)]
        params = dict(self.model.named_parameters())
        for n, p in params.items():
            p.requires_grad_(n in self.names)
        self.opt = torch.optim.AdamW(
            [params[n] for n in self.names], lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, cfg.warmup, cfg.steps)
        )
        self.step = 0
        self.cache = None
        if not cfg.train_encoder:
            self._fill_cache()

    # ------------------------------------------------------------------ embeddings

    def model_id(self) -> str:
        """The embedding cache's key for this model: its name, input size and a hash of what
        makes its embeddings (the image encoder's weights, SAM's pixel mean and std), so that
        new weights at the same path never reuse old embeddings."""
        h = hashlib.sha256()
        encoder = self.model.image_encoder.state_dict()
        norm = {"pixel_mean": self.model.pixel_mean, "pixel_std": self.model.pixel_std}
        for name, t in [*sorted(encoder.items()), *norm.items()]:
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        return f"{self.cfg.model}:{self.image_size}:{h.hexdigest()[:16]}"

    def _encode(self, images: list[np.ndarray]) -> torch.Tensor:
        return self.model.image_encoder(self._preprocess(images))

    def _preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """SAM's resize (longest side to the input size), normalisation and padding, one
        batch. An image whose longest side is already the input size is not resized (PIL's
        resize to the same size is a copy); images of one shape go to the device together."""
        from segment_anything.utils.transforms import ResizeLongestSide

        t = ResizeLongestSide(self.image_size)
        resized = [im if max(im.shape[:2]) == self.image_size else t.apply_image(im)
                   for im in images]  # fmt: skip
        if len({im.shape for im in resized}) == 1:
            x = torch.from_numpy(np.stack(resized)).to(self.device).permute(0, 3, 1, 2)
            return self.model.preprocess(x.float())
        batch = []
        for im in resized:
            x = torch.as_tensor(im, device=self.device).permute(2, 0, 1).float()
            batch.append(self.model.preprocess(x[None])[0])
        return torch.stack(batch)

    def _fill_cache(self) -> None:
        from medfm.seg.cache import EmbeddingCache

        root = Path(self.cfg.cache) if self.cfg.cache else self.out / "embeddings"
        self.cache = EmbeddingCache(root, self.model_id())
        todo = [im for im in self.data.images if self.cache.get_array(im) is None]
        if todo:
            self.log(f"embedding {len(todo)} images (cached for later epochs and runs)")
        todo = todo[self.rank :: self.world]  # under DDP each process embeds its share
        with torch.inference_mode():
            for s in range(0, len(todo), 16):
                self.cache.get_or_compute(todo[s : s + 16], self._encode, batch_size=8)
        _barrier(self.world)

    def embeddings(
        self, idx: list[int], step: int, factors: list[float | None] | None = None
    ) -> torch.Tensor:
        if self.cache is not None:
            arrays = [self.cache.get_array(self.data.images[i]) for i in idx]
            return torch.stack(
                [torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in arrays]
            ).to(self.device)
        return self._encode(self.augmented_images(idx, step, factors))

    def lowres_factors(self, n: int, step: int) -> list[float | None]:
        """The shrink factor of each of a step's n images (None: kept), each shrunk with
        probability ``lowres_prob``. Drawn from their own generator of (seed, step, rank): the
        prompts' stream stays as it was."""
        cfg = self.cfg
        if cfg.lowres_prob == 0:
            return [None] * n
        g = step_generator(cfg.seed * 1009 + 7 * (self.rank + 1) + 500_009, step)
        u = torch.rand(n, 2, generator=g, dtype=torch.float64).tolist()
        lo, hi = cfg.lowres_factor
        return [lo * (hi / lo) ** b if a < cfg.lowres_prob else None for a, b in u]

    def augmented_images(
        self, idx: list[int], step: int, factors: list[float | None] | None = None
    ) -> list[np.ndarray]:
        """The images of one step, shrunk by ``factors`` (default: `lowres_factors`)."""
        if factors is None:
            factors = self.lowres_factors(len(idx), step)
        images = [self.data.images[i] for i in idx]
        return [
            im if f is None else simulate_low_resolution(im, f)
            for im, f in zip(images, factors, strict=True)
        ]

    def step_labels(
        self, idx: list[int], step: int, factors: list[float | None] | None = None
    ) -> torch.Tensor:
        """The (B, LOWRES, LOWRES) label maps of one step's images: as stored, or with
        ``lowres_labels`` coarsened like their images by ``factors`` (default:
        `lowres_factors`; see `coarsen_label`)."""
        labels = self.data.lowres_labels[idx]
        if not self.cfg.lowres_labels:
            return labels
        if factors is None:
            factors = self.lowres_factors(len(idx), step)
        labels = labels.clone()
        for row, (i, f) in enumerate(zip(idx, factors, strict=True)):
            if f is not None:
                labels[row] = coarsen_label(labels[row], self.data.images[i].shape[:2], f)
        return labels

    # ------------------------------------------------------------------ one step

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        g = step_generator(cfg.seed, step)
        idx = torch.randint(len(self.data.images), (cfg.batch,), generator=g).tolist()
        if self.world > 1:  # each process takes its share of the batch and its own prompts
            idx = idx[self.rank :: self.world]
            g = step_generator(cfg.seed * 1009 + self.rank + 1, step)
        factors = self.lowres_factors(len(idx), step)  # one draw for images and labels
        labels = self.step_labels(idx, step, factors).to(self.device)
        image_index, masks = random_label_masks(
            labels, generator=g, max_per_image=cfg.prompts_per_image, area_power=cfg.area_power
        )
        if masks.shape[0] == 0:
            return {"loss": 0.0}
        prompts = sample_prompts(masks, cfg.prompt, input_size=LOWRES, generator=g)
        self.model.train()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self._amp())
        with autocast:
            emb = self.embeddings(idx, step, factors)
        loss, last = prompted_loss(
            self.model, emb, image_index, masks, prompts, cfg.prompt, cfg.loss, g, self.scale,
            amp=self._amp(),
        )  # fmt: skip
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.world > 1:
            _average_gradients(self.opt, self.world)
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.opt.param_groups for p in g["params"]], cfg.grad_clip
            )
        self.opt.step()
        self.sched.step()
        return {"loss": float(loss.detach()), **last, "lr": self.sched.get_last_lr()[0]}

    def _amp(self) -> bool:
        return self.cfg.amp and self.device.type == "cuda"

    # ------------------------------------------------------------------ checkpoints

    def trained_state(self) -> dict[str, torch.Tensor]:
        state = self.model.state_dict()
        prefixes = trainable_prefixes(self.cfg)
        return {
            k: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith(prefixes)
        }

    def save_checkpoint(self) -> Path:
        ck = self.out / "checkpoints" / f"step_{self.step:07d}"
        tmp = ck.with_name(ck.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(self.trained_state(), str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(self.opt.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "config.json").write_text(json.dumps(self.model_config(), indent=2))
        state = {"step": self.step, "optimizer": opt_meta, "scheduler": self.sched.state_dict()}
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        shutil.rmtree(ck, ignore_errors=True)
        os.replace(tmp, ck)
        for p in saved_checkpoints(self.out)[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(p, ignore_errors=True)
        return ck

    def model_config(self) -> dict:
        return {
            "model": self.cfg.model,
            "base_checkpoint": self.cfg.checkpoint,
            "trained": list(trainable_prefixes(self.cfg)),
            "train_config": json.loads(self.cfg.model_dump_json()),
        }

    def latest_checkpoint(self) -> Path | None:
        done = saved_checkpoints(self.out)
        return done[-1] if done else None

    def resume(self) -> bool:
        ck = self.latest_checkpoint()
        if ck is None:
            return False
        state = json.loads((ck / "state.json").read_text())
        weights = load_file(str(ck / "model.safetensors"))
        missing = self.model.load_state_dict(weights, strict=False)
        if missing.unexpected_keys:
            raise MedfmError(
                f"{ck}: checkpoint has unexpected weights {missing.unexpected_keys[:3]}"
            )
        tensors = load_file(str(ck / "optimizer.safetensors"))
        self.opt.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
        self.sched.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.log(f"resumed from {ck} at step {self.step}")
        return True

    # ------------------------------------------------------------------ the loop

    def run(self, *, progress: Callable[[int, dict], None] | None = None) -> Path:
        """Train from ``self.step`` to cfg.steps, then write the final model (``OUT/model``).
        (`train` does not build a Trainer for a run that finished earlier.)"""
        self.out.mkdir(parents=True, exist_ok=True)
        log = self._open_metrics_log() if self.rank == 0 else None
        try:
            while self.step < self.cfg.steps:
                t0 = time.perf_counter()
                metrics = self.train_step(self.step)
                self.step += 1
                metrics["s_per_step"] = time.perf_counter() - t0
                if log is not None:
                    log.write(json.dumps({"step": self.step, **metrics}) + "\n")
                    log.flush()
                if progress:
                    progress(self.step, metrics)
                if self.rank == 0 and (
                    self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps
                ):
                    self.save_checkpoint()
        finally:
            if log is not None:
                log.close()
        final = self.save_final() if self.rank == 0 else self.out / "model"
        _barrier(self.world)
        return final

    def _open_metrics_log(self):
        """OUT/metrics.jsonl, one line per step; after a resume, the lines of the steps that are
        trained again are dropped first (and a line cut short by a kill), so each step appears
        once."""
        path = self.out / "metrics.jsonl"

        def kept(line: str) -> bool:
            try:
                return json.loads(line).get("step", 0) <= self.step
            except (json.JSONDecodeError, AttributeError):
                return False

        if path.exists():
            keep = [line for line in path.read_text().splitlines() if kept(line)]
            atomic_write_text(path, "".join(line + "\n" for line in keep))
        return path.open("a")

    def save_final(self) -> Path:
        from medfm.seg.models import save_pretrained

        final = self.out / "model"
        save_pretrained(self.model, final, name=self.cfg.model, extra=self.model_config())
        return final


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size): under ``torchrun`` (WORLD_SIZE > 1) join the process group (NCCL on
    CUDA, gloo on the CPU); otherwise (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _average_gradients(opt: torch.optim.Optimizer, world: int) -> None:
    """Data-parallel training: every process ends the step with the mean gradient. (The
    decoder is called module by module, not through forward(), so DDP's hooks would not fire;
    the trained parameters are few, so one all-reduce per tensor is cheap.)"""
    import torch.distributed as dist

    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW state dict -> (tensors for safetensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    meta_state: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        meta_state[str(pid)] = {}
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{pid}.{key}"] = val.detach().cpu().contiguous()
            else:
                meta_state[str(pid)][key] = val
    return tensors, {"state": meta_state, "param_groups": sd["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for pid, rest in meta["state"].items():
        state[int(pid)] = dict(rest)
    for name, val in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = val
    return {"state": state, "param_groups": meta["param_groups"]}


def saved_checkpoints(out: Path) -> list[Path]:
    """OUT/checkpoints/step_NNNNNNN folders written whole (not ``.partial``), oldest first."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step_")
                  and not p.name.endswith(".partial") and (p / "state.json").exists())  # fmt: skip


def finished_model(out: Path, steps: int) -> Path | None:
    """OUT/model when the run wrote its final model and its last checkpoint is at ``steps``
    (a finished run: resuming it keeps the model as it is, with what was added to its
    config.json since, e.g. `medfm.seg.calibrate`'s thresholds), else None."""
    final = Path(out) / "model"
    done = saved_checkpoints(Path(out))
    if not (final / "config.json").is_file() or not done:
        return None
    return final if json.loads((done[-1] / "state.json").read_text())["step"] >= steps else None


def prepare_run(cfg: TrainConfig, *, resume: bool) -> None:
    """Create OUT, or check that an existing OUT with checkpoints was made by the same config.
    A folder whose run never reached a checkpoint (a start that failed, or was killed early) has
    nothing to keep: it takes the new config."""
    out = Path(cfg.out)
    saved = out / "train_config.json"
    text = cfg.model_dump_json(indent=2)
    if saved.exists() and saved_checkpoints(out):
        old = TrainConfig.model_validate_json(saved.read_text())
        if old != cfg:
            diff = [f for f in TrainConfig.model_fields if getattr(old, f) != getattr(cfg, f)]
            raise MedfmError(
                f"{out} holds a run with other settings ({', '.join(diff)}); use a new --out"
            )
        if not resume:
            raise MedfmError(f"{out} already holds a run; pass --resume to continue it")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, text)


def train(cfg: TrainConfig, *, resume: bool = False, log=None, progress=None) -> Path:
    """Train (or resume) a run; returns the final model folder."""
    prepare_run(cfg, resume=resume)
    if resume and (done := finished_model(Path(cfg.out), cfg.steps)) is not None:
        if log is not None:  # nothing to train: no need to load the data or build the model
            log(f"{cfg.out} finished training earlier; its model is {done}")
        return done
    trainer = Trainer(cfg, log=log)
    if resume:
        trainer.resume()
    return trainer.run(progress=progress)


__all__ = [
    "TrainConfig",
    "Trainer",
    "coarsen_label",
    "decode",
    "lowres_label",
    "lr_factor",
    "saved_checkpoints",
    "train",
]
