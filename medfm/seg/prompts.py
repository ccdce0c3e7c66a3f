"""Prompt simulation for training SAM-style decoders (SAM, MedSAM, SAM-Med2D), batched over N.

Conventions (those of `medfm.seg`): masks ``(N, H, W)`` bool; boxes ``(N, 4)`` float
``x0, y0, x1, y1`` in pixels, x = column, y = row, with SAM's continuous convention (a pixel's
centre sits at its integer index, so the tight box of a mask runs from its first to its last
column / row and a one-pixel mask has ``x0 == x1``); points ``(N, P, 2)`` float ``x, y`` at pixel
centres; labels ``(N, P)`` int64: 1 positive, 0 negative, -1 padding (SAM's prompt encoder
gives -1 its "not a point" embedding and ignores the coordinates, which are set to 0).

Randomness comes only from the ``generator=`` keyword. Random numbers are drawn on the
generator's device and then moved to the data's device, so a CPU generator gives the same
prompts for masks on the CPU or on a GPU (a generator on the masks' device saves the copy).
Every function draws a fixed amount of random numbers for given shapes, in a fixed order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage

from medfm.errors import MedfmError
from medfm.seg.boxes import as_masks, box_extent, tight_boxes

__all__ = [
    "PromptConfig",
    "Prompts",
    "innermost_points",
    "jitter_boxes",
    "max_shift_for",
    "random_label_masks",
    "refinement_clicks",
    "resize_boxes",
    "resize_points",
    "sample_points",
    "sample_prompts",
]

RefineMode = Literal["uniform", "center"]


# --------------------------------------------------------------------------- helpers


def _rand(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Uniforms in [0, 1) drawn on the generator's device, returned on ``device``."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _randint(
    low: int, high: int, shape: tuple[int, ...], generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Integers in [low, high] (both included), int64, on ``device``."""
    out = torch.randint(low, high + 1, shape, generator=generator, device=generator.device)
    return out.to(device)


