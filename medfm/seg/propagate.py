"""Prompting 3D volumes slice by slice: per-slice prompts, and MedSAM's propagation of a 3D box
from its middle slice outwards, each slice prompted by the box of the previous slice's mask.

Slices are taken along the last axis k of a (i, j, k) volume; a slice (i, j) is a 2D image with
rows i (y) and columns j (x), as in `medfm.seg.evaluate`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from medfm.errors import MedfmError
from medfm.seg.boxes import box_region, check_box, mask_box
from medfm.seg.types import Predictor, click_multimask, to_rgb_uint8


def segment_slice(
    predictor: Predictor, image: np.ndarray, box_crop: bool | None = None, **prompt
) -> np.ndarray:
    """One 2D image (H, W) or (H, W, 3) and one prompt (box (4,) or points (P, 2) + labels (P,))
    -> mask (H, W) bool. ``box_crop`` (not None) is passed on to ``predict`` (`Segmenter`'s
    per-call override of its box crop)."""
    predictor.set_image(to_rgb_uint8(image))
    boxes = prompt.get("box")
    points = prompt.get("points")
    labels = prompt.get("labels")
    extra = {} if box_crop is None else {"box_crop": box_crop}
    pred = predictor.predict(
        boxes=None if boxes is None else np.asarray(boxes, np.float32)[None],
        points=None if points is None else np.asarray(points, np.float32)[None],
        labels=None if labels is None else np.asarray(labels, np.int64)[None],
        multimask=(
            boxes is None and points is not None and len(points) == 1 and click_multimask(predictor)
        ),
        **extra,
    )
    masks = pred.masks
    return (masks.numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks))[0]


def propagate_box3d(
    predictor: Predictor,
    volume: np.ndarray,
    box3d: np.ndarray,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """MedSAM's 3D inference: volume (i, j, k) uint8, box3d (6,) = x0, y0, x1, y1, z0, z1
    (x along j, y along i, z along k, all inclusive) -> mask (i, j, k) bool.

    ``progress(done, total)`` is called after each slice, total = z1 - z0 + 1 (the slices a
    stopped propagation skips count as done), ending at ``(total, total)``.

    The middle slice (z0 + z1) // 2 is segmented with the 2D box; each next slice towards z1
    (and towards z0) is prompted with the tight box of the previous slice's mask; propagation
    stops in a direction when a mask comes out empty. A predictor that crops box-prompted masks
    to their box (`medfm.seg.predict.Segmenter`'s ``box_crop``) has the propagated slices
    cropped to the 3D box's x / y extent instead: cropped to the previous slice's box, an object
    could never grow from one slice to the next.
    """
    h, w, depth = volume.shape
    x0, y0, x1, y1, z0, z1 = (float(v) for v in box3d)
    z0, z1 = int(z0), int(z1)
    if not 0 <= z0 <= z1 < depth:
        raise MedfmError(f"3D box slices {z0}..{z1} must lie in 0..{depth - 1} with z0 <= z1")
    box = np.array([x0, y0, x1, y1], np.float32)
    check_box(box, h, w)
    out = np.zeros(volume.shape, dtype=bool)
    total, done = z1 - z0 + 1, 1
    tick = progress or (lambda done, total: None)
    mid = (z0 + z1) // 2
    out[:, :, mid] = segment_slice(predictor, volume[:, :, mid], box=box)
    tick(done, total)
    crop = bool(getattr(predictor, "box_crop", False))
    inside = box_region(box[None], h, w)[0].numpy() if crop else None
    for direction, stop in ((1, z1), (-1, z0)):
        prev = out[:, :, mid]
        for z in range(mid + direction, stop + direction, direction):
            b = mask_box(prev)
            if b is None:
                break
            if crop:
                prev = segment_slice(predictor, volume[:, :, z], box=b, box_crop=False) & inside
            else:
                prev = segment_slice(predictor, volume[:, :, z], box=b)
            out[:, :, z] = prev
            done += 1
            tick(done, total)
    if done < total:
        tick(total, total)
    return out
