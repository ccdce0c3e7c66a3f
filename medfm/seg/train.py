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
- The loop is `medfm.engine`'s (`SegTask` is this recipe as the engine's task): AdamW with
  linear warm-up and cosine decay, bf16 on CUDA, checkpoints in ``OUT/checkpoints/``, the final
  model in ``OUT/model/``, and data-parallel training under ``torchrun --nproc_per_node N -m
  medfm.cli.main seg train ...`` (the step's images are split over the processes, whose
  ``DistributedDataParallel`` gradients together are those of one process; rank 0 writes).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import ConfigDict, Field, model_validator
from torch import nn

from medfm.devices import parse_device
from medfm.engine import (
    Dist,
    Engine,
    EngineConfig,
    Task,
    prepare_run_folder,
    run_training,
    setup_distributed,
    step_generator,
)
from medfm.errors import MedfmError
from medfm.io import DatasetJson, check_outputs, iter_dataset, read_dataset_json
from medfm.seg.cache import EmbeddingCache
from medfm.seg.decoder import decode_rows
from medfm.seg.embed import embedding_shape, encode_images, encoder_id, preprocess_images
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


class TrainConfig(EngineConfig):
    """Everything a training run needs: the engine's settings (`EngineConfig`: steps, lr,
    warmup, clipping, checkpoints, seed, device, ...) and SAM's; saved as
    OUT/train_config.json and checked on resume."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    model: str = "medfm-tiny"
    checkpoint: str | None = None
    data: tuple[str, ...]
    steps: int = Field(2000, ge=1)
    batch: int = Field(8, ge=1)
    prompts_per_image: int = Field(4, ge=1)
    area_power: float = Field(0.0, ge=0.0)
    loss: Literal["sam", "dice", "dice_iou", "dice_ce"] = "sam"
    train_encoder: bool = False
    keep_decoder: bool = False
    cache: str | None = None
    prompt: PromptConfig = PromptConfig()
    lowres_prob: float = Field(0.0, ge=0.0, le=1.0)
    lowres_factor: tuple[float, float] = (1.5, 6.0)
    lowres_labels: bool = False
    data_weights: tuple[float, ...] | None = None

    @model_validator(mode="after")
    def _check_weights(self) -> TrainConfig:
        w = self.data_weights
        if w is not None:
            if len(w) != len(self.data):
                raise ValueError(f"data_weights has {len(w)} weights for {len(self.data)} sets")
            if any(not x >= 0 for x in w) or sum(w) <= 0:
                raise ValueError("data_weights must be non-negative, not all zero")
        return self

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
    sources: list[int] | None = None  # the --data folder of each image (its index)


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


def check_training_data(folders: tuple[str, ...] | list[str]) -> list[DatasetJson]:
    """Each folder is a 2D nnU-Net dataset: its dataset.json, read and checked (the check
    `train` makes before it writes anything)."""
    if not folders:
        raise MedfmError("give at least one --data folder")
    metas = [read_dataset_json(folder) for folder in folders]
    for folder, meta in zip(folders, metas, strict=True):
        if meta.file_ending != ".png":
            raise MedfmError(
                f"{folder}: training reads 2D .png datasets, this one is {meta.file_ending}; "
                "generate 2D data with medfm synth generate --dim 2"
            )
    return metas


def load_training_data(folders: tuple[str, ...] | list[str], image_size: int) -> TrainData:
    """Read every case of several 2D nnU-Net folders (synthetic, diffusion-made or real)."""
    metas = check_training_data(folders)
    images, labels, names, sources = [], [], [], []
    for source, (folder, meta) in enumerate(zip(folders, metas, strict=True)):
        named = set(meta.labels.values())
        for case, image, label in iter_dataset(folder):
            lab = label.data[0].long()
            if int(lab.max()) == 0:
                continue  # nothing to prompt
            unknown = sorted(set(torch.unique(lab).tolist()) - named)
            if unknown:
                raise MedfmError(
                    f"{folder}: case {case} holds label values {unknown} that dataset.json "
                    "does not name"
                )
            images.append(to_rgb_uint8(image.data))
            labels.append(lowres_label(lab, image_size))
            names.append(f"{Path(folder).name}/{case}")
            sources.append(source)
    if not images:
        raise MedfmError(f"no labelled cases in {', '.join(map(str, folders))}")
    return TrainData(images=images, lowres_labels=torch.stack(labels), names=names, sources=sources)


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
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one training step (to backpropagate) and its last pass's terms (dice, focal,
    iou, averaged over all prompts).

    masks (N, LOWRES, LOWRES) bool targets for the N prompts. In the first decoder pass,
    ambiguous prompts (one point, no box) get SAM's three outputs with the best-matching one
    trained (when ``prompt_cfg.multimask``), all others SAM's single output, which is what
    prediction uses for them. Each of the ``prompt_cfg.refine_iters`` further passes adds a
    click from the error region of the previous mask and feeds its logits back (single
    output). The loss is the mean over prompts and passes.

    ``rows`` (N,) bool: decode only these prompts and return their share of the mean (sums
    over ``rows`` divided by N; `image_index` need only be right for them). The refinement
    clicks are still drawn for all N prompts, so each prompt's click is the one it gets when
    all are decoded (data-parallel processes each take their rows).
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
            if rows is not None:
                group = group & rows
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


class PromptedSam(nn.Module):
    """SAM with one training step's loss as its ``forward``: what ``DistributedDataParallel``
    wraps (SAM's decoder is run through `decode_rows`, not through its own forward)."""

    def __init__(self, sam: nn.Module, *, encode: bool) -> None:
        super().__init__()
        self.sam = sam
        self.encode = encode

    def forward(
        self, inputs: torch.Tensor, *args, amp: bool = False, **kwargs
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """inputs: (B, C, h, w) image embeddings, or (B, 3, S, S) preprocessed images when the
        image encoder is trained (``encode``); the other arguments are `prompted_loss`'s after
        its embeddings."""
        emb = inputs
        if self.encode:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                emb = self.sam.image_encoder(inputs)
        return prompted_loss(self.sam, emb, *args, amp=amp, **kwargs)


class SegTask(Task):
    """SAM's prompt encoder and mask decoder (and with ``train_encoder`` its image encoder) as
    the engine's task: the data, the prompts and the loss of the SynthFM recipe.

    Under data-parallel training every process draws the whole step (its images, label masks
    and prompts) from the step's generator; process r computes the loss of the prompts on
    images r, r + world, ... and returns its share of the step's mean, so the processes
    together compute what one process computes with the same batch.
    """

    find_unused_parameters = True  # e.g. the box embeddings in a step of clicks only

    def __init__(
        self, cfg: TrainConfig, dist: Dist, *, log: Callable[[str], None] | None = None
    ) -> None:
        self.cfg = cfg
        self.dist = dist
        self.device = dist.device
        self.out = Path(cfg.out)
        self.log = (log if dist.main else None) or (lambda msg: None)
        if dist.world > 1 and cfg.batch < dist.world:
            raise MedfmError(
                f"--batch {cfg.batch} is smaller than the {dist.world} processes: each process "
                "needs at least one image per step"
            )
        if cfg.checkpoint is None and not cfg.train_encoder:
            self.log(
                f"warning: no checkpoint: {cfg.model}'s frozen image encoder has random weights "
                "(pass --checkpoint, or --train-encoder)"
            )
        self.model = init_model(cfg).to(self.device)
        self.module = PromptedSam(self.model, encode=cfg.train_encoder)
        self.image_size = int(self.model.image_encoder.img_size)
        self.scale = self.image_size / LOWRES
        self.data = load_training_data(cfg.data, self.image_size)
        self._by_source: list[list[int]] | None = None
        prefixes = trainable_prefixes(cfg)
        self.names = [n for n, _ in self.model.named_parameters() if n.startswith(prefixes)]
        for n, p in self.model.named_parameters():
            p.requires_grad_(n in self.names)
        self.cache = None
        if not cfg.train_encoder:
            self._fill_cache()

    def compile(self) -> None:
        # TorchInductor, the image encoder only (the decoder runs through `decode_rows`, whose
        # graph changes with every number of prompts). Automatic dynamic shapes: dynamic=True
        # would make the image sides symbolic too, which inductor's graphs fail on.
        encoder = self.model.image_encoder
        encoder.forward = torch.compile(encoder.forward)

    def trained_parameters(self) -> list[tuple[str, nn.Parameter]]:
        params = dict(self.model.named_parameters())
        return [(n, params[n]) for n in self.names]

    # ------------------------------------------------------------------ embeddings

    def model_id(self) -> str:
        """The embedding cache's key for this model (`medfm.seg.embed.encoder_id`)."""
        return encoder_id(self.model, self.cfg.model)

    def _encode(self, images: list[np.ndarray]) -> torch.Tensor:
        return encode_images(self.model, images, self.device)

    def _fill_cache(self) -> None:
        root = Path(self.cfg.cache) if self.cfg.cache else self.out / "embeddings"
        self.cache = EmbeddingCache(root, self.model_id(), shape=embedding_shape(self.model))
        self.cache.fill(self.data.images, self._encode, rank=self.dist.rank,
                        world=self.dist.world, log=self.log)  # fmt: skip
        self.dist.barrier()

    def embeddings(
        self, idx: list[int], step: int, factors: list[float | None] | None = None
    ) -> torch.Tensor:
        """The (B, C, h, w) embeddings of images ``idx``: from the cache (frozen encoder), or
        computed (a trained encoder, on images shrunk by ``factors``)."""
        if self.cache is not None:
            arrays = [self.cache.get_array(self.data.images[i]) for i in idx]
            return torch.stack(
                [torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in arrays]
            ).to(self.device)
        return self._encode(self.augmented_images(idx, step, factors))

    def lowres_factors(self, n: int, step: int) -> list[float | None]:
        """The shrink factor of each of a step's n images (None: kept), each shrunk with
        probability ``lowres_prob``. Drawn from their own generator of (seed, step): the
        prompts' stream stays as it was."""
        cfg = self.cfg
        if cfg.lowres_prob == 0:
            return [None] * n
        g = step_generator(cfg.seed * 1009 + 7 + 500_009, step)  # apart from the prompts
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

    def draw_images(self, batch: int, g: torch.Generator) -> list[int]:
        """The step's image indices: uniform over all images, or with ``data_weights`` a set
        drawn by its weight, then an image of it uniformly."""
        weights = self.cfg.data_weights
        if weights is None:
            return torch.randint(len(self.data.images), (batch,), generator=g).tolist()
        if self._by_source is None:
            src = self.data.sources or [0] * len(self.data.images)
            self._by_source = [
                [i for i, s in enumerate(src) if s == k] for k in range(len(weights))
            ]
            empty = [
                self.cfg.data[k] for k, v in enumerate(self._by_source) if not v and weights[k]
            ]
            if empty:
                raise MedfmError(f"--data {empty[0]} has no labelled case to draw")
        w = torch.tensor(weights, dtype=torch.float64)
        chosen = torch.multinomial(w, batch, replacement=True, generator=g).tolist()
        out = []
        for k in chosen:
            pool = self._by_source[k]
            out.append(pool[int(torch.randint(len(pool), (1,), generator=g))])
        return out

    # ------------------------------------------------------------------ one step

    def step(
        self, net: nn.Module, step: int, generator: torch.Generator
    ) -> tuple[torch.Tensor | None, dict[str, float]]:
        cfg, g = self.cfg, generator
        idx = self.draw_images(cfg.batch, g)
        factors = self.lowres_factors(len(idx), step)  # one draw for images and labels
        labels = self.step_labels(idx, step, factors).to(self.device)
        image_index, masks = random_label_masks(
            labels, generator=g, max_per_image=cfg.prompts_per_image, area_power=cfg.area_power
        )
        if masks.shape[0] == 0:
            return None, {}
        prompts = sample_prompts(masks, cfg.prompt, input_size=LOWRES, generator=g)
        rows = None
        mine = list(range(len(idx)))
        if self.dist.world > 1:  # this process's images: rank, rank + world, ...
            rank, world = self.dist.rank, self.dist.world
            mine = mine[rank::world]
            rows = image_index % world == rank
            image_index = torch.where(rows, image_index // world, 0)
        self.model.train()
        idx_mine = [idx[i] for i in mine]
        factors_mine = [factors[i] for i in mine]
        if self.cache is not None:
            inputs = self.embeddings(idx_mine, step, factors_mine)
        else:
            images = self.augmented_images(idx_mine, step, factors_mine)
            inputs = preprocess_images(self.model, images, self.device)
        amp = self.cfg.amp and self.device.type == "cuda"
        return net(inputs, image_index, masks, prompts, cfg.prompt, cfg.loss, g, self.scale,
                   amp=amp, rows=rows)  # fmt: skip

    # ------------------------------------------------------------------ saved form

    def trained_state(self) -> dict[str, torch.Tensor]:
        state = self.model.state_dict()
        prefixes = trainable_prefixes(self.cfg)
        return {
            k: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith(prefixes)
        }

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = self.model.load_state_dict(state, strict=False)
        if missing.unexpected_keys:
            raise MedfmError(f"checkpoint has unexpected weights {missing.unexpected_keys[:3]}")

    def config(self) -> dict:
        return {
            "model": self.cfg.model,
            "base_checkpoint": self.cfg.checkpoint,
            "trained": list(trainable_prefixes(self.cfg)),
            "train_config": json.loads(self.cfg.model_dump_json()),
        }

    def save_model(self, folder: Path, ema: dict[str, torch.Tensor] | None) -> Path:
        """The final model (with ``ema_decay``, its trained weights are the EMA weights)."""
        from medfm.seg.models import save_pretrained

        if ema is not None:
            self.model.load_state_dict(ema, strict=False)
        save_pretrained(self.model, folder, name=self.cfg.model, extra=self.config())
        return folder


def engine_config(cfg: TrainConfig) -> EngineConfig:
    """The engine's part of a training config."""
    return EngineConfig.of(cfg)


def make_engine(
    cfg: TrainConfig, *, dist: Dist | None = None, log: Callable[[str], None] | None = None
) -> Engine:
    """The engine of one training run: its `SegTask` built (data loaded, embeddings cached)."""
    dist = dist or setup_distributed(parse_device(cfg.device))
    return Engine(SegTask(cfg, dist, log=log), engine_config(cfg), dist=dist, log=log)


def prepare_run(cfg: TrainConfig, *, resume: bool) -> None:
    """Create OUT, or check that an existing OUT with checkpoints was made by the same config
    (`medfm.engine.prepare_run_folder`: the folder's own path is not compared)."""
    prepare_run_folder(cfg.out, cfg, resume=resume)


def train(cfg: TrainConfig, *, resume: bool = False, log=None, progress=None) -> Path:
    """Train (or resume) a run; returns the final model folder. The run folder is locked for
    the run (rank 0 holds the lock under torchrun)."""
    dist = setup_distributed(parse_device(cfg.device))
    for data in cfg.data:
        check_outputs({"--out": cfg.out}, {"--data": data})
    check_training_data(cfg.data)  # a refused run writes nothing
    return run_training(
        cfg, lambda d: SegTask(cfg, d, log=log), dist=dist, resume=resume, log=log,
        progress=progress,
    )  # fmt: skip


__all__ = [
    "LOSSES",
    "PromptedSam",
    "SegTask",
    "TrainConfig",
    "coarsen_label",
    "decode",
    "engine_config",
    "lowres_label",
    "make_engine",
    "prepare_run",
    "prompted_loss",
    "train",
]