def _sample_pixels(
    region: torch.Tensor, k: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to k distinct pixels per row, uniformly without replacement.

    region (N, H, W) bool -> (flat index (N, k) int64, valid (N, k) bool); slots beyond a
    row's pixel count are invalid (index 0). Random scores, masked, top-k per row.
    """
    n, h, w = region.shape
    if k == 0:
        empty = torch.zeros(n, 0, dtype=torch.long, device=region.device)
        return empty, empty.bool()
    scores = _rand((n, h * w), generator, region.device)
    scores = torch.where(region.reshape(n, h * w), scores, -1.0)
    vals, idx = scores.topk(min(k, h * w), dim=1)
    valid = vals >= 0
    if idx.shape[1] < k:  # fewer pixels in the image than slots asked for
        pad = k - idx.shape[1]
        idx = torch.cat([idx, idx.new_zeros(n, pad)], dim=1)
        valid = torch.cat([valid, valid.new_zeros(n, pad)], dim=1)
    return torch.where(valid, idx, 0), valid


def _index_to_xy(idx: torch.Tensor, width: int) -> torch.Tensor:
    """Flat pixel index (...) -> (..., 2) float xy (x = column, y = row)."""
    return torch.stack([idx % width, idx // width], dim=-1).float()


def _edt_argmax(regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The innermost pixel of each region: regions (N, H, W) bool -> (index (N,), dist (N,)).

    Euclidean distance transform (scipy, on the CPU) with the image border counting as outside
    (RITM / SAM evaluation convention); the first maximum in raster order (row-major) wins a
    tie. An empty region gives index 0 and distance 0. Each region's transform is taken on its
    bounding box grown by one pixel (background, or the image border), which holds the nearest
    outside pixel of every inside pixel (clamping a pixel to that box moves it closer to any
    pixel inside), so the distances are the full image's, at the cost of the box.
    """
    n, h, w = regions.shape
    best = torch.zeros(n, dtype=torch.float32)
    index = torch.zeros(n, dtype=torch.long)
    if n:
        cpu = regions.cpu()  # scipy runs here: one copy, no per-row device reads
        box, empty = box_extent(cpu)
        arr = cpu.numpy()
        rows = zip(box.tolist(), empty.tolist(), strict=True)
        for i, ((x0, y0, x1, y1), skip) in enumerate(rows):
            if skip:
                continue
            crop = np.pad(arr[i, y0 : y1 + 1, x0 : x1 + 1], 1)
            dist = ndimage.distance_transform_edt(crop)[1:-1, 1:-1]
            k = int(np.argmax(dist))  # first maximum on ties, in the crop's (and the image's)
            cy, cx = divmod(k, dist.shape[1])  # raster order
            best[i] = float(dist[cy, cx])
            index[i] = (y0 + cy) * w + x0 + cx
    return index.to(regions.device), best.to(regions.device)


# --------------------------------------------------------------------------- resizing


def resize_points(points, sx: float, sy: float):
    """Points ``(..., 2)`` x, y at pixel centres of an image -> the same places on that image
    resized by ``sx`` (columns) and ``sy`` (rows): ``x' = (x + 0.5) sx - 0.5``, as a
    resize with ``align_corners=False`` (torch, PIL) moves pixel centres. segment-anything's
    ``ResizeLongestSide.apply_coords`` takes ``x' = x sx`` instead, which at a 5x enlargement
    puts a click two pixels up and left of where it was. numpy or torch in, same out."""
    out = points * 1.0  # a float copy of either kind
    out[..., 0] = (points[..., 0] + 0.5) * sx - 0.5
    out[..., 1] = (points[..., 1] + 0.5) * sy - 0.5
    return out


def resize_boxes(boxes, sx: float, sy: float):
    """Tight boxes ``(N, 4)`` x0, y0, x1, y1 (first and last pixel centres of the object, the
    module's convention) -> the tight boxes of the same objects on the image resized by ``sx``,
    ``sy``. Enlarged, a pixel becomes s pixels, so the box runs from the first of the first
    pixel's to the last of the last pixel's: ``x0' = x0 sx`` and ``x1' = (x1 + 1) sx - 1``
    (``ResizeLongestSide.apply_boxes``'s ``x1 sx`` drops the last s - 1 columns: a 5x-enlarged
    object of 2 pixels gets a box of 5 columns for its 10). Shrunk (s < 1), the corners move as
    pixel centres (`resize_points`), so that a box never inverts. numpy or torch in, same out."""
    out = resize_points(boxes.reshape(-1, 2, 2), sx, sy)
    hx, hy = max(sx - 1.0, 0.0) / 2, max(sy - 1.0, 0.0) / 2
    out[:, 0, 0] -= hx
    out[:, 0, 1] -= hy
    out[:, 1, 0] += hx
    out[:, 1, 1] += hy
    return out.reshape(boxes.shape)


def max_shift_for(input_size: int, at_1024: float = 20.0) -> float:
    """MedSAM's box jitter (up to 20 px at a 1024 input) scaled to ``input_size`` pixels."""
    if input_size <= 0:
        raise MedfmError(f"input_size must be positive, got {input_size}")
    return at_1024 * input_size / 1024


def jitter_boxes(
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    *,
    max_shift: float,
    generator: torch.Generator,
    shrink: bool = False,
) -> torch.Tensor:
    """Randomly perturb boxes (N, 4) xyxy inside an image of ``image_size = (H, W)``.

    Each side moves by an integer number of pixels drawn uniformly from
    ``0..floor(max_shift)``. With ``shrink=False`` (default, MedSAM's training jitter) every side
    moves outwards, so the box still contains whatever it contained; with ``shrink=True`` each
    side moves by ``-floor(max_shift)..floor(max_shift)``, inwards or outwards. The result is
    clipped to the pixel centres of the image, x in [0, W - 1] and y in [0, H - 1] (MedSAM
    clips x1 to W; medfm keeps boxes inside the image), and a side pair that crossed over
    (x1 < x0) collapses to its midpoint. Draws 4N integers.
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise MedfmError(f"boxes must have shape (N, 4), got {tuple(boxes.shape)}")
    if max_shift < 0:
        raise MedfmError(f"max_shift must be >= 0, got {max_shift}")
    h, w = image_size
    m = int(math.floor(max_shift))
    n = boxes.shape[0]
    boxes = boxes.float()
    if shrink:
        out = boxes + _randint(-m, m, (n, 4), generator, boxes.device)
    else:
        sign = torch.tensor([-1.0, -1.0, 1.0, 1.0], device=boxes.device)
        out = boxes + sign * _randint(0, m, (n, 4), generator, boxes.device)
    hi = torch.tensor([w - 1, h - 1, w - 1, h - 1], dtype=out.dtype, device=out.device)
    out = torch.minimum(out.clamp(min=0), hi)
    lo_xy, hi_xy = out[:, :2], out[:, 2:]
    mid = (lo_xy + hi_xy) / 2
    crossed = hi_xy < lo_xy
    return torch.cat([torch.where(crossed, mid, lo_xy), torch.where(crossed, mid, hi_xy)], dim=1)


# --------------------------------------------------------------------------- points


def sample_points(
    masks: torch.Tensor,
    n_pos: int,
    n_neg: int,
    *,
    generator: torch.Generator,
    band: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random positive and negative clicks per mask.

    masks (N, H, W) bool -> points (N, n_pos + n_neg, 2) float xy, labels (N, n_pos + n_neg)
    int64. The first ``n_pos`` slots are positives, drawn uniformly without replacement from the
    mask's pixels; the last ``n_neg`` are negatives, drawn uniformly without replacement from the
    pixels outside the mask, or, with ``band``, from those outside the mask but inside its tight
    box grown by ``band`` pixels on each side (hard negatives near the boundary). A slot that
    cannot be filled (a mask with fewer pixels than ``n_pos``, an empty mask, a band with too
    few background pixels) gets label -1 and point (0, 0): no point is repeated.
    """
    masks = as_masks(masks)
    if n_pos < 0 or n_neg < 0:
        raise MedfmError(f"n_pos and n_neg must be >= 0, got {n_pos}, {n_neg}")
    n, h, w = masks.shape
    outside = ~masks
    if band is not None:
        if band < 0:
            raise MedfmError(f"band must be >= 0 pixels, got {band}")
        box, _ = box_extent(masks)  # empty masks: inverted box, no band at all
        xs = torch.arange(w, device=masks.device)
        ys = torch.arange(h, device=masks.device)
        in_x = (xs >= box[:, 0, None] - band) & (xs <= box[:, 2, None] + band)  # (N, W)
        in_y = (ys >= box[:, 1, None] - band) & (ys <= box[:, 3, None] + band)  # (N, H)
        outside = outside & in_y[:, :, None] & in_x[:, None, :]
    pos_idx, pos_ok = _sample_pixels(masks, n_pos, generator)
    neg_idx, neg_ok = _sample_pixels(outside, n_neg, generator)
    idx = torch.cat([pos_idx, neg_idx], dim=1)
    ok = torch.cat([pos_ok, neg_ok], dim=1)
    kind = torch.cat(
        [
            torch.ones(n, n_pos, dtype=torch.long, device=masks.device),
            torch.zeros(n, n_neg, dtype=torch.long, device=masks.device),
        ],
        dim=1,
    )
    labels = torch.where(ok, kind, -1)
    points = _index_to_xy(idx, w) * ok[..., None]
    return points, labels


def innermost_points(masks: torch.Tensor) -> torch.Tensor:
    """masks (N, H, W) bool -> points (N, 2) float xy: each mask's pixel farthest from its
    boundary (maximum of the Euclidean distance transform, the image border counting as
    boundary; the first in row-major order on a tie). Deterministic: the evaluation protocol's
    one positive click. An empty mask raises `MedfmError`. Runs scipy on the CPU.
    """
    masks = as_masks(masks)
    empty = ~masks.flatten(1).any(dim=1)
    if bool(empty.any()):
        bad = torch.nonzero(empty).flatten()[:10].tolist()
        raise MedfmError(f"empty mask at index {bad}: a click needs at least one foreground pixel")
    idx, _ = _edt_argmax(masks)
    return _index_to_xy(idx, masks.shape[2])


def refinement_clicks(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    mode: RefineMode = "uniform",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One corrective click per prompt from the error of the previous prediction.

    pred, target (N, H, W) bool -> points (N, 1, 2) float xy, labels (N, 1) int64. False
    negatives (target and not pred) call for a positive click (1), false positives for a
    negative one (0).

    - ``mode="uniform"`` (SAM's training, SAM-Med2D): the click is uniform over the whole error
      region (false negatives and false positives together), so the error type is drawn in
      proportion to its area and the label follows the pixel drawn. Needs ``generator``; draws
      N * H * W uniforms.
    - ``mode="center"`` (RITM / SAM's interactive evaluation): deterministic; the click goes to
      the innermost pixel of the false negatives or of the false positives, whichever has the
      larger distance-transform maximum (false negatives on a tie). ``generator`` is unused.

    Without any error the click is a positive one inside the target (uniform, or its innermost
    pixel); if the target is empty too, the click is padding: label -1 at (0, 0).
    """
    pred = as_masks(pred, "pred")
    target = as_masks(target, "target")
    if pred.shape != target.shape:
        raise MedfmError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    n, _, w = target.shape
    fn = target & ~pred
    fp = pred & ~target
    no_error = ~(fn | fp).flatten(1).any(dim=1)  # (N,)
    if mode == "uniform":
        if generator is None:
            raise MedfmError('refinement_clicks(mode="uniform") needs generator=')
        region = torch.where(no_error[:, None, None], target, fn | fp)
        idx, ok = _sample_pixels(region, 1, generator)
        idx, ok = idx[:, 0], ok[:, 0]
        positive = fn.flatten(1).gather(1, idx[:, None])[:, 0] | no_error
    elif mode == "center":
        both_idx, both_d = _edt_argmax(torch.cat([fn, fp]))
        fn_idx, fp_idx = both_idx[:n], both_idx[n:]
        fn_d, fp_d = both_d[:n], both_d[n:]
        positive = fn_d >= fp_d  # both 0 only without error
        idx = torch.where(positive, fn_idx, fp_idx)
        if bool(no_error.any()):
            t_idx, _ = _edt_argmax(target)
            idx = torch.where(no_error, t_idx, idx)
        ok = ~no_error | target.flatten(1).any(dim=1)
    else:
        raise MedfmError(f'mode must be "uniform" or "center", got {mode!r}')
    labels = torch.where(ok, positive.long(), -1)
    points = _index_to_xy(idx, w) * ok[:, None]
    return points[:, None, :], labels[:, None]


# --------------------------------------------------------------------------- targets


def random_label_masks(
    label_map: torch.Tensor,
    *,
    generator: torch.Generator,
    max_per_image: int,
    area_power: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary targets from multi-label maps, one label per prompt.

    label_map (B, H, W) integer, 0 = background -> image_index (N,) int64 and masks (N, H, W)
    bool. From each image, ``min(max_per_image, labels present)`` of its foreground labels are
    chosen without replacement (in random order, grouped by image in image order): uniformly,
    or with ``area_power`` > 0 with weights area ** area_power (pixels; 1: in proportion to
    the area), by Efraimidis and Spirakis' keys u ** (1 / weight). An image with background
    only contributes nothing. Draws B * (max label + 1) uniforms either way.
    """
    if label_map.ndim != 3:
        raise MedfmError(f"label_map must have shape (B, H, W), got {tuple(label_map.shape)}")
    if label_map.dtype.is_floating_point or label_map.dtype.is_complex:
        raise MedfmError(f"label_map must hold integer labels, got {label_map.dtype}")
    if max_per_image < 1:
        raise MedfmError(f"max_per_image must be >= 1, got {max_per_image}")
    if area_power < 0:
        raise MedfmError(f"area_power must be >= 0, got {area_power}")
    b = label_map.shape[0]
    device = label_map.device
    flat = label_map.reshape(b, -1).long()
    if flat.numel() and int(flat.min()) < 0:
        raise MedfmError("label_map has negative labels; labels are 0 (background) or positive")
    n_labels = int(flat.max()) + 1 if flat.numel() else 1
    present = torch.zeros(b, n_labels, dtype=torch.bool, device=device)
    present.scatter_(1, flat, True)
    present[:, 0] = False
    u = _rand((b, n_labels), generator, device)
    if area_power > 0:  # Efraimidis-Spirakis keys u ** (1 / w), in [0, 1] as the uniform ones
        area = torch.zeros(b, n_labels, dtype=torch.float64, device=device)
        area.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float64))
        u = u.double() ** (1.0 / area.clamp_min(1.0) ** area_power)
    scores = torch.where(present, u, -1.0)
    vals, labels = scores.topk(min(max_per_image, n_labels), dim=1)
    keep = vals >= 0
    image_index = torch.arange(b, device=device)[:, None].expand_as(labels)[keep]
    labels = labels[keep]
    masks = label_map[image_index] == labels[:, None, None].to(label_map.dtype)
    return image_index, masks


# --------------------------------------------------------------------------- mixed prompts


class PromptConfig(BaseModel):
    """How training prompts are drawn (SAM's mix of boxes and points).

    - ``box_prob``: probability that a prompt is a box (else points); SAM 0.5, MedSAM 1.
    - ``max_shift``: box jitter in pixels at a 1024 input (MedSAM: 20), scaled to the input
      size; ``shrink`` lets sides move inwards too (`jitter_boxes`).
    - ``n_pos``, ``n_neg``: inclusive ranges of positive / negative clicks of a point prompt,
      drawn uniformly per prompt; ``neg_band``: negatives within that many pixels of the
      object's box (None: anywhere outside the object).
    - ``center_prob``: probability that the first positive click of a point prompt is the
      mask's innermost pixel (where a user clicks, and the evaluation protocol's click; RITM
      likewise keeps first clicks away from the boundary) instead of a uniform one. 0 draws
      nothing extra, so existing configs give the same prompts as before.
    - ``refine_iters``: corrective clicks after the first prediction, each from the error
      region (`refinement_clicks` in ``refine_mode``), the previous mask logits fed back (SAM
      trains with 8, plus 2 rounds with the mask only); read by the training loop.
    - ``multimask``: train SAM's three outputs, the best-matching one, for ambiguous prompts
      (`Prompts.ambiguous`: one point, no box); the single output otherwise. False: always the
      single output.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    box_prob: float = Field(0.5, ge=0.0, le=1.0)
    max_shift: float = Field(20.0, ge=0.0)
    shrink: bool = False
    n_pos: tuple[int, int] = (1, 3)
    n_neg: tuple[int, int] = (0, 2)
    neg_band: int | None = Field(None, ge=0)
    center_prob: float = Field(0.0, ge=0.0, le=1.0)
    refine_iters: int = Field(2, ge=0)
    refine_mode: RefineMode = "uniform"
    multimask: bool = True

    @model_validator(mode="after")
    def _check_ranges(self) -> PromptConfig:
        for name, lowest in (("n_pos", 1), ("n_neg", 0)):
            lo, hi = getattr(self, name)
            if lo < lowest or hi < lo:
                raise ValueError(f"{name} must be (low, high) with {lowest} <= low <= high")
        return self


@dataclass(frozen=True)
class Prompts:
    """A batch of N prompts for N target masks.

    boxes (N, 4) float xyxy, meaningful where ``has_box`` (N,) bool is True (zeros elsewhere);
    points (N, P, 2) float xy and labels (N, P) int64 (1 / 0 / -1 padding). SAM's prompt encoder
    takes boxes for all rows of a call or for none, so a mixed batch is decoded as two calls:
    ``subset(has_box)`` with boxes (and points, if refinement added any) and
    ``subset(~has_box)`` with points only.
    """

    boxes: torch.Tensor
    has_box: torch.Tensor
    points: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.has_box.shape[0])

    @property
    def n_points(self) -> torch.Tensor:
        """(N,) int64: the real (non-padding) points of each prompt."""
        return (self.labels >= 0).sum(dim=1)

    @property
    def ambiguous(self) -> torch.Tensor:
        """(N,) bool: prompts SAM answers with three masks (a single point and no box)."""
        return ~self.has_box & (self.n_points == 1)

    def subset(self, index: torch.Tensor) -> Prompts:
        """The prompts at ``index`` (a bool mask (N,) or int64 indices)."""
        return Prompts(
            self.boxes[index], self.has_box[index], self.points[index], self.labels[index]
        )

    def add_points(self, points: torch.Tensor, labels: torch.Tensor) -> Prompts:
        """Append clicks (N, Q, 2) / (N, Q) after the existing ones (refinement)."""
        return Prompts(
            self.boxes,
            self.has_box,
            torch.cat([self.points, points.to(self.points)], dim=1),
            torch.cat([self.labels, labels.to(self.labels)], dim=1),
        )

    def to(self, device: torch.device | str) -> Prompts:
        return Prompts(
            *(t.to(device) for t in (self.boxes, self.has_box, self.points, self.labels))
        )


def sample_prompts(
    masks: torch.Tensor, cfg: PromptConfig, *, input_size: int, generator: torch.Generator
) -> Prompts:
    """Draw one prompt per target mask, SAM-style: each is a box or a set of points.

    masks (N, H, W) bool at the model's input resolution (coordinates are pixels of that
    frame; ``input_size`` is the model's input side, 1024 for SAM, 256 for medfm-tiny, and
    scales the box jitter). Each prompt is a box with probability ``cfg.box_prob``: the tight
    box, jittered by up to ``cfg.max_shift * input_size / 1024`` pixels per side. Otherwise it
    is ``n_pos`` positive and ``n_neg`` negative clicks (uniform in ``cfg.n_pos`` /
    ``cfg.n_neg``), padded with label -1 to P = ``cfg.n_pos[1] + cfg.n_neg[1]``; box prompts
    get P padding points. With probability ``cfg.center_prob`` the first positive click is
    the mask's innermost pixel (`innermost_points`); the other positives stay uniform. Every
    draw is made for every row (boxes, counts and clicks), so the result for row i does not
    change with the box / point choice of the other rows.
    Empty masks raise `MedfmError`.
    """
    masks = as_masks(masks)
    n, h, w = masks.shape
    device = masks.device
    has_box = _rand((n,), generator, device) < cfg.box_prob
    boxes = jitter_boxes(
        tight_boxes(masks),
        (h, w),
        max_shift=max_shift_for(input_size, cfg.max_shift),
        generator=generator,
        shrink=cfg.shrink,
    )
    (pos_lo, pos_hi), (neg_lo, neg_hi) = cfg.n_pos, cfg.n_neg
    n_pos = _randint(pos_lo, pos_hi, (n,), generator, device)
    n_neg = _randint(neg_lo, neg_hi, (n,), generator, device)
    points, labels = sample_points(masks, pos_hi, neg_hi, generator=generator, band=cfg.neg_band)
    slot = torch.arange(pos_hi + neg_hi, device=device)
    used = torch.where(
        slot < pos_hi, slot[None] < n_pos[:, None], slot[None] - pos_hi < n_neg[:, None]
    )
    used = used & ~has_box[:, None]
    if cfg.center_prob > 0:
        # a box prompt uses no click: the transform only where the click is used (no draw
        # depends on it)
        center = (_rand((n,), generator, device) < cfg.center_prob) & ~has_box
        need = torch.nonzero(center).flatten()
        idx = torch.zeros(n, dtype=torch.long, device=device)
        idx[need] = _edt_argmax(masks[need])[0]
        points[:, 0] = torch.where(center[:, None], _index_to_xy(idx, w), points[:, 0])
        # the innermost pixel may repeat a uniform positive: drop that one
        same = (points[:, 1:pos_hi] == points[:, :1]).all(dim=-1) & center[:, None]
        labels[:, 1:pos_hi] = torch.where(same, -1, labels[:, 1:pos_hi])
    labels = torch.where(used, labels, -1)
    points = points * (labels >= 0)[..., None]
    boxes = boxes * has_box[:, None]
    return Prompts(boxes=boxes, has_box=has_box, points=points, labels=labels)
